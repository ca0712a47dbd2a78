"""What a step's calls cost the client per part, in-process against a real gRPC stand-in of a node
(tests/support/counting_server.py, answering packed calls with zeros): the requests of a step to one node
are futures in its queue, awaited without a task each, so a step through many experts of a node makes
as many tasks as a step through few; and the helper that awaits a backward's calls gives what
``asyncio.gather(..., return_exceptions=True)`` gives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import uvloop
from counting_server import CountingServer

from dmoe.client.dispatch import Dispatcher, ExpertCall, ExpertJob
from dmoe.client.health import LocalInputError
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(60)
HIDDEN, TOKENS = 4, 16


def zeros_reply(request: pb.PackedRequest) -> bytes:
    """A node's packed reply: every part answered, with zeros of its rows (forward or backward)."""
    inputs = deserialize(request.inputs, max_numel=1 << 20)
    parts = len(request.uids)
    return pb.PackedReply(codes=[0] * parts, messages=[""] * parts,
                          outputs=serialize(torch.zeros_like(inputs))).SerializeToString()


@pytest.fixture(scope="module")
def node():
    server = CountingServer(batched=True, packed=zeros_reply).start()
    yield server
    server.shutdown()


@contextmanager
def counting_dispatcher() -> Iterator[tuple[Dispatcher, list[int]]]:
    """A Dispatcher on a uvloop of its own in a thread, and the count of tasks made on that loop."""
    loop = uvloop.new_event_loop()
    made = [0]

    def factory(loop: asyncio.AbstractEventLoop, coroutine, **kwargs) -> asyncio.Task:
        made[0] += 1
        return asyncio.Task(coroutine, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop)
    try:
        yield dispatcher, made
    finally:
        dispatcher.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def step(dispatcher: Dispatcher, made: list[int], endpoint: str, experts: int) -> tuple[int, int]:
    """A forward of TOKENS tokens through ``experts`` experts of the node (two tokens each, k=2), then a
    backward of every answer: the tasks each made, after checking what they returned."""
    jobs = []
    for e in range(experts):
        token_ids = torch.tensor([e % TOKENS, (e + 1) % TOKENS])
        jobs.append(ExpertJob(f"ffn.{e}", [ExpertRecord(uid=f"ffn.{e}", endpoint=endpoint, node_id="n")],
                              torch.randn(2, HIDDEN), token_ids))
    fates: list[BaseException | None] = []
    before = made[0]
    answers = dispatcher.forward(jobs, num_tokens=TOKENS, k_min=1, forward_timeout=30, timeout_after_k_min=30,
                                 on_result=lambda call, error: fates.append(error))
    forward_tasks = made[0] - before
    assert answers.num_failed == 0 and fates == [None] * experts
    assert sorted(call.uid for _, _, call, _ in answers.parts) == sorted(job.uid for job in jobs)
    assert all(output.shape == (2, HIDDEN) and not output.any() for *_, output in answers.parts)
    calls = [ExpertCall(call.uid, call.endpoint, call.inputs, call.token_ids, torch.ones(2, HIDDEN))
             for _, _, call, _ in answers.parts]
    before = made[0]
    grads = dispatcher.backward(calls, backward_timeout=30, on_result=lambda call, error: fates.append(error))
    backward_tasks = made[0] - before
    assert sorted(grads) == list(range(experts)) and fates == [None] * (2 * experts)
    assert all(grad.shape == (2, HIDDEN) and not grad.any() for grad in grads.values())
    return forward_tasks, backward_tasks


def test_a_step_makes_as_many_tasks_through_many_experts_of_a_node_as_through_few(node):
    """After a first step (which connects), a step through 64 experts of one node makes exactly the tasks a
    step through 2 makes (the forward's own, the node's packed call's): none per expert; each direction is
    one packed call."""
    with counting_dispatcher() as (dispatcher, made):
        step(dispatcher, made, node.endpoint, 2)  # connects
        node.methods.clear()
        few = step(dispatcher, made, node.endpoint, 2)
        many = step(dispatcher, made, node.endpoint, 64)
    assert node.methods == {"ForwardPacked": 2, "BackwardPacked": 2}
    assert many == few


def test_a_call_whose_inputs_are_not_finite_fails_alone_without_being_sent(node):
    """One expert's inputs hold a NaN: that call fails with LocalInputError (this client's fault, sent to
    nobody), the other expert of the same node is answered in the node's packed call."""
    with counting_dispatcher() as (dispatcher, made):
        step(dispatcher, made, node.endpoint, 2)  # connects
        node.calls.clear()
        bad = torch.randn(2, HIDDEN)
        bad[1, 0] = float("nan")
        jobs = [ExpertJob(uid, [ExpertRecord(uid=uid, endpoint=node.endpoint, node_id="n")], inputs,
                          torch.tensor([0, 1]))
                for uid, inputs in (("ffn.bad", bad), ("ffn.good", torch.randn(2, HIDDEN)))]
        fates: dict[str, BaseException | None] = {}
        answers = dispatcher.forward(jobs, num_tokens=2, k_min=1, forward_timeout=30, timeout_after_k_min=30,
                                     on_result=lambda call, error: fates.__setitem__(call.uid, error))
    assert isinstance(fates["ffn.bad"], LocalInputError) and fates["ffn.good"] is None
    assert [call.uid for _, _, call, _ in answers.parts] == ["ffn.good"] and answers.num_failed == 1
    assert dict(node.calls) == {"ffn.good": 1}
