"""Grouped execution beside other threads: a state read of an expert while its group runs, two runtimes of
one process taking their first grouped backward of one kind at once, and experts built on several threads
at once (each must still get the weights its uid's seed gives)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from pooled_experts import HIDDEN, backend

from dmoe.core.experts import create_expert
from dmoe.node import grouped
from dmoe.node.averaging import blend
from dmoe.node.pool import Pool

pytestmark = pytest.mark.timeout(60)


def test_an_experts_state_read_while_its_group_forwards_is_its_own_parameters():
    """A runtime thread runs forward groups of two experts while this thread reads the first one's state
    (what a state export, a checkpoint and a replica blend do, under its lock). A group's call ran the
    first member's own module with the stacked parameters put in for the call, so reads raised (vmap's
    "escaped" tensors) or saw the stack; now every read is the expert's parameters."""
    a, b = backend("ffn.0", lr=2.1e-3), backend("ffn.1", lr=2.1e-3)
    assert grouped.group_key(a) == grouped.group_key(b) is not None
    truth, _ = a.state_tensors(optimizer=False)
    inputs = [[torch.randn(16, HIDDEN)], [torch.randn(16, HIDDEN)]]
    expected = [a.forward(inputs[0]), b.forward(inputs[1])]
    stop, groups, failures = threading.Event(), [0], []

    def runtime() -> None:
        try:
            while not stop.is_set():
                outputs = grouped.forward([a, b], inputs)
                for got, want in zip(outputs, expected):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                groups[0] += 1
        except BaseException as error:  # reported by the test's thread
            failures.append(error)

    thread = threading.Thread(target=runtime, daemon=True)
    thread.start()
    theirs = {name.removeprefix("module."): value for name, value in truth.items()}
    schema = {name: (tuple(t.shape), "float32") for name, t in truth.items()}
    try:
        deadline = time.monotonic() + 20
        reads = 0
        while (reads < 300 or groups[0] < 50) and time.monotonic() < deadline and not failures:
            got, _ = a.state_tensors(optimizer=False)
            assert got.keys() == truth.keys()
            for name in truth:
                torch.testing.assert_close(got[name], truth[name], rtol=0, atol=0, msg=name)
            assert a.state_schema(optimizer=False) == schema
            blend(a, theirs, max_distance=1.0)  # its own values: the blend changes nothing
            reads += 1
    finally:
        stop.set()
        thread.join(10)
    assert not failures, failures
    assert reads >= 300 and groups[0] >= 50


def test_two_runtimes_first_grouped_backwards_of_one_kind_do_not_wait_on_each_other(monkeypatch):
    """Two runtimes of one process (two in-process nodes hosting the same uids) each run the first grouped
    backward of a kind of expert not pooled yet. Each holds its members' locks and pools the process's
    other experts of that kind, which are the other runtime's members. Both are held at that point
    together: each then took the other's locks and waited forever; now a held lock is skipped (that expert
    is pooled when it next runs) and both complete."""
    together = threading.Barrier(2, timeout=10)
    reserve = Pool.reserve

    def reserve_together(self, count):  # both runtimes hold their own members' locks here
        together.wait()
        return reserve(self, count)

    monkeypatch.setattr(Pool, "reserve", reserve_together)
    runtimes = [[backend(f"ffn.{i}", lr=2.2e-3) for i in range(2)] for _ in range(2)]
    for members in runtimes:
        for member in members:
            grouped.group_key(member)
    x, g = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    answered: list[int] = []
    stepped: list[list[bool]] = []

    def run(members) -> None:
        def reply(answers) -> None:
            answered.append(len(answers))

        stepped.append(grouped.backward(members, [[x]] * 2, [[g]] * 2, reply=reply))

    threads = [threading.Thread(target=run, args=(members,), daemon=True) for members in runtimes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), "the two runtimes wait on each other's locks"
    assert answered == [2, 2] and stepped == [[True, True], [True, True]]
    everyone = [member for members in runtimes for member in members]
    assert all(member.version == 1 and member.pooled is not None for member in everyone)
    assert not any(member.lock.locked() for member in everyone)


def test_experts_built_on_several_threads_at_once_get_the_weights_of_their_seeds():
    """The builds draw from torch's global generator, seeded per uid: built on eight threads at once, each
    expert's weights were drawn partly from another's seed (most builds came out wrong); now each equals
    its build alone."""
    uids = [f"ffn.{i}" for i in range(8)]

    def weights(uid: str) -> list[torch.Tensor]:
        module, _ = create_expert("ffn", uid=uid, hidden_dim=64)
        return [p.detach().clone() for p in module.parameters()]

    alone = {uid: weights(uid) for uid in uids}
    for _ in range(5):
        built: dict[str, list[torch.Tensor]] = {}
        start = threading.Barrier(len(uids), timeout=10)

        def build(uid: str) -> None:
            start.wait()
            built[uid] = weights(uid)

        threads = [threading.Thread(target=build, args=(uid,)) for uid in uids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        wrong = [uid for uid in uids if not all(torch.equal(p, q) for p, q in zip(built[uid], alone[uid]))]
        assert wrong == []
