"""Trainers' averaging with one hostile trainer of four (real averagers: hivemind's all-reduce over libp2p,
tests/support/byzantine_round.py): with the plain mean, BTARD's x-1000 attack and an in-bound one pass the
guard and carry the honest trainers' parameters two norms away; with centered-clip they land where the
honest ones' mean is, and with no attacker, where the plain mean lands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from swarm_fixtures import HERE

pytestmark = pytest.mark.timeout(300)
ATTACKS = ["none", "sign-flip", "in-bound"]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """aggregate -> attack -> the round's outcome, both aggregates run side by side."""
    logs = tmp_path_factory.mktemp("byzantine")
    processes = {}
    for aggregate in ("mean", "centered-clip"):
        log = open(logs / f"{aggregate}.log", "wb")
        processes[aggregate] = subprocess.Popen(
            [sys.executable, str(HERE / "byzantine_round.py"), aggregate, *ATTACKS], stdout=subprocess.PIPE,
            stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, cwd=HERE)
    results: dict[str, dict[str, dict]] = {}
    try:
        for aggregate, proc in processes.items():
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, (logs / f"{aggregate}.log").read_text()[-3000:]
            results[aggregate] = {r["attack"]: r for r in map(json.loads, out.decode().splitlines())}
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the script, its averagers and libp2p daemons
                proc.wait(10)
    for by_attack in results.values():
        for r in by_attack.values():
            assert r["groups"] == [4, 4, 4, 4], r  # one group of four: what the test is about
    return results


@pytest.mark.parametrize("attack", ["sign-flip", "in-bound"])
def test_with_the_plain_mean_one_hostile_trainer_carries_the_others_far(rounds, attack):
    r = rounds["mean"][attack]
    assert r["outcomes"] == ["averaged"] * 4, r  # the guard lets it through: 2-2.5 norms, under its bound
    assert all(d > 1.0 for d in r["after"]), r


@pytest.mark.parametrize("attack", ["sign-flip", "in-bound"])
def test_with_centered_clip_the_honest_trainers_land_near_their_mean(rounds, attack):
    r = rounds["centered-clip"][attack]
    assert r["outcomes"] == ["averaged"] * 4, r
    # closer to the honest mean than each honest trainer was before the round, as with no attacker
    assert all(after < 0.6 * before for after, before in zip(r["after"], r["before"])), r
    assert all(d < 2 * rounds["centered-clip"]["none"]["after"][0] for d in r["after"]), r


def test_with_no_attacker_centered_clip_lands_where_the_mean_does(rounds):
    mean, clipped = rounds["mean"]["none"], rounds["centered-clip"]["none"]
    assert mean["outcomes"] == clipped["outcomes"] == ["averaged"] * 4
    for a, b in zip(mean["after"], clipped["after"]):
        assert abs(a - b) < 0.05 * a, (mean, clipped)
