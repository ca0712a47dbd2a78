"""A replica-aware client against real nodes on 127.0.0.1 that host the same uids: calls spread over
both, a big sub-batch is shared, and a node killed with a forward in flight there costs no token an
expert (failover to the other replica, within the step), and backward goes to the replica that answered.

The nodes run with ``--average-interval 0`` (no replica averaging) and ``--lr 1e-9``, so their
experts stay equal to the uid-seeded initial ones that the local reference builds."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
import torch
from swarm_fixtures import stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.experts import create_expert
from dmoe.core.records import find_experts
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(240)
HIDDEN, NUM_EXPERTS = 16, 4
UIDS = [f"ffn.{i}" for i in range(NUM_EXPERTS)]
COMMON = ["--experts", f"ffn.[0:{NUM_EXPERTS}]", "--hidden-dim", str(HIDDEN), "--lr", "1e-9",
          "--average-interval", "0"]


@pytest.fixture
def replicated(node_factory):
    """Two nodes that host the same four uids, and a client that sees both replicas of each."""
    a = node_factory(*COMMON, name="a")
    b = node_factory(*COMMON, "--swarm", a.swarm[0], name="b")
    # no spot checks (test_spot_checks.py has them): these tests count the calls and tokens replicas served
    with Swarm(SwarmConfig(initial_peers=a.swarm, cache_ttl=60, spot_check_rate=0)) as swarm:
        def both_listed():
            found = swarm.live_replicas_under(["ffn."], refresh=True)["ffn."]
            return len(found) == NUM_EXPERTS and all(len(r) == 2 for r in found.values())

        wait_for(both_listed, 60, "both replicas of every expert")
        yield swarm, a, b


def forward_stats(endpoint: str) -> tuple[int, int]:
    """(Forward calls, forward tokens) the node served, over its experts (its Info stats)."""
    channel, service = stub(endpoint)
    try:
        info = service.Info(pb.InfoRequest(), timeout=10)
        return (sum(e.stats.forward_calls for e in info.experts),
                sum(e.stats.forward_tokens for e in info.experts))
    finally:
        channel.close()


def reference(layer: RemoteMoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The same MoE computed here from the uid-seeded experts (every expert answering)."""
    experts = [create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0] for uid in UIDS]
    top_TK, experts_TK = layer.gates[0](x_TD).topk(layer.k, dim=-1)
    weights_TK = top_TK.softmax(-1)
    rows = [sum(weights_TK[t, j] * experts[int(experts_TK[t, j])](x_TD[t:t + 1])[0] for j in range(layer.k))
            for t in range(x_TD.shape[0])]
    return torch.stack(rows)


def test_both_replicas_are_listed_and_calls_spread_over_both(replicated):
    swarm, a, b = replicated
    found = find_experts(swarm.peer, UIDS)
    assert all({r.endpoint for r in found[uid]} == {a.endpoint, b.endpoint} for uid in UIDS)
    before = {n.endpoint: forward_stats(n.endpoint) for n in (a, b)}
    torch.manual_seed(0)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2)
    try:
        x = torch.randn(16, HIDDEN)
        for _ in range(12):
            y = layer(x)
            assert layer.last_num_failed == 0 and bool(layer.last_answered_TK.all())
        torch.testing.assert_close(y, reference(layer, x), rtol=1e-4, atol=1e-5)
        calls = {n.endpoint: forward_stats(n.endpoint)[0] - before[n.endpoint][0] for n in (a, b)}
        total = sum(calls.values())
        assert total >= 12 * 2  # at least one call per chosen expert and step
        assert min(calls.values()) >= total // 5, calls  # both replicas took a fair part
    finally:
        layer.dispatcher.close()


def test_a_big_sub_batch_is_shared_by_the_replicas(replicated):
    swarm, a, b = replicated
    swarm.balancer.spread_tokens, swarm.balancer.min_part_tokens = 64, 8
    torch.manual_seed(1)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=1, k_min=1)
    try:
        x = torch.randn(512, HIDDEN)
        layer(x)  # measures both replicas
        before = {n.endpoint: forward_stats(n.endpoint)[1] for n in (a, b)}
        y = layer(x)
        assert layer.last_num_failed == 0 and bool(layer.last_answered_TK.all())
        tokens = {n.endpoint: forward_stats(n.endpoint)[1] - before[n.endpoint] for n in (a, b)}
        assert sum(tokens.values()) == 512 and min(tokens.values()) >= 512 // 8, tokens
        torch.testing.assert_close(y, reference(layer, x), rtol=1e-4, atol=1e-5)
    finally:
        layer.dispatcher.close()


def test_a_node_killed_mid_forward_costs_no_token_an_expert(replicated):
    """b is frozen (SIGSTOP) so that calls sent to it stay in flight, picked because the client
    measured it as the faster replica; then b is killed with kill -9 while they are. The step fails
    over to a: every token gets all its experts, the output equals the all-alive output and the
    local reference, and backward goes to a alone (b ran none of the forward that was used)."""
    swarm, a, b = replicated
    torch.manual_seed(2)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2,
                      forward_timeout=30, timeout_after_k_min=30, backward_timeout=30)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        x = torch.randn(24, HIDDEN, requires_grad=True)
        all_alive = layer(x).detach()
        assert layer.last_num_failed == 0 and bool(layer.last_answered_TK.all())
        for uid in UIDS:  # b measured ten times faster than a: every call goes to b first
            swarm.balancer.observe(b.endpoint, uid, 1000, 0.001)
            swarm.balancer.observe(a.endpoint, uid, 1000, 0.01)
        calls_on_a = forward_stats(a.endpoint)[0]
        os.killpg(b.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        forward = pool.submit(layer, x)
        wait_for(lambda: swarm.balancer.in_flight(b.endpoint) > 0, 10, "a forward call in flight on b")
        b.kill()
        y = forward.result(30)
        elapsed = time.monotonic() - started
        assert layer.last_num_failed == 0 and layer.last_num_retried >= 1
        assert bool(layer.last_answered_TK.all())  # no token lost an expert
        assert forward_stats(a.endpoint)[0] > calls_on_a
        torch.testing.assert_close(y, all_alive, rtol=1e-5, atol=1e-6)
        expected = reference(layer, x.detach())
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        assert elapsed < 10, elapsed

        weights = torch.linspace(-1, 1, HIDDEN)
        (y * weights).sum().backward()
        remote_grad = x.grad.clone()
        x.grad = None
        (reference(layer, x) * weights).sum().backward()  # every expert's gradient came back, from a
        torch.testing.assert_close(remote_grad, x.grad, rtol=1e-4, atol=1e-5)
    finally:
        pool.shutdown()
        layer.dispatcher.close()


def test_a_step_with_every_replica_dead_loses_the_experts_without_hanging(replicated):
    swarm, a, b = replicated
    torch.manual_seed(3)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2,
                      forward_timeout=5, backward_timeout=5)
    try:
        layer(torch.randn(8, HIDDEN))
        a.kill()
        b.kill()
        started = time.monotonic()
        y = layer(torch.randn(8, HIDDEN))
        assert time.monotonic() - started < 5 + 2
        assert layer.last_num_failed > 0 and torch.equal(y, torch.zeros_like(y))
    finally:
        layer.dispatcher.close()
