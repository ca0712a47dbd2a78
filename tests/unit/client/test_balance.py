"""The replica choice, without a network: expected finish time from measured speeds and queues, the
prior of an unmeasured replica, random ties, the share of a big sub-batch, and backed-off replicas."""

from __future__ import annotations

import collections
import time

import pytest

from dmoe.client.balance import ReplicaBalancer
from dmoe.client.swarm import Swarm
from dmoe.core.records import ExpertRecord

pytestmark = pytest.mark.timeout(30)


def replica(endpoint: str, uid: str = "ffn.0", queued: int = 0, max_tokens: int = 0) -> ExpertRecord:
    return ExpertRecord(uid=uid, endpoint=endpoint, node_id=endpoint, queued_tokens=queued,
                        max_batch_tokens=max_tokens)


def measured(balancer: ReplicaBalancer, **seconds_per_token: float) -> None:
    for endpoint, spt in seconds_per_token.items():
        balancer.observe(endpoint, "ffn.0", 100, 100 * spt)


def test_the_replica_expected_to_finish_first_is_picked():
    balancer = ReplicaBalancer(seed=0)
    measured(balancer, a=1e-3, b=2e-3)
    a, b = replica("a"), replica("b")
    assert balancer.rank([b, a], 10) == [a, b]
    assert balancer.expected_seconds([a, b], 10) == pytest.approx([0.01, 0.02])
    # a's announced queue makes it finish later than b
    busy_a = replica("a", queued=1000)
    assert balancer.rank([busy_a, b], 10) == [b, busy_a]
    # this client's own tokens in flight count too (the announced queue is a heartbeat late)
    balancer.begin("a", 1000)
    assert balancer.rank([a, b], 10) == [b, a]
    balancer.end("a", 1000)
    assert balancer.in_flight("a") == 0 and balancer.rank([a, b], 10) == [a, b]


def test_the_moving_average_follows_a_replica_that_slows_down():
    balancer = ReplicaBalancer(alpha=0.5, seed=0)
    measured(balancer, a=1e-3, b=2e-3)
    for _ in range(4):
        balancer.observe("a", "ffn.0", 100, 100 * 1e-2)  # a is ten times slower now
    assert balancer.measured("a", "ffn.0") == pytest.approx(1e-2 + (1e-3 - 1e-2) / 16)
    assert balancer.rank([replica("a"), replica("b")], 10)[0].endpoint == "b"


def test_an_unmeasured_replica_is_tried():
    balancer = ReplicaBalancer(seed=0)
    measured(balancer, a=1e-3)
    new = replica("new")
    assert balancer.seconds_per_token([replica("a"), new]) == pytest.approx([1e-3, 0.5e-3])
    assert balancer.rank([replica("a"), new], 10)[0] is new
    # a known node's unmeasured expert is as fast as the node's other experts, not a newcomer
    balancer.observe("c", "ffn.1", 100, 100 * 5e-3)
    assert balancer.seconds_per_token([replica("a"), replica("c")]) == pytest.approx([1e-3, 5e-3])


def test_ties_are_broken_at_random():
    balancer = ReplicaBalancer(seed=1)
    replicas = [replica("a"), replica("b"), replica("c")]  # nothing measured: all alike
    firsts = collections.Counter(balancer.rank(replicas, 10)[0].endpoint for _ in range(300))
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 50


def test_a_small_sub_batch_goes_to_one_replica():
    balancer = ReplicaBalancer(spread_tokens=1024, seed=0)
    measured(balancer, a=1e-3, b=1e-3)
    plan = balancer.plan([replica("a"), replica("b")], 1000)
    assert len(plan) == 1 and plan[0][1] == 1000


def test_a_big_sub_batch_is_spread_in_proportion_to_speed():
    balancer = ReplicaBalancer(spread_tokens=1024, min_part_tokens=16, seed=0)
    measured(balancer, a=1e-3, b=3e-3)
    plan = balancer.plan([replica("b"), replica("a")], 1200)
    assert {r.endpoint: n for r, n in plan} == {"a": 900, "b": 300}
    # equal speeds: halves; three replicas: thirds, summing to the sub-batch
    measured(balancer, c=1e-3, d=1e-3, e=1e-3)
    assert sorted(n for _, n in balancer.plan([replica("c"), replica("d")], 2000)) == [1000, 1000]
    shares = [n for _, n in balancer.plan([replica("c"), replica("d"), replica("e")], 3001)]
    assert sum(shares) == 3001 and max(shares) - min(shares) <= 1


