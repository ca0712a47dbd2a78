"""One peer's pull on an expert is bounded: past its step budget, its Backward calls are answered but
no longer move the expert, while another peer still trains it, and an honest trainer's steps are
exactly those of local torch (a real node, peers told apart by their source address)."""

from __future__ import annotations

import time

import pytest
import torch
from swarm_fixtures import expert_version, module_node, stub

from dmoe.core.experts import create_expert
from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb
from dmoe.testing.netproxy import TcpProxy

HIDDEN = 16
BUDGET = 60  # steps a minute: one a second, in bursts of 10 (set here, not the node's default)
pytestmark = pytest.mark.timeout(120)

node = module_node("--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN),
                   "--peer-steps-per-minute", str(BUDGET), "--max-peer-step-share", "0.5")


class Replica:
    """The expert run locally as the node runs it: each Backward one clipped Adam step."""

    def __init__(self, uid: str):
        self.module = create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0]
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=1e-3)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        leaf = x.clone().requires_grad_()
        self.module(leaf).backward(grad)
        torch.nn.utils.clip_grad_norm_(list(self.module.parameters()), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return leaf.grad

    def input_grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.func.vjp(self.module, x)[1](grad)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)


def backward(service, uid: str, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    request = pb.BackwardRequest(uid=uid, inputs=[serialize(x)], grad_outputs=[serialize(grad)])
    reply = service.Backward(request, timeout=30)
    return deserialize(reply.grad_inputs[0], max_numel=x.numel())


def skipped_updates(service, uid: str) -> int:
    return service.Info(pb.InfoRequest(uids=[uid]), timeout=10).experts[0].stats.skipped_updates


def forward(service, uid: str, x: torch.Tensor) -> torch.Tensor:
    reply = service.Forward(pb.ForwardRequest(uid=uid, inputs=[serialize(x)]), timeout=30)
    return deserialize(reply.outputs[0], max_numel=x.numel())


@pytest.fixture(scope="module")
def first_peer(node):
    channel, service = stub(node.endpoint)  # from 127.0.0.1
    yield service
    channel.close()


@pytest.fixture(scope="module")
def second_peer(node):
    """A second peer: the same node seen from 127.0.0.2."""
    host, port = node.endpoint.rsplit(":", 1)
    with TcpProxy((host, int(port)), source="127.0.0.2") as proxy:
        channel, service = stub(f"127.0.0.1:{proxy.port}")
        yield service
        channel.close()


def test_a_peer_over_its_step_budget_answered_but_no_longer_moving_the_expert(first_peer, second_peer):
    attacker, other_peer = first_peer, second_peer
    uid, replica = "ffn.0", Replica("ffn.0")
    x = torch.randn(4, HIDDEN)
    grad = torch.full((4, HIDDEN), -1e-4)  # tiny, of one sign: "make every output larger"
    probe = torch.randn(8, HIDDEN)
    before = expert_version(attacker, uid)
    started = time.monotonic()
    calls = 40
    for _ in range(calls):  # legal calls, each one answered with its input gradients
        grads = backward(attacker, uid, x, grad)
        assert grads.shape == x.shape and torch.isfinite(grads).all()
    steps = expert_version(attacker, uid) - before
    # the burst of 10 and one more a second: not one step per call
    assert steps <= BUDGET / 6 + (time.monotonic() - started) * BUDGET / 60 + 1, (steps, calls)
    for _ in range(steps):
        replica.step(x, grad)
    # over the budget, a call still gets the exact input gradients of the expert as it stands
    torch.testing.assert_close(backward(attacker, uid, x, grad), replica.input_grad(x, grad), rtol=1e-5,
                               atol=1e-7)
    for _ in range(expert_version(attacker, uid) - before - steps):  # that call, if the bucket had refilled
        replica.step(x, grad)
    # every call that did not step is counted in the node's Info, where a client can see it
    assert skipped_updates(other_peer, uid) == calls + 1 - (expert_version(attacker, uid) - before)
    # the expert is exactly where the allowed steps took it: the skipped calls changed nothing
    torch.testing.assert_close(forward(attacker, uid, probe), replica.forward(probe), rtol=1e-5, atol=1e-6)
    # another peer still trains the same expert, every call a step
    for _ in range(3):
        x_h, grad_h = torch.randn(5, HIDDEN), torch.randn(5, HIDDEN) * 1e-2
        at = expert_version(other_peer, uid)
        grads = backward(other_peer, uid, x_h, grad_h)
        torch.testing.assert_close(grads, replica.step(x_h, grad_h), rtol=1e-5, atol=1e-7)
        assert expert_version(other_peer, uid) == at + 1
    assert skipped_updates(other_peer, uid) == calls + 1 - (expert_version(attacker, uid) - before - 3)
    torch.testing.assert_close(forward(other_peer, uid, probe), replica.forward(probe), rtol=1e-5, atol=1e-6)


def test_an_honest_trainer_under_the_budget_trains_exactly_as_local_torch(first_peer):
    trainer = first_peer  # a budget per expert: the same peer's budget on ffn.0 is spent
    uid, replica = "ffn.1", Replica("ffn.1")
    before = expert_version(trainer, uid)
    for _ in range(8):
        x, target = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN)
        y = forward(trainer, uid, x)
        torch.testing.assert_close(y, replica.forward(x), rtol=1e-5, atol=1e-6)
        grad = 2 * (y - target) / y.numel()
        grads = backward(trainer, uid, x, grad)
        torch.testing.assert_close(grads, replica.step(x, grad), rtol=1e-5, atol=1e-7)
    assert expert_version(trainer, uid) == before + 8 and skipped_updates(trainer, uid) == 0

