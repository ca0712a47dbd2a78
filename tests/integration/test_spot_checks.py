"""Spot checks of replicas against real nodes on 127.0.0.1: three honest replicas of two experts and
a liar, a node of the same swarm hosting the same uids with the same state, whose expert adds a
random perturbation of the output's own norm on half of its Forward calls
(tests/support/lying_experts.py).

With checks on, the liar is quarantined within a few steps and no honest replica is, also after
the honest ones drifted apart by training (and came back by averaging) within the tolerance; with
checks off (the default before spot checks existed, rate 0) it is never caught; and a check whose
replica does not answer leaves the step alone."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import pytest
import torch
from hostile import HostileServer
from swarm_fixtures import NodeProcess, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import ExpertJob
from dmoe.client.spotcheck import SpotChecker
from dmoe.client.swarm import Swarm
from dmoe.core.records import ExpertRecord
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(120)
HIDDEN, NUM_EXPERTS = 16, 2
UIDS = [f"spot.{i}" for i in range(NUM_EXPERTS)]
TOLERANCE = 0.3  # honest replicas here drift up to ~0.05 apart (0.02-0.08 at lr 0.01); a lie, ~0.8
NUM_TRAINING_STEPS = 20
MAX_STEPS = 120  # a check involves the liar, lying, 1 time in 8 at least: a uid escapes 1 time in 1e7
COMMON = ["--experts", f"spot.[0:{NUM_EXPERTS}]", "--expert-cls", "lying_experts:LyingExpert",
          "--hidden-dim", str(HIDDEN), "--optimizer", "sgd", "--lr", "0.005", "--max-grad-norm", "0",
          "--average-interval", "1", "--heartbeat-interval", "1", "--record-ttl", "5"]


class LiarProcess(NodeProcess):
    """A node whose expert lies on half of its Forward calls, each lie logged to ``lies``."""

    lies: str = ""

    def command(self) -> list[str]:
        return ["env", "DMOE_TEST_LIE_FRACTION=0.5", f"DMOE_TEST_LIE_LOG={self.lies}", *super().command()]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[dict]:
    """Honest nodes a, b, c and the liar, hosting the same two uids; ``lies``: the liar's log of lies."""
    workdir = tmp_path_factory.mktemp("spot")
    a = NodeProcess(workdir, COMMON, "a")
    others = [NodeProcess(workdir, [*COMMON, "--swarm", ""], name) for name in ("b", "c")]
    liar = LiarProcess(workdir, [*COMMON, "--swarm", ""], "liar")
    liar.lies = str(workdir / "lies.log")
    started = [a, *others, liar]
    try:
        a.start()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # the others join a, all at once
            for process in (*others, liar):
                process.args[-1] = a.swarm[0]
            list(pool.map(NodeProcess.start, (*others, liar)))
        yield {"honest": [a, *others], "liar": liar, "lies": workdir / "lies.log"}
    finally:
        for process in started:
            process.cleanup()


def client(nodes: dict, **options) -> Swarm:
    """A started Swarm that sees all four replicas of both experts."""
    config = SwarmConfig(initial_peers=nodes["honest"][0].swarm, cache_ttl=60, **options)
    swarm = Swarm(config).start()

    def all_listed():
        found = swarm.live_replicas_under(["spot."], refresh=True)["spot."]
        return len(found) == NUM_EXPERTS and all(len(r) == 4 for r in found.values())

    wait_for(all_listed, 60, "four replicas of every expert")
    return swarm


def layer_of(swarm: Swarm) -> RemoteMoE:
    torch.manual_seed(0)
    return RemoteMoE(swarm, prefix="spot", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=1,
                     forward_timeout=10, backward_timeout=10)


def quarantined(swarm: Swarm, processes: list[NodeProcess]) -> set[tuple[str, str]]:
    return {(p.name, uid) for p in processes for uid in UIDS if swarm.quarantined(p.endpoint, uid)}


def num_lies(nodes: dict) -> int:
    return len(nodes["lies"].read_text().splitlines()) if nodes["lies"].exists() else 0


def test_honest_replicas_drifted_by_training_agree_within_the_tolerance(nodes):
    """Every answer checked (rate 1) while the client trains the three honest replicas apart (each
    backward goes to the replica that answered) and averaging pulls them back: no disagreement."""
    swarm = client(nodes, spot_check_rate=1.0, spot_check_tolerance=TOLERANCE)
    layer = layer_of(swarm)
    try:
        for uid in UIDS:  # this client leaves the liar out (as if it had caught it already)
            swarm.quarantine(nodes["liar"].endpoint, uid, "left out by the test")
        target = torch.randn(HIDDEN)
        for step in range(NUM_TRAINING_STEPS):
            x = torch.randn(16, HIDDEN, requires_grad=True)
            ((layer(x) - target) ** 2).mean().backward()
            assert layer.last_num_failed == 0
        wait_for(lambda: layer.spot_checker.running == 0, 15, "the checks in flight to end")
        stats = layer.spot_checker.stats
        print(f"honest: {stats}")
        assert stats.checks >= 2 * NUM_TRAINING_STEPS - 5
        assert stats.agreed == stats.checks and stats.disagreed == 0
        assert 1e-3 < stats.largest_agreed < TOLERANCE  # they did drift apart, within the tolerance
        assert quarantined(swarm, nodes["honest"]) == set()
    finally:
        layer.dispatcher.close()
        swarm.shutdown()