def test_a_sub_batch_over_the_nodes_limit_is_spread_and_queues_are_levelled():
    balancer = ReplicaBalancer(spread_tokens=100_000, min_part_tokens=16, seed=0)
    measured(balancer, a=1e-3, b=1e-3)
    a, b = replica("a", max_tokens=512, queued=200), replica("b", max_tokens=512)
    plan = dict((r.endpoint, n) for r, n in balancer.plan([a, b], 600))
    assert plan == {"a": 200, "b": 400}  # both expected to finish at (200 + 200) x 1e-3 s
    # a queue that alone outlasts the other's finish gets nothing
    plan = balancer.plan([replica("a", max_tokens=512, queued=5000), b], 600)
    assert [(r.endpoint, n) for r, n in plan] == [("b", 600)]


def test_parts_too_small_for_a_call_go_to_the_others():
    balancer = ReplicaBalancer(spread_tokens=100, min_part_tokens=64, seed=0)
    measured(balancer, a=1e-3, b=20e-3)
    plan = balancer.plan([replica("a"), replica("b")], 400)  # b's exact share would be 19 tokens
    assert [(r.endpoint, n) for r, n in plan] == [("a", 400)]


def test_a_backed_off_or_quarantined_replica_is_not_offered():
    swarm = Swarm(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"], ban_base=30.0, ban_max=60.0)
    try:
        a, b, c = replica("a:1"), replica("b:1"), replica("c:1")
        assert swarm._usable([a, b, c], 0.0) == [a, b, c]
        swarm.report_failure("a:1")
        swarm.quarantine("c:1", "ffn.0", "a bad reply")
        now = time.monotonic()
        assert swarm._usable([a, b, c], now) == [b]
        assert swarm._usable([replica("c:1", uid="ffn.1")], now) != []  # quarantine is per (endpoint, uid)
    finally:
        swarm.loop.close()


def test_measurements_of_rotating_endpoints_stay_bounded():
    balancer = ReplicaBalancer(max_entries=8, seed=0)
    for i in range(100):
        balancer.observe(f"10.0.0.{i}:1", "ffn.0", tokens=4, seconds=0.01)
    balancer.observe("10.0.0.95:1", "ffn.0", tokens=4, seconds=0.02)  # seen again: now the newest
    for i in range(100, 107):
        balancer.observe(f"10.0.0.{i}:1", "ffn.0", tokens=4, seconds=0.01)
    assert len(balancer._per_expert) == len(balancer._per_endpoint) == 8
    assert balancer.measured("10.0.0.95:1", "ffn.0") is not None  # the recently measured one is kept
    assert balancer.measured("10.0.0.96:1", "ffn.0") is None


def test_the_expected_time_of_a_measured_replica_is_read_in_one_look():
    """expected_if_measured (a forward's patience for each call) is expected_seconds for a replica whose
    expert is measured, its announced queue and this client's tokens in flight counted; None otherwise."""
    balancer = ReplicaBalancer(seed=0)
    measured(balancer, a=1e-3)
    busy = replica("a", queued=30)
    balancer.begin("a", 20)
    assert balancer.expected_if_measured("a", "ffn.0", busy, 10) == balancer.expected_seconds([busy], 10)[0]
    assert balancer.expected_if_measured("a", "ffn.0", busy, 10) == pytest.approx((30 + 20 + 10) * 1e-3)
    assert balancer.expected_if_measured("a", "ffn.1", replica("a", "ffn.1"), 10) is None  # node known only
    assert balancer.expected_if_measured("b", "ffn.0", replica("b"), 10) is None


def test_a_call_that_ends_with_its_time_is_observed_as_observe_does():
    """end(..., seconds=) takes the call's tokens out of flight and observes its time like observe();
    without seconds (a call that failed or was cancelled) it observes nothing."""
    ended, observed = ReplicaBalancer(alpha=0.5, seed=0), ReplicaBalancer(alpha=0.5, seed=0)
    for balancer in (ended, observed):
        measured(balancer, a=1e-3)
        balancer.begin("a", 10)
    ended.end("a", 10, uid="ffn.0", seconds=0.05)
    observed.end("a", 10)
    observed.observe("a", "ffn.0", 10, 0.05)
    assert ended.measured("a", "ffn.0") == observed.measured("a", "ffn.0") == pytest.approx((1e-3 + 5e-3) / 2)
    other = [replica("a", "ffn.9")]  # the node's speed over its experts, observed too
    assert ended.seconds_per_token(other) == observed.seconds_per_token(other)
    assert ended.in_flight("a") == 0
    ended.begin("a", 10)
    ended.end("a", 10, uid="ffn.0")
    assert ended.measured("a", "ffn.0") == observed.measured("a", "ffn.0") and ended.in_flight("a") == 0
