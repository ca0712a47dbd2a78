"""Grouped execution (dmoe.node.grouped): many same-shaped experts in one vmapped call and one optimizer
step must give each expert what its own forward, backward, clip and step give, and the runtime must
form such groups from the batches waiting for different experts."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from swarm_fixtures import wait_for

from dmoe.core.experts import create_expert
from dmoe.node import grouped
from dmoe.node.backend import ExpertBackend
from dmoe.node.influence import InfluenceLimits
from dmoe.node.runtime import Runtime, Task

pytestmark = pytest.mark.timeout(60)
HIDDEN = 8
OPTIMIZERS = {"adam": lambda params: torch.optim.Adam(params, lr=1e-2),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.5)}


def backend(uid: str, optimizer: str = "adam", *, expert_cls: str = "ffn", max_grad_norm: float = 1.0,
            autocast: torch.dtype | None = None) -> ExpertBackend:
    module, schema = create_expert(expert_cls, uid=uid, hidden_dim=HIDDEN, inner_dim=2 * HIDDEN)
    return ExpertBackend(uid, module=module, input_schema=schema, make_optimizer=OPTIMIZERS[optimizer],
                         device=torch.device("cpu"), expert_cls=expert_cls, optimizer_name=optimizer,
                         max_grad_norm=max_grad_norm, max_batch_tokens=4096, autocast=autocast)


def rows_of(n: int, generator: torch.Generator, scale: float = 1.0) -> list[list[torch.Tensor]]:
    """Inputs of 1..4 rows for n experts (differing row counts: the group pads)."""
    return [[scale * torch.randn(1 + i % 4, HIDDEN, generator=generator)] for i in range(n)]


def assert_same_experts(a: list[ExpertBackend], b: list[ExpertBackend]) -> None:
    for x, y in zip(a, b):
        assert x.version == y.version
        for p, q in zip(x.module.parameters(), y.module.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        # the optimizer state lives where torch's own step puts it: a checkpoint of one loads into the other
        x_state, y_state = x.optimizer.state_dict()["state"], y.optimizer.state_dict()["state"]
        assert x_state.keys() == y_state.keys()
        for index in x_state:
            assert x_state[index].keys() == y_state[index].keys()
            for slot in x_state[index]:
                torch.testing.assert_close(x_state[index][slot], y_state[index][slot], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_group_gives_each_expert_what_its_own_calls_give(optimizer):
    alone = [backend(f"e.{i}", optimizer) for i in range(6)]
    together = [backend(f"e.{i}", optimizer) for i in range(6)]
    assert len({grouped.group_key(b) for b in together}) == 1
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        # scale 30: the gradients are far above max_grad_norm, so each expert is clipped by its own norm
        xs, gs = rows_of(6, generator), rows_of(6, generator, scale=30.0 if step else 1.0)
        outputs = grouped.forward(together, xs)
        for b, x, out in zip(alone, xs, outputs):
            torch.testing.assert_close(out[0], b.forward(x)[0], rtol=1e-4, atol=1e-5)
        replies = []
        stepped = grouped.backward(together, xs, gs, reply=replies.append)
        assert stepped == [True] * 6 and len(replies) == 1
        for b, x, g, reply in zip(alone, xs, gs, replies[0]):
            assert reply[0].shape == x[0].shape
            torch.testing.assert_close(reply[0], b.backward(x, g)[0], rtol=1e-4, atol=1e-5)
        assert_same_experts(alone, together)
    assert all(p.grad is None for b in together for p in b.module.parameters())


def test_clipping_is_per_expert_in_a_group():
    """Huge gradients must not shrink another member's step, nor each other's: SGD's step shows the
    clipped gradient itself (a clip by the group's norm would move each huge one by lr / sqrt(2))."""
    members = [backend(f"e.{i}", "sgd") for i in range(3)]
    small_alone = backend("e.0", "sgd")
    before = [[p.detach().clone() for p in b.module.parameters()] for b in members]
    x = [[torch.randn(2, HIDDEN)] for _ in range(3)]
    g = [[1e-3 * torch.randn(2, HIDDEN)], [1e3 * torch.randn(2, HIDDEN)], [1e3 * torch.randn(2, HIDDEN)]]
    grouped.backward(members, x, g, reply=lambda _: None)
    small_alone.backward(x[0], g[0])
    moved = [float(torch.cat([(p.detach() - q).flatten() for p, q in zip(b.module.parameters(), old)]).norm())
             for b, old in zip(members, before)]
    lr = 0.5
    assert moved[1:] == [pytest.approx(lr * 1.0, rel=1e-4)] * 2  # each clipped to max_grad_norm 1
    assert moved[0] < lr * 0.1
    assert_same_experts([small_alone], members[:1])  # moved by its own, unclipped gradient


def test_a_member_with_non_finite_gradients_skips_its_step_alone():
    members = [backend(f"e.{i}") for i in range(3)]
    with torch.no_grad():
        next(members[1].module.parameters())[0, 0] = float("inf")
    frozen = [p.detach().clone() for p in members[1].module.parameters()]
    stepped = grouped.backward(members, [[torch.randn(2, HIDDEN)] for _ in range(3)],
                               [[torch.randn(2, HIDDEN)] for _ in range(3)], reply=lambda _: None)
    assert stepped == [True, False, True]
    assert [m.version for m in members] == [1, 0, 1]
    assert [m.skipped_steps for m in members] == [0, 1, 0]
    for p, q in zip(members[1].module.parameters(), frozen):
        assert torch.equal(p, q)


def test_the_reply_comes_before_the_step_with_every_member_locked_and_unsettled():
    members = [backend(f"e.{i}") for i in range(3)]
    seen = []

    def reply(_):
        seen.append([(m.lock.locked(), m.settled.is_set(), m.version) for m in members])

    grouped.backward(members, rows_of(3, torch.Generator().manual_seed(1)),
                     rows_of(3, torch.Generator().manual_seed(2)), reply=reply)
    assert seen == [[(True, False, 0)] * 3]
    assert [(m.lock.locked(), m.settled.is_set(), m.version) for m in members] == [(False, True, 1)] * 3


def test_which_experts_may_group():
    key = grouped.group_key(backend("e.0"))
    assert key is not None and grouped.group_key(backend("e.1")) == key
    assert grouped.group_key(backend("e.2", "sgd")) != key  # another optimizer
    assert grouped.group_key(backend("e.3", max_grad_norm=0.0)) != key  # another clipping
    assert grouped.group_key(backend("t.0", expert_cls="transformer")) is None  # does not opt in


def task(x: torch.Tensor, grad: torch.Tensor | None = None, peer: str = "") -> Task:
    return Task([x.clone()], None if grad is None else [grad.clone()], x.shape[0], x.shape[0],
                concurrent.futures.Future(), peer=peer)


@pytest.mark.parametrize("grouping", [True, False])
def test_the_runtime_groups_the_batches_waiting_for_different_experts(grouping):
    n = 5
    backends = {f"e.{i}": backend(f"e.{i}") for i in range(n)}
    reference = [backend(f"e.{i}") for i in range(n)]
    runtime = Runtime(backends, max_batch_tokens=4096, max_queued_tokens=4096, batching=True,
                      grouping=grouping)
    generator = torch.Generator().manual_seed(3)
    xs, gs = rows_of(n, generator), rows_of(n, generator)
    forwards = [runtime.submit(f"e.{i}", task(x[0])) for i, x in enumerate(xs)]
    backwards = [runtime.submit(f"e.{i}", task(x[0], g[0])) for i, (x, g) in enumerate(zip(xs, gs))]
    runtime.start()
    try:
        for future, b, x in zip(forwards, reference, xs):
            torch.testing.assert_close(future.result(30)[0], b.forward(x)[0], rtol=1e-4, atol=1e-5)
        for future, b, x, g in zip(backwards, reference, xs, gs):
            torch.testing.assert_close(future.result(30)[0], b.backward(x, g)[0], rtol=1e-4, atol=1e-5)
        wait_for(lambda: runtime.num_batches == 2 * n, 30, "every expert's batches counted")
        # grouped: one forward group and one backward group; else a batch per expert and direction
        assert runtime.num_groups == (2 if grouping else 0)
        assert_same_experts(reference, list(backends.values()))
    finally:
        runtime.shutdown(10)


def test_a_member_whose_caller_is_over_its_step_budget_runs_alone_and_does_not_step():
    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    limits = InfluenceLimits(steps_per_minute=6, max_share=1, clock=Clock())  # a burst of 1 step per peer
    backends = {f"e.{i}": backend(f"e.{i}") for i in range(3)}
    limits.charge("e.0", {"greedy": 1})  # its one step spent
    runtime = Runtime(backends, max_batch_tokens=4096, max_queued_tokens=4096, batching=True, grouping=True,
                      influence=limits)
    futures = [runtime.submit(f"e.{i}", task(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN), "greedy"))
               for i in range(3)]
    runtime.start()
    try:
        for future in futures:
            assert future.result(30)[0].shape == (2, HIDDEN)
        wait_for(lambda: runtime.num_batches == 3, 30, "every batch counted")
        assert [backends[f"e.{i}"].version for i in range(3)] == [0, 1, 1]
        assert runtime.num_groups == 1  # e.1 and e.2 together; e.0 alone, answered but not stepped
    finally:
        runtime.shutdown(10)


