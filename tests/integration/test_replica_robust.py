"""Replica averaging with --average-aggregate centered-clip between real nodes: a hostile replica whose
state is wrong but within the distance bound is not refused, and yet does not move the expert, which
stays with its honest replica; with the plain mean the same replica pulls it halfway, round after round."""

from __future__ import annotations

import time

import pytest
import torch
from swarm_fixtures import stub, wait_for
from test_replica_averaging import HIDDEN, forward, gap, replica_args

pytestmark = pytest.mark.timeout(180)
AGGREGATE = "centered-clip"


def test_a_hostile_replica_within_the_bound_does_not_move_a_centered_clip_expert(node_factory, monkeypatch):
    monkeypatch.setenv("DMOE_LOGLEVEL", "DEBUG")  # the blends are logged at debug level
    averaging = node_factory(*replica_args("--average-interval", "1", "--average-aggregate", AGGREGATE),
                             name="averaging")
    monkeypatch.delenv("DMOE_LOGLEVEL")
    honest = node_factory(*replica_args("--average-interval", "0", "--swarm", averaging.swarm[0]),
                          name="honest")
    monkeypatch.setenv("DMOE_TEST_POISON", "0.25")  # every value 0.25: ~2.7 norms off, under the bound 4
    hostile = node_factory(*replica_args("--average-interval", "0", "--swarm", averaging.swarm[0]),
                           name="hostile")
    monkeypatch.delenv("DMOE_TEST_POISON")
    (channel, service), (honest_channel, honest_service) = stub(averaging.endpoint), stub(honest.endpoint)
    try:
        probe = torch.randn(8, HIDDEN)
        assert gap((service, honest_service), probe) < 1e-6  # both took the same state
        before = forward(service, probe)
        since = time.time()

        def blends_with_both() -> list[str]:
            return [line for line in averaging.log().splitlines() if "blended with the replica" in line
                    and hostile.endpoint in line and (AGGREGATE == "mean" or honest.endpoint in line)]

        # three rounds that took the hostile replica in (with the mean: blends with it alone)
        wait_for(lambda: len(blends_with_both()) >= 3, 60, "three blends with the hostile replica",
                 interval=0.2)
        assert not [line for line in averaging.log().splitlines() if "refused the parameters" in line]
        moved = float((forward(service, probe) - before).norm() / before.norm())
        print(f"{AGGREGATE}: moved {moved:.4f} in {time.time() - since:.1f}s")
        assert moved < 1e-3, moved
        assert gap((service, honest_service), probe) < 1e-3
    finally:
        channel.close()
        honest_channel.close()
