"""Chaos: four nodes and two averaging trainers while nodes are killed (-9), frozen (SIGSTOP),
restarted and one is cut off the network (its namespace's link down). Bounded: about a minute of
training. Needs root for the network namespace."""

from __future__ import annotations

import json

import pytest
from markers import needs_root

from dmoe.client.config import SwarmConfig
from dmoe.testing.chaos import ChaosConfig, ChaosRun

pytestmark = [pytest.mark.timeout(300), needs_root]  # the cut-off node lives in a network namespace
# A step's own compute, on top of its deadlines, in typical steps of the same trainer (its median step,
# most of which meet no fault): measured in the run, so it grows with the machine's load.
COMPUTE_STEPS = 10
CHECK_INTERVAL_S = 1.0  # the controller asks restarted nodes whether they served once a second


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
        compute_s = COMPUTE_STEPS * trainer["median_step_s"]
        assert trainer["max_step_s"] <= report["step_bound_s"] + compute_s, trainer
        (first_step, first), (last_step, last) = trainer["heldout"][0], trainer["heldout"][-1]
        assert first_step == 0 and last_step == trainer["steps"], trainer["heldout"]
        assert last < first - 0.2, trainer["heldout"]
    assert sum(t["failed_calls"] for t in report["trainers"]) > 0  # the faults did reach the trainers
    assert report["corrupt_checkpoints"] == []

    # a node back is used once the trainers' cached lookups lapse (the default cache_ttl: they run with
    # it), a step has started reading them again in the background, the read has ended (a DHT read of a
    # few keys, well within a step) and a step has called it: those ready by then must have served
    slowest_step_s = max(t["max_step_s"] for t in report["trainers"])
    pickup_s = SwarmConfig().cache_ttl + 3 * slowest_step_s + CHECK_INTERVAL_S
    # every restart resumed from the newest checkpoint on disk, and at least one had something to resume
    assert report["restarts"] and all(r["ok"] for r in report["restarts"]), report["restarts"]
    assert any(r["restored"] for r in report["restarts"]), report["restarts"]
    # nodes that came back were used again (Info counts forward calls since the restart), at least
    # those that came back pickup_s before the trainers stopped
    for restart in report["restarts"]:
        if restart["t"] < report["trainers_done_at"] - pickup_s:
            assert restart["served"], restart
    # and every node served since its last start, unless that start came too late to be used
    last_start = {r["node"]: r["t"] for r in report["restarts"]}
    assert all(node["forward_calls_since_start"] for node in report["nodes"]
               if last_start.get(node["name"], 0.0) < report["trainers_done_at"] - pickup_s), report["nodes"]