def test_tasks_submitted_together_to_a_running_runtime_run_as_one_group():
    n = 6
    backends = {f"e.{i}": backend(f"e.{i}") for i in range(n)}
    runtime = Runtime(backends, max_batch_tokens=4096, max_queued_tokens=8, batching=True, grouping=True)
    runtime.start()  # waiting for work: it must not take the first part before the others are queued
    try:
        items = [(f"e.{i}", task(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN))) for i in range(n)]
        items.append(("e.0", task(torch.randn(7, HIDDEN), torch.randn(7, HIDDEN))))  # over e.0's 8 tokens
        items.append(("gone", task(torch.randn(1, HIDDEN))))
        results = runtime.submit_many(items)
        assert [type(r).__name__ for r in results] == ["Future"] * n + ["Overloaded", "Overloaded"]
        assert "limit 8" in str(results[n]) and "no longer served" in str(results[n + 1])
        for future in results[:n]:
            assert future.result(30)[0].shape == (2, HIDDEN)
        wait_for(lambda: runtime.num_batches == n, 30, "every batch counted")
        assert runtime.num_groups == 1
        assert [b.version for b in backends.values()] == [1] * n
    finally:
        runtime.shutdown(10)


def test_an_optimizer_over_other_parameters_keeps_its_expert_out_of_groups():
    module, schema = create_expert("ffn", uid="e.9", hidden_dim=HIDDEN, inner_dim=2 * HIDDEN)
    reordered = ExpertBackend("e.9", module=module, input_schema=schema, device=torch.device("cpu"),
                              make_optimizer=lambda params: torch.optim.Adam(list(reversed(params)), lr=1e-2),
                              expert_cls="ffn", optimizer_name="adam", max_grad_norm=1.0,
                              max_batch_tokens=4096)
    assert grouped.group_key(reordered) is None


