"""Dispatcher: expert calls from a client, all in flight at once, with deadlines and a quorum.

Calls run on the Swarm's background event loop (uvloop) over one long-lived grpc.aio channel per
endpoint. :meth:`Dispatcher.forward` waits until every token has ``k_min`` answers
(or every call has ended, or ``forward_timeout`` passed), then at most ``timeout_after_k_min``
more for the rest.

Replicas: a forward gets one :class:`ExpertJob` per chosen expert, with the expert's replicas. The
:class:`dmoe.client.balance.ReplicaBalancer` picks the replica expected to finish first (or, for a
big sub-batch, shares it out over several). When a replica fails (error status, broken connection,
bad reply), its rows go at once to another replica of the same expert not yet tried in this step
and not backed off or quarantined (failover); when a measured replica has not answered within
``PATIENCE_FACTOR`` x its expected time (at least ``MIN_PATIENCE``), another replica is asked for
the same rows too, the first answer is used and the other call cancelled (the overtaken replica's
lateness counts as its failure). All of it within the step's deadline: a token loses an expert only
when every replica of it failed or time ran out. Backward takes the calls that answered, so each
part goes to the replica that ran its forward, and nowhere else.

A reply that is malformed, of the wrong shape or dtype, or not finite counts as
a failure of that expert, exactly like an error status or a missed deadline; so does any other
exception of one call (a connection torn down mid-stream): one peer never fails a step.

A call carries the limits its node announced (:class:`dmoe.core.records.ExpertRecord`): a sub-batch of
more tokens than ``max_batch_tokens`` is cut into parts sent concurrently (the call fails if any
part fails), and a request larger than ``max_message_bytes`` goes through the node's
ForwardStream/BackwardStream in chunks instead of one unary message.

Each call's fate goes to ``on_result(call, error)``: None for an answer used, else the error; what
an error means for the endpoint (back-off, quarantine, nothing) is decided in :mod:`dmoe.client.health`.
INVALID_ARGUMENT refusals are reported only once all of a step's calls are in, judged against the
calls that were accepted (:func:`dmoe.client.health.judge_refusals`). A call whose own inputs (or
gradients) are not finite is not sent (:class:`dmoe.client.health.LocalInputError`): the node would
refuse it, and that is this client's fault, not the node's. In a private swarm every call carries the
swarm key's token (:mod:`dmoe.core.auth`).

Spot checks (``spot_check``, a :class:`dmoe.client.spotcheck.SpotChecker`): an answer the forward
uses may also be checked against another replica of its expert, a few of its tokens asked again
there. The check starts once the answer is in, runs beside the step on the same loop, and the
forward never waits for it; its calls are ordinary calls for the balancer and the endpoint health
(a refusal of inputs the checked replica accepted is a disagreement), except that a check call that
times out blames nobody; what a check decides is the checker's (:mod:`dmoe.client.spotcheck`).
:meth:`Dispatcher.close` cancels the checks still in flight before it closes the channels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from dmoe.client.balance import DEFAULT_MAX_TOKENS, ReplicaBalancer
from dmoe.client.channels import ChannelCache
from dmoe.client.health import Late, LocalInputError, is_refusal, judge_refusals, status_code
from dmoe.client.spotcheck import SpotChecker
from dmoe.core.auth import SwarmKey, fullmethod
from dmoe.core.logsafe import printable
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import deserialize, join_chunks, serialize, split_chunks
from dmoe.errors import WireError
from dmoe.proto import expert_pb2 as pb

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20  # largest unary reply this client accepts
DEFAULT_MAX_UNARY_BYTES = 4 << 20  # gRPC's default message limit, for records that do not announce theirs
STREAM_CHUNK_BYTES = 1 << 20
ENVELOPE_BYTES = 64 << 10  # room for the fields around the tensor buffers in a reply
PATIENCE_FACTOR = 4.0  # a replica not answered by this many times its expected time: ask another too
MIN_PATIENCE = 1.0  # seconds; never sooner
SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name


@dataclasses.dataclass(slots=True)
class ExpertCall:
    uid: str
    endpoint: str
    inputs: torch.Tensor  # [n, D], the rows of the tokens sent to this expert
    token_ids: torch.Tensor  # [n], which tokens of the batch they are
    grad_outputs: torch.Tensor | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS  # rows per request; more are cut into concurrent parts
    max_unary_bytes: int = DEFAULT_MAX_UNARY_BYTES  # larger requests use the streams
    tls: bool = False  # the node speaks TLS (a private swarm's)

    @classmethod
    def to(cls, record: ExpertRecord, inputs: torch.Tensor, token_ids: torch.Tensor) -> ExpertCall:
        return cls(record.uid, record.dial_endpoint, inputs, token_ids,
                   max_tokens=record.max_batch_tokens or DEFAULT_MAX_TOKENS,
                   max_unary_bytes=record.max_message_bytes or DEFAULT_MAX_UNARY_BYTES, tls=record.tls)


@dataclasses.dataclass(slots=True)
class ExpertJob:
    """One chosen expert's sub-batch in a forward, and the replicas of the expert that may run it."""
    uid: str
    replicas: list[ExpertRecord]  # those this client may call now (none backed off or quarantined)
    inputs: torch.Tensor  # [n, D]
    token_ids: torch.Tensor  # [n]