def test_with_spot_checks_off_the_liar_is_never_caught(nodes):
    swarm = client(nodes, spot_check_rate=0.0)
    layer = layer_of(swarm)
    try:
        for process in nodes["honest"]:  # every call goes to the liar (the balancer might avoid it)
            for uid in UIDS:
                swarm.quarantine(process.endpoint, uid, "left out by the test")
        before, steps = num_lies(nodes), 0
        while num_lies(nodes) < before + 3:  # the step used three lies at least
            assert steps < 100, "the liar told no lies"
            layer(torch.randn(8, HIDDEN))
            assert layer.last_num_failed == 0
            steps += 1
        assert layer.spot_checker.stats.checks == 0
        assert quarantined(swarm, [nodes["liar"]]) == set()
    finally:
        layer.dispatcher.close()
        swarm.shutdown()


def test_with_spot_checks_on_the_liar_is_quarantined_and_no_honest_replica_is(nodes):
    swarm = client(nodes, spot_check_rate=1.0, spot_check_tolerance=TOLERANCE)
    layer = layer_of(swarm)
    liar = nodes["liar"]
    try:
        caught = {liar.name: None}
        for step in range(1, MAX_STEPS + 1):
            layer(torch.randn(8, HIDDEN))
            assert layer.last_num_failed == 0
            if quarantined(swarm, [liar]) == {(liar.name, uid) for uid in UIDS}:
                caught[liar.name] = step
                break
        wait_for(lambda: layer.spot_checker.running == 0, 15, "the checks in flight to end")
        stats = layer.spot_checker.stats
        print(f"liar caught on both experts after {caught[liar.name]} steps: {stats}")
        assert caught[liar.name] is not None, f"not caught in {MAX_STEPS} steps: {stats}"
        assert quarantined(swarm, nodes["honest"]) == set()
        assert stats.convicted >= NUM_EXPERTS and stats.disagreed == stats.convicted + stats.unsettled
        # from then on the liar is not called: its answers are no longer used
        lies = num_lies(nodes)
        for _ in range(10):
            layer(torch.randn(8, HIDDEN))
        assert num_lies(nodes) == lies
    finally:
        layer.dispatcher.close()
        swarm.shutdown()


def test_a_check_that_gets_no_answer_neither_fails_nor_delays_the_step(nodes):
    """The only other replica answers after the forward's deadline (a slow node): the forward returns
    at once with the honest replica's answer while the check is in flight; the check ends at the
    deadline, convicts nobody and blames nobody (its time is the check's own: a timeout does not back
    the replica off). Closing the dispatcher cancels a check still in flight, before its channel
    closes: nothing is left running, and nothing is reported."""
    honest = nodes["honest"][0]
    slow = HostileServer({UIDS[0]: "slow"}, slow_seconds=4.0).start()
    swarm = client(nodes)
    dispatcher = swarm.dispatcher(pb.NONE)
    try:
        records = [ExpertRecord(uid=UIDS[0], endpoint=e, node_id=e, expert_cls="lying_experts:LyingExpert")
                   for e in (honest.endpoint, slow.endpoint)]
        swarm.balancer.observe(honest.endpoint, UIDS[0], 1000, 0.001)  # the honest one answers first
        swarm.balancer.observe(slow.endpoint, UIDS[0], 1000, 10.0)
        checker = SpotChecker(rate=1.0, tolerance=TOLERANCE, tokens=4, quarantine=swarm.quarantine)
        started = time.monotonic()
        answers = dispatcher.forward(
            [ExpertJob(UIDS[0], records, torch.randn(8, HIDDEN), torch.arange(8))], num_tokens=8, k_min=1,
            forward_timeout=2.0, timeout_after_k_min=1.0, avoided=swarm.health.is_avoided, spot_check=checker,
            on_result=lambda call, error: swarm.report(call.endpoint, call.uid, error))
        elapsed = time.monotonic() - started
        assert answers.num_failed == 0 and [p[2].endpoint for p in answers.parts] == [honest.endpoint]
        assert elapsed < 1.8, elapsed
        assert checker.running == 1  # the step is over; its check is still in flight
        wait_for(lambda: checker.running == 0, 10, "the check to end")
        stats = checker.stats
        assert (stats.failed, stats.checks, stats.convicted) == (1, 0, 0) and slow.calls[UIDS[0]] == 1
        assert not swarm.quarantined(slow.endpoint, UIDS[0]) and swarm.health.failures(slow.endpoint) == 0
        assert not swarm.health.is_avoided(slow.endpoint, UIDS[0])
        assert not swarm.quarantined(honest.endpoint, UIDS[0])
        # closing while a check is in flight: cancelled first, not failed, nothing reported
        dispatcher.forward(
            [ExpertJob(UIDS[0], records, torch.randn(8, HIDDEN), torch.arange(8))], num_tokens=8, k_min=1,
            forward_timeout=2.0, timeout_after_k_min=1.0, avoided=swarm.health.is_avoided, spot_check=checker,
            on_result=lambda call, error: swarm.report(call.endpoint, call.uid, error))
        wait_for(lambda: slow.calls[UIDS[0]] == 2, 5, "the second check's call to arrive")
        assert checker.running == 1
        dispatcher.close()
        assert checker.running == 0 and checker.stats.failed == 1
        assert swarm.health.failures(slow.endpoint) == 0 and swarm.health.failures(honest.endpoint) == 0
    finally:
        dispatcher.close()
        swarm.shutdown()
        slow.shutdown()