def test_a_group_that_raises_fails_its_callers_alone_and_the_runtime_goes_on(monkeypatch):
    """A fault in the group's call (here the stacked call raising, as a device error would) fails every
    member's callers with it, steps nobody, and the runtime serves the next calls."""
    backends = {f"e.{i}": backend(f"e.{i}") for i in range(3)}
    runtime = Runtime(backends, max_batch_tokens=4096, max_queued_tokens=4096, batching=True, grouping=True)
    working = grouped._stacked_call

    def broken(template, names):
        def call(*args):
            raise RuntimeError("device lost")
        return call

    monkeypatch.setattr(grouped, "_stacked_call", broken)
    futures = [runtime.submit(f"e.{i}", task(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)))
               for i in range(3)]
    runtime.start()
    try:
        for future in futures:
            with pytest.raises(RuntimeError, match="device lost"):
                future.result(30)
        assert runtime.num_groups == 1 and [b.version for b in backends.values()] == [0, 0, 0]
        assert all(b.settled.is_set() and not b.lock.locked() for b in backends.values())
        monkeypatch.setattr(grouped, "_stacked_call", working)
        later = runtime.submit_many([(f"e.{i}", task(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)))
                                     for i in range(3)])
        for future in later:
            assert future.result(30)[0].shape == (2, HIDDEN)
        wait_for(lambda: [b.version for b in backends.values()] == [1, 1, 1], 30, "the later group's steps")
    finally:
        runtime.shutdown(10)
