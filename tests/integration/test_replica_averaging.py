"""Replica averaging between real nodes: replicas trained apart come back together, and a replica
offering NaN or absurd parameters is refused and avoided."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
import torch
from swarm_fixtures import expert_version, stub, wait_for

from dmoe.core.records import find_nodes
from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(240)
HIDDEN = 32
UID = "rep.0"
MAX_NUMEL = 1 << 20


def replica_args(*extra: str) -> list[str]:
    return ["--experts", UID, "--expert-cls", "replica_experts:ReplicaExpert", "--hidden-dim", str(HIDDEN),
            "--optimizer", "sgd", "--lr", "0.05", "--max-grad-norm", "0", "--heartbeat-interval", "1",
            "--record-ttl", "5", *extra]


def forward(service, x: torch.Tensor) -> torch.Tensor:
    reply = service.Forward(pb.ForwardRequest(uid=UID, inputs=[serialize(x)]), timeout=30)
    return deserialize(reply.outputs[0], max_numel=MAX_NUMEL)


def backward(service, x: torch.Tensor, grad: torch.Tensor) -> None:
    service.Backward(pb.BackwardRequest(uid=UID, inputs=[serialize(x)], grad_outputs=[serialize(grad)]),
                     timeout=30)


def gap(services, probe: torch.Tensor) -> float:
    """How far apart the replicas compute: |y_a - y_b| / |y_a| on the probe input."""
    y_a, y_b = (forward(service, probe) for service in services)
    return float((y_a - y_b).norm() / y_a.norm())


def test_replicas_trained_apart_are_averaged_back_together(node_factory, dht_factory):
    a = node_factory(*replica_args("--average-interval", "1"), name="a")
    b = node_factory(*replica_args("--average-interval", "1", "--swarm", a.swarm[0]), name="b")
    (channel_a, service_a), (channel_b, service_b) = stub(a.endpoint), stub(b.endpoint)
    services = (service_a, service_b)
    try:
        torch.manual_seed(0)
        probe, x = torch.randn(8, HIDDEN), torch.randn(16, HIDDEN)
        grad = 0.015 * torch.randn(16, HIDDEN)
        assert gap(services, probe) < 1e-6  # b took a's state when it joined
        # opposite gradients: the replicas move apart faster than averaging brings them back
        num_steps = 0
        while (apart := gap(services, probe)) < 0.5:
            assert num_steps < 300, f"the replicas did not move apart: {apart:.3f}"
            backward(service_a, x, grad)
            backward(service_b, x, -grad)
            num_steps += 1
        trained_until = time.time()
        assert expert_version(service_a, UID) == expert_version(service_b, UID) == num_steps
        close = wait_for(lambda: (g := gap(services, probe)) < 0.02 * apart and g, 60,
                         "averaging to bring the replicas together", interval=0.2)
        print(f"gap {apart:.3f} after {num_steps} steps apart, {close:.5f} after averaging")
        # versions are each replica's own optimizer steps: averaging leaves them
        assert expert_version(service_a, UID) == expert_version(service_b, UID) == num_steps
        peer = dht_factory(a.swarm)

        def published():
            nodes = find_nodes(peer)
            loads = [nodes[n.ready["node_id"]].load[UID] for n in (a, b) if n.ready["node_id"] in nodes]
            return len(loads) == 2 and all(load.averaged_at > trained_until for load in loads) and loads

        loads = wait_for(published, 30, "both nodes to publish their spread", interval=0.5)
        assert all(0 < load.spread < 1 for load in loads), loads
    finally:
        channel_a.close()
        channel_b.close()


def test_a_replica_offering_nan_or_absurd_parameters_is_refused_and_avoided(node_factory, monkeypatch):
    a = node_factory(*replica_args("--average-interval", "1"), name="a")
    channel, service = stub(a.endpoint)
    try:
        probe = torch.randn(8, HIDDEN)
        before = forward(service, probe)
        hostile = {}
        for name, poison in [("nan", "nan"), ("absurd", "1e6")]:
            monkeypatch.setenv("DMOE_TEST_POISON", poison)
            hostile[name] = node_factory(*replica_args("--average-interval", "1", "--swarm", a.swarm[0]),
                                         name=name)
        monkeypatch.delenv("DMOE_TEST_POISON")

        def refusals(endpoint: str) -> list[str]:
            return [line for line in a.log().splitlines()
                    if f"refused the parameters of the replica at {endpoint} (" in line]

        wait_for(lambda: all(refusals(h.endpoint) for h in hostile.values()), 60,
                 "a to refuse both hostile replicas", interval=0.2)
        assert "NaN" in refusals(hostile["nan"].endpoint)[0]
        assert "times its norm" in refusals(hostile["absurd"].endpoint)[0]
        time.sleep(4)  # a few more rounds (one a second)
        torch.testing.assert_close(forward(service, probe), before, rtol=0, atol=0)
        # avoided for 10 intervals after each refusal, not asked again every round
        for h in hostile.values():
            times = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                     for line in refusals(h.endpoint)]
            gaps = [later - earlier for earlier, later in zip(times, times[1:])]
            assert all(seconds > 9.5 for seconds in gaps), refusals(h.endpoint)
    finally:
        channel.close()