@dataclasses.dataclass(slots=True)
class ForwardAnswers:
    """What a forward got: for each answer (job index, rows of the job's sub-batch, the call that
    answered them, its outputs); and counts of jobs (experts) that lost tokens (no replica answered
    for them in time), of jobs cancelled as not needed (hedging), and of calls re-sent to another
    replica (failover after a failure, or a spare after a replica's patience ran out)."""
    parts: list[tuple[int, torch.Tensor, ExpertCall, torch.Tensor]] = dataclasses.field(default_factory=list)
    num_failed: int = 0
    num_unneeded: int = 0
    num_retried: int = 0


@dataclasses.dataclass(eq=False, slots=True)
class _Part:
    """Rows of a job sent together, to one replica (or, after a failure or a missed patience, to another)."""
    job: int
    rows: torch.Tensor
    running: set[asyncio.Task] = dataclasses.field(default_factory=set)
    tried: set[str] = dataclasses.field(default_factory=set)
    done: bool = False
    spared: bool = False  # a spare replica was asked after the first one's patience ran out


@dataclasses.dataclass(eq=False, slots=True)
class _Attempt:
    part: _Part
    call: ExpertCall
    started: float
    patience_at: float  # past it, another replica is asked for the same rows (inf: never)


class Dispatcher:
    """Expert calls on an event loop that runs in another thread (the Swarm's). ``balancer`` picks
    replicas (:class:`dmoe.client.balance.ReplicaBalancer`; the Swarm shares one between its
    dispatchers, so each knows the others' calls in flight)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, compression: int = pb.NONE, *,
                 key: SwarmKey | None = None, max_reply_abs: float = float("inf"),
                 balancer: ReplicaBalancer | None = None):
        self._loop, self.compression, self.key, self.max_reply_abs = loop, compression, key, max_reply_abs
        self.balancer = balancer if balancer is not None else ReplicaBalancer()
        self._channels = ChannelCache()  # (endpoint, tls) -> (channel, methods), least recently used dropped
        self._tls: tuple[grpc.ChannelCredentials, list[tuple[str, str]]] | None = None
        self._checkers: weakref.WeakSet[SpotChecker] = weakref.WeakSet()  # those given to forward()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        """Cancel the spot checks still in flight, then close the channels (the loop belongs to the
        caller)."""
        if self._loop.is_closed():
            return

        async def close() -> None:
            for checker in list(self._checkers):  # their calls use these channels: ended first
                await checker.stop()
            for channel, _ in self._channels.values():
                await channel.close()
            self._channels.clear()

        self.run(close())

    def _stub(self, endpoint: str, tls: bool) -> dict[str, Any]:
        """The endpoint's call objects by method name. Replies arrive as raw bytes and are parsed here:
        grpc's own deserialiser hands None to the caller when a reply does not parse."""
        if (endpoint, tls) not in self._channels:
            options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
            if tls:
                if self.key is None:
                    raise LocalInputError(f"{endpoint} speaks a private swarm's TLS: "
                                          "this client needs its --swarm-key")
                if self._tls is None:
                    from dmoe.core.tls import channel_credentials

                    self._tls = channel_credentials(self.key)
                channel = grpc.aio.secure_channel(endpoint, self._tls[0], options=options + self._tls[1])
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            methods = {
                name: channel.unary_unary(fullmethod(SERVICE, name), request_serializer=_serialize,
                                          response_deserializer=None)
                for name in ("Forward", "Backward")
            } | {
                name: channel.stream_stream(fullmethod(SERVICE, name), request_serializer=_serialize,
                                            response_deserializer=None)
                for name in ("ForwardStream", "BackwardStream")
            }
            self._channels[(endpoint, tls)] = (channel, methods)
        return self._channels[(endpoint, tls)][1]

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self, jobs: list[ExpertJob], *, num_tokens: int, k_min: int, forward_timeout: float,
        timeout_after_k_min: float, on_result: Callable[[ExpertCall, BaseException | None], None],
        enough: int = 0, avoided: Callable[[str, str], bool] | None = None,
        spot_check: SpotChecker | None = None,
    ) -> ForwardAnswers:
        """Run each job (one expert's sub-batch) on its replicas: the balancer's plan first, then
        failover (see the module docstring). ``avoided(endpoint, uid)``: replicas not to fail over
        to (backed off or quarantined now). With ``enough`` > 0 (hedged calls), the forward ends once
        every token has that many answers (or all it can get), and the calls still running are
        cancelled without counting as failures. ``spot_check``: the checker that may check answers
        against other replicas (none: no checks)."""
        if spot_check is not None:
            self._checkers.add(spot_check)
        return self.run(self._forward(jobs, num_tokens, k_min, forward_timeout, timeout_after_k_min,
                                      on_result, enough, avoided, spot_check))

    async def _timed(self, call: ExpertCall, timeout: float) -> torch.Tensor:
        """One forward call (in flight for the balancer from its launch to its end), its time observed
        by the balancer when it answers; not the first call on a new channel, which pays for connecting."""
        tokens = int(call.inputs.shape[0])
        fresh = (call.endpoint, call.tls) not in self._channels
        begun = time.monotonic()
        output = await self._call(call, timeout, backward=False)
        if not fresh:
            self.balancer.observe(call.endpoint, call.uid, tokens, time.monotonic() - begun)
        return output

    async def _check_call(self, record: ExpertRecord, inputs: torch.Tensor, token_ids: torch.Tensor,
                          timeout: float, on_result: Callable[[ExpertCall, BaseException | None], None]
                          ) -> torch.Tensor:
        """A spot check's forward call: in flight for the balancer, its fate reported like any call's
        but a timeout, which blames nobody (the check's time is its own, often shorter than a step's);
        a refusal (INVALID_ARGUMENT) of inputs another replica just accepted is a disagreement."""
        call = ExpertCall.to(record, inputs, token_ids)
        tokens = int(inputs.shape[0])
        self.balancer.begin(call.endpoint, tokens)
        try:
            output = await self._timed(call, timeout)
        except Exception as e:
            _log_failure("spot check", call, e)
            timed_out = isinstance(e, TimeoutError) or status_code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
            if is_refusal(e):
                judge_refusals([(call, e)], True, on_result)
            elif not timed_out:
                on_result(call, e)
            raise
        finally:
            self.balancer.end(call.endpoint, tokens)
        on_result(call, None)
        return output

    async def _forward(self, jobs, num_tokens, k_min, forward_timeout, timeout_after_k_min, on_result,
                       enough, avoided, spot_check):
        started = time.monotonic()
        step_end = started + forward_timeout
        answers = ForwardAnswers()
        failed_at: list[set[str]] = [set() for _ in jobs]  # endpoints that failed a job: not asked again
        running: dict[asyncio.Task, _Attempt] = {}
        parts: list[_Part] = []
        refused: list[tuple[ExpertCall, BaseException]] = []  # INVALID_ARGUMENT: judged once all are in

        def usable(part: _Part) -> list[ExpertRecord]:
            uid = jobs[part.job].uid
            return [r for r in jobs[part.job].replicas
                    if r.dial_endpoint and r.dial_endpoint not in failed_at[part.job]
                    and r.dial_endpoint not in part.tried and not (avoided and avoided(r.dial_endpoint, uid))]

        def launch(part: _Part, record: ExpertRecord, now: float) -> None:
            job = jobs[part.job]
            call = ExpertCall.to(record, job.inputs[part.rows], job.token_ids[part.rows])
            tokens = int(part.rows.shape[0])
            patience = math.inf
            if self.balancer.measured(record.dial_endpoint, job.uid) is not None:
                expected = self.balancer.expected_seconds([record], tokens)[0]
                patience = max(MIN_PATIENCE, PATIENCE_FACTOR * expected)
            self.balancer.begin(call.endpoint, tokens)  # now: the next choices of this step see it
            task = asyncio.create_task(self._timed(call, max(0.001, step_end - now)))
            # ended however it ends (even cancelled before it ran): no longer in flight
            task.add_done_callback(lambda _, endpoint=call.endpoint: self.balancer.end(endpoint, tokens))
            running[task] = _Attempt(part, call, now, now + patience)
            part.running.add(task)
            part.tried.add(record.dial_endpoint)

        def check(part: _Part, call: ExpertCall, output: torch.Tensor) -> None:
            """Maybe spot-check this answer against another replica of its expert (see spot_check)."""
            job = jobs[part.job]
            others = [r for r in job.replicas
                      if r.dial_endpoint and r.dial_endpoint != call.endpoint
                      and r.dial_endpoint not in failed_at[part.job]
                      and not (avoided and avoided(r.dial_endpoint, job.uid))]
            if others and spot_check.wants(job.uid):
                spot_check.start(job.uid, call.endpoint, output, call.inputs, call.token_ids, others,
                                 deadline=step_end, timeout=forward_timeout, clock=time.monotonic,
                                 call=lambda r, x, ids, t: self._check_call(r, x, ids, t, on_result))

        def fail_over(part: _Part, now: float, deadline: float) -> None:
            candidates = usable(part) if now < deadline else []
            if candidates:
                launch(part, self.balancer.rank(candidates, int(part.rows.shape[0]))[0], now)
                answers.num_retried += 1

        now = time.monotonic()
        for index, job in enumerate(jobs):
            whole = _Part(index, torch.arange(job.inputs.shape[0]))
            plan = self.balancer.plan(usable(whole), int(job.inputs.shape[0]))
            if not plan:
                parts.append(whole)  # no replica to ask: lost
            offset = 0
            for record, count in plan:
                part = _Part(index, torch.arange(offset, offset + count))
                offset += count
                parts.append(part)
                launch(part, record, now)

        candidates_T = torch.zeros(num_tokens, dtype=torch.long)
        for job in jobs:
            candidates_T[job.token_ids] += 1
        need_T = candidates_T.clamp(max=k_min)
        enough_T = candidates_T.clamp(max=enough) if enough > 0 else None
        answered_T = torch.zeros(num_tokens, dtype=torch.long)
        quorum_at, satisfied = None, False
        while running:
            now = time.monotonic()
            deadline = step_end if quorum_at is None else min(step_end, quorum_at + timeout_after_k_min)
            if now >= deadline:
                break
            wake = min([deadline] + [a.patience_at for a in running.values() if not a.part.spared])
            done, _ = await asyncio.wait(set(running), timeout=max(0.0, wake - now),
                                         return_when=asyncio.FIRST_COMPLETED)
            now = time.monotonic()
            for task in done:
                attempt = running.pop(task)
                part, call = attempt.part, attempt.call
                part.running.discard(task)
                try:
                    output = task.result()
                except Exception as e:  # whatever went wrong, it is that replica's failure, not the step's
                    _log_failure("forward", call, e)
                    failed_at[part.job].add(call.endpoint)
                    if is_refusal(e):
                        refused.append((call, e))
                    else:
                        on_result(call, e)
                    if not part.done and not part.running and not isinstance(e, LocalInputError):
                        fail_over(part, now, deadline)
                    continue
                on_result(call, None)
                part.done = True
                answers.parts.append((part.job, part.rows, call, output))
                if spot_check is not None:
                    check(part, call, output)
                answered_T[call.token_ids] += 1
                for other in list(part.running):  # a spare asked for the same tokens: not needed now
                    other.cancel()
                    spare = running.pop(other)
                    if now >= spare.patience_at:  # it missed its own deadline: a failure of that replica
                        self.balancer.observe(spare.call.endpoint, call.uid, int(part.rows.shape[0]),
                                              now - spare.started)
                        on_result(spare.call, Late("overtaken by another replica past its patience"))
                part.running.clear()
            for attempt in list(running.values()):  # past its patience: ask another replica too
                part = attempt.part
                if not part.done and not part.spared and now >= attempt.patience_at:
                    part.spared = True
                    fail_over(part, now, deadline)
            if enough_T is not None and bool((answered_T >= enough_T).all()):
                satisfied = True  # every token has its k answers: the spares still running are not needed
                break
            if quorum_at is None and bool((answered_T >= need_T).all()):
                quorum_at = time.monotonic()
        now = time.monotonic()
        cut = {id(a.part) for a in running.values()}
        for task, attempt in running.items():  # late: dropped, a failure of its replica (unless hedged away)
            task.cancel()
            if not satisfied:
                self.balancer.observe(attempt.call.endpoint, attempt.call.uid,
                                      int(attempt.part.rows.shape[0]), now - attempt.started)
                on_result(attempt.call, Late("no answer within the forward's deadline"))
        judge_refusals(refused, bool(answers.parts), on_result)
        for index in range(len(jobs)):
            undone = [p for p in parts if p.job == index and not p.done]
            if not undone:
                continue
            if satisfied and all(id(p) in cut for p in undone):
                answers.num_unneeded += 1
            else:
                answers.num_failed += 1
        return answers

    # ---- backward -----------------------------------------------------------------------------
    def backward(
        self, calls: list[ExpertCall], *, backward_timeout: float,
        on_result: Callable[[ExpertCall, BaseException | None], None]
    ) -> dict[int, torch.Tensor]:
        """Input gradients of the calls that answered in time and well, by index in ``calls``."""
        return self.run(self._backward(calls, backward_timeout, on_result))

    async def _call(self, call: ExpertCall, timeout: float, *, backward: bool) -> torch.Tensor:
        """Outputs (or input gradients) of one expert call, cut into parts of at most max_tokens rows."""
        step = max(1, call.max_tokens)
        if call.inputs.shape[0] <= step:
            return await self._call_part(call, call.inputs, call.grad_outputs, timeout, backward)
        tasks = [
            asyncio.ensure_future(self._call_part(
                call, call.inputs[start:start + step],
                None if call.grad_outputs is None else call.grad_outputs[start:start + step],
                timeout, backward,
            ))
            for start in range(0, call.inputs.shape[0], step)
        ]
        try:
            return torch.cat(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one part failed: the others are of no use
                task.cancel()

    async def _call_part(self, call: ExpertCall, inputs: torch.Tensor, grad_outputs: torch.Tensor | None,
                         timeout: float, backward: bool) -> torch.Tensor:
        stub = self._stub(call.endpoint, call.tls)
        if not bool(torch.isfinite(inputs).all()) or (grad_outputs is not None
                                                       and not bool(torch.isfinite(grad_outputs).all())):
            raise LocalInputError(f"this client's {'gradients' if backward else 'inputs'} for {call.uid} "
                                  "are not finite (has the model diverged?); not sent")
        encoded = [serialize(inputs, self.compression)]
        if backward:
            assert grad_outputs is not None
            request = pb.BackwardRequest(uid=call.uid, inputs=encoded, reply_compression=self.compression,
                                         grad_outputs=[serialize(grad_outputs, self.compression)])
        else:
            request = pb.ForwardRequest(uid=call.uid, inputs=encoded, reply_compression=self.compression)
        unary = request.ByteSize() <= call.max_unary_bytes
        name = ("Backward" if backward else "Forward") + ("" if unary else "Stream")
        metadata = self.key.call_metadata(fullmethod(SERVICE, name)) if self.key is not None else None
        if unary:
            data = await stub[name](request, timeout=timeout, metadata=metadata)
        else:
            # a chunk is a message too: it must fit the node's message limit
            chunk_bytes = max(1, min(STREAM_CHUNK_BYTES, call.max_unary_bytes // 2))
            replies = stub[name](split_chunks(request.SerializeToString(), chunk_bytes), timeout=timeout,
                                 metadata=metadata)
            data = await join_chunks(_parsed_chunks(replies), max_bytes=inputs.numel() * 8 + ENVELOPE_BYTES)
        reply_cls = pb.BackwardResponse if backward else pb.ForwardResponse
        try:
            reply = reply_cls.FromString(data)
        except DecodeError as e:
            raise WireError(f"undecodable {reply_cls.__name__}: {e}") from None
        return _checked(reply.grad_inputs if backward else reply.outputs, inputs, self.max_reply_abs)

    async def _backward(self, calls, backward_timeout, on_result):
        replies = await asyncio.gather(*(self._call(c, backward_timeout, backward=True) for c in calls),
                                       return_exceptions=True)
        results = {}
        refused: list[tuple[ExpertCall, BaseException]] = []
        for index, (call, reply) in enumerate(zip(calls, replies)):
            if isinstance(reply, Exception):
                _log_failure("backward", call, reply)
                if is_refusal(reply):
                    refused.append((call, reply))
                else:
                    on_result(call, reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                on_result(call, None)
                results[index] = reply
        judge_refusals(refused, bool(results), on_result)
        return results


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


async def _parsed_chunks(replies: AsyncIterator[bytes]) -> AsyncIterator[pb.Chunk]:
    async for data in replies:
        try:
            yield pb.Chunk.FromString(data)
        except DecodeError as e:
            raise WireError(f"undecodable Chunk: {e}") from None


def _log_failure(what: str, call: ExpertCall, error: Exception) -> None:
    """An error status, a deadline or a bad reply is a peer's expected failure (debug); anything else
    (a broken connection's OSError, a bug) is logged louder, and is still only that expert's failure.
    UNAUTHENTICATED is loud too: it is almost always this client's key or clock."""
    code = status_code(error)
    expected = isinstance(error, (grpc.RpcError, ValueError)) and code != grpc.StatusCode.UNAUTHENTICATED
    hint = (" (is this client's --swarm-key the swarm's, and its clock right?)"
            if code == grpc.StatusCode.UNAUTHENTICATED else "")
    logger.log(logging.DEBUG if expected else logging.WARNING, "%s to %s at %s failed: %s: %s%s", what,
               printable(call.uid), printable(call.endpoint), type(error).__name__, printable(error), hint)


def _checked(tensors, like: torch.Tensor, max_abs: float = float("inf")) -> torch.Tensor:
    """The one reply tensor, if it has the shape and dtype of ``like`` and finite values no larger
    than ``max_abs`` in magnitude (else ValueError)."""
    if len(tensors) != 1:
        raise ValueError(f"expected 1 tensor in the reply, got {len(tensors)}")
    tensor = deserialize(tensors[0], max_numel=like.numel())
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise ValueError(f"reply of shape {list(tensor.shape)} {tensor.dtype}, "
                         f"expected {list(like.shape)} {like.dtype}")
    largest = float(tensor.abs().max()) if tensor.numel() else 0.0
    if not math.isfinite(largest):
        raise ValueError("reply holds NaN or Inf")
    if largest > max_abs:
        raise ValueError(f"reply holds {largest:.3g}, above max_reply_abs={max_abs:g}")
    return tensor
