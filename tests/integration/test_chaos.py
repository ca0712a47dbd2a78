"""Chaos: four nodes and two averaging trainers while nodes are killed (-9), frozen (SIGSTOP),
restarted and one is cut off the network (its namespace's link down). Bounded: about a minute of
training. Needs root for the network namespace."""

from __future__ import annotations

import json

import pytest
from markers import needs_root

from dmoe.testing.chaos import ChaosConfig, ChaosRun

pytestmark = [pytest.mark.timeout(300), needs_root]  # the cut-off node lives in a network namespace
COMPUTE_ALLOWANCE_S = 6.0  # a step's own compute on a loaded 2-core machine, on top of its deadlines


def test_training_survives_kills_freezes_restarts_and_a_cut_off_node(tmp_path):
    config = ChaosConfig(duration=22, calm=8, fault_interval=1.5, no_kills_for=6, seed=1)
    report = ChaosRun(config, tmp_path).run()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))
    logs = "\n".join(f"--- {t['name']}: {(tmp_path / t['name'] / 'train.log').read_text()[-3000:]}"
                     for t in report["trainers"])

    assert report["faults"]["kill -9"] >= 1 and report["faults"]["SIGSTOP"] >= 1, report["events"]
    assert report["faults"]["cut off"] == 1, report["events"]
    for trainer in report["trainers"]:
        assert trainer["exit_code"] == 0 and trainer["unhandled_errors"] == 0, logs
        assert trainer["steps"] >= 20, trainer  # evaluated every 20 steps: at least one evaluation on the way
        assert trainer["max_step_s"] <= report["step_bound_s"] + COMPUTE_ALLOWANCE_S, trainer
        (first_step, first), (last_step, last) = trainer["heldout"][0], trainer["heldout"][-1]
        assert first_step == 0 and last_step == trainer["steps"], trainer["heldout"]
        assert last < first - 0.2, trainer["heldout"]
    assert sum(t["failed_calls"] for t in report["trainers"]) > 0  # the faults did reach the trainers
    assert report["corrupt_checkpoints"] == []

    # every restart resumed from the newest checkpoint on disk, and at least one had something to resume
    assert report["restarts"] and all(r["ok"] for r in report["restarts"]), report["restarts"]
    assert any(r["restored"] for r in report["restarts"]), report["restarts"]
    # nodes that came back were used again (Info counts forward calls since the restart), at least
    # those that came back some seconds before the trainers stopped
    for restart in report["restarts"]:
        if restart["t"] < report["trainers_done_at"] - 8:
            assert restart["served"], restart
    # and every node served since its last start, unless that start came too late to be used
    last_start = {r["node"]: r["t"] for r in report["restarts"]}
    assert all(node["forward_calls_since_start"] for node in report["nodes"]
               if last_start.get(node["name"], 0.0) < report["trainers_done_at"] - 8), report["nodes"]
