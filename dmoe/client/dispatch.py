"""Dispatcher: expert calls from a client, all in flight at once, with deadlines and a quorum.

Calls run on the Swarm's background event loop (uvloop by default) over one long-lived grpc.aio channel per
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
refuse it, and that is this client's fault, not the node's. Both checks look at many tensors in one
torch op (a step's inputs, or its gradients; a batched reply's parts), and call by call only when that
finds a bad value: on a busy machine every small torch op costs, and a step makes hundreds of calls.
In a private swarm every call carries the swarm key's token (:mod:`dmoe.core.auth`).

One call per node (``batch_per_node``, on unless :class:`dmoe.client.config.SwarmConfig` says
otherwise): the requests of one step to one node go in one call (ForwardBatch, BackwardBatch, or
their streams above the message limit). Each request is made and awaited as before, but instead of
its own call it waits in a queue per (endpoint, direction) that is sent at the end of the event
loop's turn, so everything launched in one turn (a forward's calls, a backward's, the replicas a
failover picks at once) leaves as one call per node; a request alone in its turn goes as its own
per-expert call. The reply is split back: each request gets its outputs, or the status its own
call would have ended with (:class:`PartFailed`, an RpcError), and everything above (deadlines,
quorum, failover, health, spot checks) sees exactly what it saw with a call per expert. A request
cancelled (a spare overtaken, a deadline) stops waiting; the call is cancelled once none of its
requests waits for it. The time of a batched call is observed for each part in proportion to its
tokens (the balancer's model: seconds per token of the node). A node that answers UNIMPLEMENTED to
the batched call (one older than it) gets the same requests as per-expert calls at once, and only
those for ``UNBATCHED_RECHECK`` seconds.

Packed calls (``packed_calls``, on by default): where the requests of such a call have rows of one shape
and dtype (a RemoteMoE's always do) and compression is not 8-bit (its codebook would span them), their
rows go in one tensor with the uids and row counts beside it (ForwardPacked, BackwardPacked: no message
per request, one encoding and one decoding for all), and the reply carries each request's status and
the outputs of those that succeeded in one tensor; what each request sees is as above. Above the node's
message limit, or to a node that answers UNIMPLEMENTED (then for ``UNBATCHED_RECHECK`` seconds), they go
in the batched call.

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

from dmoe.client import channels
from dmoe.client.balance import DEFAULT_MAX_TOKENS, ReplicaBalancer
from dmoe.client.channels import ChannelCache
from dmoe.client.health import Late, LocalInputError, describe, is_refusal, judge_refusals, status_code
from dmoe.client.spotcheck import SpotChecker
from dmoe.core.auth import SwarmKey, fullmethod
from dmoe.core.futures import all_settled
from dmoe.core.logsafe import printable
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import deserialize, deserialize_plain, join_chunks, serialize, split_chunks
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
MAX_BATCH_PARTS = 1024  # parts per batched call; a node refuses more (dmoe.node.service.MAX_BATCH_PARTS)
UNBATCHED_RECHECK = 600.0  # seconds a node without the batched calls gets per-expert calls only
MAX_UNBATCHED = 10_000  # such nodes (and those known to have them) remembered; the oldest forgotten first
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


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


class PartFailed(grpc.RpcError):
    """One part of a batched call failed on the node: the status its own call would have ended with.
    An RpcError like that call's (``code()``, ``details()``), so that health and the logs treat it alike."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Lacking(dict[tuple[str, bool], float]):
    """Nodes (endpoint, tls) found without a kind of call (they answered UNIMPLEMENTED), each by when: for
    UNBATCHED_RECHECK seconds they get the older calls, then they are asked again (they may have been
    upgraded); past MAX_UNBATCHED nodes the oldest is forgotten."""

    def lacks(self, endpoint: str, tls: bool) -> bool:
        found = self.get((endpoint, tls))
        if found is None:
            return False
        if time.monotonic() - found < UNBATCHED_RECHECK:
            return True
        del self[endpoint, tls]
        return False

    def found(self, endpoint: str, tls: bool, what: str, error: grpc.RpcError) -> None:
        logger.info("%s has no %s (%s): older calls for %.0fs", printable(endpoint), what,
                    printable(describe(error)), UNBATCHED_RECHECK)
        self[endpoint, tls] = time.monotonic()
        if len(self) > MAX_UNBATCHED:
            del self[next(iter(self))]


@dataclasses.dataclass(eq=False, slots=True)
class _Queued:
    """A request waiting for its node's batched call."""
    call: ExpertCall
    request: pb.ForwardRequest | pb.BackwardRequest | None  # made when needed (a packed call needs none)
    like: torch.Tensor  # the inputs sent: the reply has their shape and dtype
    grads: torch.Tensor | None  # the output gradients sent (backward)
    deadline: float  # loop time
    future: asyncio.Future
    shares: list[float] | None  # gets the part's share of the call's tokens


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
                 balancer: ReplicaBalancer | None = None, batch_per_node: bool = True,
                 packed_calls: bool = True):
        self._loop, self.compression, self.key, self.max_reply_abs = loop, compression, key, max_reply_abs
        self.batch_per_node = batch_per_node  # one call per node for the requests of one loop turn
        self.packed_calls = packed_calls  # that call with the requests' rows in one tensor, where it can
        # (endpoint, tls, backward) -> requests waiting for the end of the loop's turn
        self._queued: dict[tuple[str, bool, bool], list[_Queued]] = {}
        self._sending: set[asyncio.Task] = set()  # calls sent for queued requests
        self._unbatched = _Lacking()  # nodes without batched calls
        self._batched: dict[tuple[str, bool], None] = {}  # nodes that answered a batched call (in order)
        self._unpacked = _Lacking()  # nodes without packed calls
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
            for task in list(self._sending):
                task.cancel()
            for channel, _ in self._channels.values():
                await channel.close()
            self._channels.clear()

        self.run(close())

    def _stub(self, endpoint: str, tls: bool) -> dict[str, Any]:
        """The endpoint's call objects by method name. Replies arrive as raw bytes and are parsed here:
        grpc's own deserialiser hands None to the caller when a reply does not parse."""
        if (endpoint, tls) not in self._channels:
            options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                       ("grpc.client_idle_timeout_ms", int(channels.CHANNEL_IDLE_S * 1000))]
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
            } | {  # batched requests are framed here, as bytes
                name: channel.unary_unary(fullmethod(SERVICE, name), request_serializer=None,
                                          response_deserializer=None)
                for name in ("ForwardBatch", "BackwardBatch", "ForwardPacked", "BackwardPacked")
            } | {
                name: channel.stream_stream(fullmethod(SERVICE, name), request_serializer=_serialize,
                                            response_deserializer=None)
                for name in ("ForwardStream", "BackwardStream", "ForwardBatchStream", "BackwardBatchStream")
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

    async def _timed(self, call: ExpertCall, timeout: float, finite: bool = False) -> torch.Tensor:
        """A spot check's forward call, its time observed by the balancer when it answers; not the first
        call on a new channel, which pays for connecting (a step's own calls are timed alike by the
        forward, without a coroutine each). ``finite``: its inputs are known to be finite."""
        tokens = int(call.inputs.shape[0])
        fresh = (call.endpoint, call.tls) not in self._channels
        begun = time.monotonic()
        shares: list[float] = []  # of the batched calls it went in (none: calls of its own)
        output = await self._call(call, timeout, backward=False, shares=shares, finite=finite)
        if not fresh:
            share = min(1.0, sum(shares)) if shares else 1.0
            self.balancer.observe(call.endpoint, call.uid, tokens, (time.monotonic() - begun) * share)
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
        failed_at: dict[int, set[str]] = {}  # by job: endpoints that failed it, not asked again
        running: dict[asyncio.Future, _Attempt] = {}  # each call in flight (its future) and its attempt
        finished: list[asyncio.Future] = []  # calls of ``running`` that ended since the forward last looked
        waiter: list[asyncio.Future] = []  # what the forward awaits: set by the first call to end
        parts: list[_Part] = []
        refused: list[tuple[ExpertCall, BaseException]] = []  # INVALID_ARGUMENT: judged once all are in

        def usable(part: _Part) -> list[ExpertRecord]:
            uid = jobs[part.job].uid
            return [r for r in jobs[part.job].replicas
                    if r.dial_endpoint and r.dial_endpoint not in failed_at.get(part.job, ())
                    and r.dial_endpoint not in part.tried and not (avoided and avoided(r.dial_endpoint, uid))]

        def launch(part: _Part, record: ExpertRecord, now: float) -> None:
            job = jobs[part.job]
            tokens = int(part.rows.shape[0])
            if tokens == job.inputs.shape[0]:  # all of the job's rows (0, 1, ...): its own tensors
                call = ExpertCall.to(record, job.inputs, job.token_ids)
            else:
                call = ExpertCall.to(record, job.inputs[part.rows], job.token_ids[part.rows])
            expected = self.balancer.expected_if_measured(record.dial_endpoint, job.uid, record, tokens)
            patience = math.inf if expected is None else max(MIN_PATIENCE, PATIENCE_FACTOR * expected)
            self.balancer.begin(call.endpoint, tokens)  # now: the next choices of this step see it
            # one future per call: a request's own in its node's batched call (no task), else its task;
            # in flight for the balancer from now to its end, its time observed when it answers (not
            # the first call on a new channel, which pays for connecting)
            fresh = (call.endpoint, call.tls) not in self._channels
            shares: list[float] = []  # of the batched calls it went in (none: calls of its own)
            future = self._start(call, max(0.001, step_end - now), False, shares, finite)
            begun = time.monotonic()
            attempt = _Attempt(part, call, now, now + patience)

            def ended(future: asyncio.Future) -> None:  # however it ends (even cancelled before it ran)
                seconds = None
                if not fresh and not future.cancelled() and future.exception() is None:
                    seconds = (time.monotonic() - begun) * (min(1.0, sum(shares)) if shares else 1.0)
                self.balancer.end(call.endpoint, tokens, uid=call.uid, seconds=seconds)
                if running.get(future) is attempt:
                    finished.append(future)
                    if waiter and not waiter[0].done():
                        waiter[0].set_result(None)

            future.add_done_callback(ended)
            running[future] = attempt
            part.running.add(future)
            part.tried.add(record.dial_endpoint)

        def check(part: _Part, call: ExpertCall, output: torch.Tensor) -> None:
            """Maybe spot-check this answer against another replica of its expert (see spot_check)."""
            job = jobs[part.job]
            others = [r for r in job.replicas
                      if r.dial_endpoint and r.dial_endpoint != call.endpoint
                      and r.dial_endpoint not in failed_at.get(part.job, ())
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

        finite = _all_finite([job.inputs for job in jobs])  # else each call checks its own (and is not sent)
        now = time.monotonic()
        # each job's rows 0, 1, ...: one tensor for the jobs of one size (an arange per job costs more)
        ramps: dict[int, torch.Tensor] = {}
        for index, job in enumerate(jobs):
            tokens = int(job.inputs.shape[0])
            ramp = ramps.get(tokens)
            if ramp is None:
                ramp = ramps[tokens] = torch.arange(tokens)
            whole = _Part(index, ramp)
            plan = self.balancer.plan(usable(whole), tokens)
            if not plan:
                parts.append(whole)  # no replica to ask: lost
            offset = 0
            for record, count in plan:  # one replica for all the rows (the usual case): the whole part
                part = whole if count == tokens else _Part(index, torch.arange(offset, offset + count))
                offset += count
                parts.append(part)
                launch(part, record, now)

        candidates_T = _token_counts([job.token_ids for job in jobs], num_tokens)
        need_T = candidates_T.clamp(max=k_min)
        enough_T = candidates_T.clamp(max=enough) if enough > 0 else None
        answered_T = torch.zeros(num_tokens, dtype=torch.long)
        quorum_at, satisfied = None, False
        loop = asyncio.get_running_loop()
        while running:
            now = time.monotonic()
            deadline = step_end if quorum_at is None else min(step_end, quorum_at + timeout_after_k_min)
            if now >= deadline:
                break
            patience_at = min((a.patience_at for a in running.values() if not a.part.spared),
                              default=math.inf)
            # until a call ends (its callback sets the waiter), the deadline, or a patience runs out
            waiter[:] = [loop.create_future()]
            timer = loop.call_later(max(0.0, min(deadline, patience_at) - now), _release, waiter[0])
            try:
                await waiter[0]
            finally:
                timer.cancel()
            now = time.monotonic()
            answered_ids = []  # token ids of the answers of this wake-up, counted at once
            done, finished[:] = finished[:], []
            for task in done:
                attempt = running.pop(task, None)
                if attempt is None:  # already dropped (a spare overtaken in this wake-up)
                    continue
                part, call = attempt.part, attempt.call
                part.running.discard(task)
                try:
                    output = task.result()
                except Exception as e:  # whatever went wrong, it is that replica's failure, not the step's
                    _log_failure("forward", call, e)
                    failed_at.setdefault(part.job, set()).add(call.endpoint)
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
                answered_ids.append(call.token_ids)
                for other in list(part.running):  # a spare asked for the same tokens: not needed now
                    other.cancel()
                    spare = running.pop(other)
                    if now >= spare.patience_at:  # it missed its own deadline: a failure of that replica
                        self.balancer.observe(spare.call.endpoint, call.uid, int(part.rows.shape[0]),
                                              now - spare.started)
                        on_result(spare.call, Late("overtaken by another replica past its patience"))
                part.running.clear()
            if answered_ids:
                answered_T += _token_counts(answered_ids, num_tokens)
            for attempt in list(running.values()) if now >= patience_at else ():  # past its patience:
                part = attempt.part  # ask another replica too (a call launched since has patience left)
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
        running.clear()
        judge_refusals(refused, bool(answers.parts), on_result)
        undone_of: dict[int, list[_Part]] = {}  # the parts of each job left without an answer
        for part in parts:
            if not part.done:
                undone_of.setdefault(part.job, []).append(part)
        for undone in undone_of.values():
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

    def _start(self, call: ExpertCall, timeout: float, backward: bool, shares: list[float] | None = None,
               finite: bool = False) -> asyncio.Future:
        """:meth:`_call` started: the future of its outputs (cancelling it cancels the call). A call of one
        request to a node it already talks to in batched calls is that request's own future in the node's
        queue (no task, no coroutine: a step has hundreds of them); anything else runs :meth:`_call` in a
        task."""
        if (self.batch_per_node and int(call.inputs.shape[0]) <= max(1, call.max_tokens)
                and (call.endpoint, call.tls) in self._channels and self._batching(call.endpoint, call.tls)):
            try:
                _check_finite(call, call.inputs, call.grad_outputs, backward, finite)
            except LocalInputError as e:
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(e)
                return failed
            return self._enqueue(call, call.inputs, call.grad_outputs, timeout, backward, shares)
        return asyncio.ensure_future(self._call(call, timeout, backward=backward, shares=shares,
                                                finite=finite))

    async def _call(self, call: ExpertCall, timeout: float, *, backward: bool,
                    shares: list[float] | None = None, finite: bool = False) -> torch.Tensor:
        """Outputs (or input gradients) of one expert call, cut into parts of at most max_tokens rows:
        each part queued for its node's batched call (``batch_per_node``), or sent as a call of its
        own, all concurrently (the call fails if any part fails). ``shares`` gets, for each part
        that went in a batched call, its share of that call's tokens. ``finite``: the call's inputs (and
        gradients) are known to be finite, not checked again."""
        if (call.endpoint, call.tls) not in self._channels:
            self._stub(call.endpoint, call.tls)  # a TLS node without this client's key: LocalInputError
        step, rows = max(1, call.max_tokens), int(call.inputs.shape[0])
        starts = range(0, rows, step) if rows > step else [0]
        pieces = [(call.inputs[start:start + step] if rows > step else call.inputs,
                   None if call.grad_outputs is None
                   else call.grad_outputs[start:start + step] if rows > step else call.grad_outputs)
                  for start in starts]
        batched = self.batch_per_node and self._batching(call.endpoint, call.tls)
        if batched:  # each request made if its batched call needs it (a packed call does not)
            for inputs, grads in pieces:
                _check_finite(call, inputs, grads, backward, finite)
            waits = [self._enqueue(call, inputs, grads, timeout, backward, shares)
                     for inputs, grads in pieces]
        else:
            requests = [self._request(call, inputs, grads, backward, finite) for inputs, grads in pieces]
            if len(requests) == 1:
                return await self._send(call, requests[0], pieces[0][0], timeout, backward)
            waits = [asyncio.ensure_future(self._send(call, request, inputs, timeout, backward))
                     for request, (inputs, _) in zip(requests, pieces)]
        if len(waits) == 1:  # the usual case: its answer awaited as it is (gathering one costs a future)
            try:
                return await waits[0]
            finally:
                waits[0].cancel()
        try:
            outputs = await asyncio.gather(*waits)
        finally:
            for wait in waits:  # one part failed: the others are of no use
                wait.cancel()
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _request(self, call: ExpertCall, inputs: torch.Tensor, grad_outputs: torch.Tensor | None,
                 backward: bool, finite: bool = False) -> pb.ForwardRequest | pb.BackwardRequest:
        """The request of one part of a call; LocalInputError (nothing sent) if its values are not finite
        (not checked again if known to be)."""
        _check_finite(call, inputs, grad_outputs, backward, finite)
        encoded = [serialize(inputs, self.compression)]
        if backward:
            assert grad_outputs is not None
            return pb.BackwardRequest(uid=call.uid, inputs=encoded, reply_compression=self.compression,
                                      grad_outputs=[serialize(grad_outputs, self.compression)])
        return pb.ForwardRequest(uid=call.uid, inputs=encoded, reply_compression=self.compression)

    async def _send(self, call: ExpertCall, request: pb.ForwardRequest | pb.BackwardRequest,
                    inputs: torch.Tensor, timeout: float, backward: bool) -> torch.Tensor:
        """One part of a call in a call of its own: unary, or streamed above the node's message limit."""
        stub = self._stub(call.endpoint, call.tls)
        unary = request.ByteSize() <= call.max_unary_bytes
        name = ("Backward" if backward else "Forward") + ("" if unary else "Stream")
        metadata = self._metadata(name)
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

    # ---- one call per node ------------------------------------------------------------------------
    def _metadata(self, method: str) -> tuple[tuple[str, str]] | None:
        """A private swarm's token for one call of ``method``."""
        return self.key.call_metadata(fullmethod(SERVICE, method)) if self.key is not None else None

    def _remember_batched(self, endpoint: str, tls: bool) -> None:
        """The node answered a batched call: its batched streams may be used."""
        self._batched[endpoint, tls] = None
        if len(self._batched) > MAX_UNBATCHED:
            del self._batched[next(iter(self._batched))]

    def _batching(self, endpoint: str, tls: bool) -> bool:
        """Whether requests to this node go in batched calls: unless it lacked them lately."""
        return not self._unbatched.lacks(endpoint, tls)

    def _enqueue(self, call: ExpertCall, inputs: torch.Tensor, grads: torch.Tensor | None, timeout: float,
                 backward: bool, shares: list[float] | None) -> asyncio.Future:
        """Queue a request for its node's next batched call, sent once this turn of the loop is over;
        the future of its outputs (cancelling it withdraws the request)."""
        loop = asyncio.get_running_loop()
        key = (call.endpoint, call.tls, backward)
        queue = self._queued.get(key)
        if queue is None:
            queue = self._queued[key] = []
            loop.call_soon(self._flush, key)
        future = loop.create_future()
        queue.append(_Queued(call, None, inputs, grads, loop.time() + timeout, future, shares))
        return future

    def _flush(self, key: tuple[str, bool, bool]) -> None:
        """Send the requests queued for one node and direction: one call per MAX_BATCH_PARTS of them."""
        queued = [q for q in self._queued.pop(key, []) if not q.future.done()]
        for start in range(0, len(queued), MAX_BATCH_PARTS):
            group = queued[start:start + MAX_BATCH_PARTS]
            sent: list[asyncio.Task] = []  # the group's call, once made
            waiting = [len(group)]  # requests of the group not settled or withdrawn yet

            def withdrawn(_: asyncio.Future, sent: list[asyncio.Task] = sent, waiting: list[int] = waiting
                          ) -> None:
                waiting[0] -= 1
                if waiting[0] == 0 and not sent[0].done():  # nobody waits for it any more
                    sent[0].cancel()

            task = asyncio.ensure_future(self._send_group(key, group, withdrawn))
            sent.append(task)
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            for queued_request in group:
                queued_request.future.add_done_callback(withdrawn)

    async def _send_group(self, key: tuple[str, bool, bool], group: list[_Queued],
                          withdrawn: Callable[[asyncio.Future], None] | None = None) -> None:
        """One call for a group of queued requests to one node (a request alone: its own call), each
        request's future settled with its outputs or its error (``withdrawn``, the callback that
        cancels the call once every request is withdrawn, taken off first: the call is over)."""
        endpoint, tls, backward = key
        loop = asyncio.get_running_loop()
        try:
            if len(group) == 1:
                only = group[0]
                results: list[torch.Tensor | BaseException] = [await self._send(
                    only.call, self._request_of(only, backward), only.like,
                    max(0.001, only.deadline - loop.time()), backward)]
                if only.shares is not None:
                    only.shares.append(1.0)
            else:
                results = await self._send_batch(endpoint, tls, backward, group)
        except asyncio.CancelledError:
            for queued in group:
                queued.future.cancel()
            raise
        except Exception as e:  # the whole call failed: so did each of its requests
            results = [e] * len(group)
        for queued, result in zip(group, results):
            if queued.future.done():
                continue
            if withdrawn is not None:
                queued.future.remove_done_callback(withdrawn)
            if isinstance(result, asyncio.CancelledError):
                queued.future.cancel()
            elif isinstance(result, BaseException):
                queued.future.set_exception(result)
            else:
                queued.future.set_result(result)

    async def _send_batch(self, endpoint: str, tls: bool, backward: bool,
                          group: list[_Queued]) -> list[torch.Tensor | BaseException]:
        """The requests of ``group`` in one batched call (streamed above the node's message limit):
        each request's outputs, or its part's error. A node without batched calls (UNIMPLEMENTED) gets
        them as per-expert calls at once, and is remembered."""
        loop = asyncio.get_running_loop()
        stub = self._stub(endpoint, tls)
        if self._packing(endpoint, tls, group):
            packed = await self._send_packed(endpoint, tls, backward, group)
            if packed is not None:
                return packed
        # a Forward/BackwardBatchRequest, framed here: field 1, each part's bytes as they are
        data = b"".join(_length_delimited(1, self._request_of(q, backward).SerializeToString())
                        for q in group)
        timeout = max(0.001, max(q.deadline for q in group) - loop.time())
        max_unary = min(q.call.max_unary_bytes for q in group)
        unary = len(data) <= max_unary
        unary_name = "BackwardBatch" if backward else "ForwardBatch"
        name = unary_name + ("" if unary else "Stream")
        try:
            if not unary and (endpoint, tls) not in self._batched:
                # a stream to a node without the method can end in INTERNAL instead of UNIMPLEMENTED (the
                # node hangs up while chunks are still being sent): ask with an empty batched call first
                await stub[unary_name](b"", timeout=timeout, metadata=self._metadata(unary_name))
                self._remember_batched(endpoint, tls)
                timeout = max(0.001, max(q.deadline for q in group) - loop.time())  # what that call left
            if unary:
                reply = await stub[name](data, timeout=timeout, metadata=self._metadata(name))
            else:
                chunk_bytes = max(1, min(STREAM_CHUNK_BYTES, max_unary // 2))
                replies = stub[name](split_chunks(data, chunk_bytes), timeout=timeout,
                                     metadata=self._metadata(name))
                reply = await join_chunks(_parsed_chunks(replies), max_bytes=sum(
                    q.like.numel() * 8 + ENVELOPE_BYTES for q in group))
        except grpc.RpcError as e:
            if status_code(e) != grpc.StatusCode.UNIMPLEMENTED:
                if not unary:  # the node may have been replaced by one without the method: ask it again
                    self._batched.pop((endpoint, tls), None)
                raise
            self._unbatched.found(endpoint, tls, "batched calls", e)
            return await asyncio.gather(*(
                self._send(q.call, self._request_of(q, backward), q.like,
                           max(0.001, q.deadline - loop.time()), backward)
                for q in group), return_exceptions=True)
        reply_cls = pb.BackwardBatchResponse if backward else pb.ForwardBatchResponse
        try:
            parts = reply_cls.FromString(reply).parts
        except DecodeError as e:
            raise WireError(f"undecodable {reply_cls.__name__}: {e}") from None
        if len(parts) != len(group):
            raise WireError(f"a batched reply of {len(parts)} parts to a call of {len(group)}")
        self._remember_batched(endpoint, tls)
        tokens = sum(int(q.like.shape[0]) for q in group)
        results: list[torch.Tensor | BaseException] = []
        ok = grpc.StatusCode.OK.value[0]
        # the parts that are one plain tensor of the expected shape decoded with one copy for all
        plain = deserialize_plain([part.tensors[0] if part.code == ok and len(part.tensors) == 1
                                   else _NOT_PLAIN for part in parts], [q.like for q in group])
        for queued, part, tensor in zip(group, parts, plain):
            if queued.shares is not None:
                queued.shares.append(int(queued.like.shape[0]) / tokens)
            if part.code != ok:
                code = _STATUS_BY_NUMBER.get(part.code, grpc.StatusCode.UNKNOWN)
                results.append(PartFailed(code, part.message or f"status {part.code}"))
                continue
            if tensor is not None:
                results.append(tensor)
                continue
            try:
                results.append(_decoded(part.tensors, queued.like))
            except ValueError as e:  # WireError is one: a malformed part is that expert's failure
                results.append(e)
        return _bounded(results, self.max_reply_abs)

    def _request_of(self, queued: _Queued, backward: bool) -> pb.ForwardRequest | pb.BackwardRequest:
        """A queued request's message (its values were checked when it was queued)."""
        if queued.request is None:
            queued.request = self._request(queued.call, queued.like, queued.grads, backward, finite=True)
        return queued.request

    def _packing(self, endpoint: str, tls: bool, group: list[_Queued]) -> bool:
        """Whether a group goes in a packed call: rows of one shape and dtype, compression that is the
        same for their tensors joined as for each alone (not 8-bit, whose codebook would span the parts),
        and a node not found without packed calls lately."""
        if (not self.packed_calls or self.compression == pb.UNIFORM_8BIT
                or self._unpacked.lacks(endpoint, tls)):
            return False
        first = group[0].like
        row, dtype = first.shape[1:], first.dtype
        return first.dim() >= 2 and all(q.like.dtype == dtype and q.like.shape[1:] == row for q in group)

    async def _send_packed(self, endpoint: str, tls: bool, backward: bool,
                           group: list[_Queued]) -> list[torch.Tensor | BaseException] | None:
        """The requests of ``group`` in one packed call (every part's rows in one tensor): each request's
        outputs, or its part's error; None if it cannot go that way (above the node's message limit, or a
        node without packed calls, then remembered), for a batched call to carry instead."""
        loop = asyncio.get_running_loop()
        likes = [q.like for q in group]
        rows = [x.shape[0] for x in likes]
        inputs = torch.cat(likes) if len(likes) > 1 else likes[0]
        request = pb.PackedRequest(uids=[q.call.uid for q in group], rows=rows,
                                   inputs=serialize(inputs, self.compression),
                                   reply_compression=self.compression)
        if backward:
            grads = [q.grads for q in group]
            request.grad_outputs.CopyFrom(serialize(torch.cat(grads) if len(grads) > 1 else grads[0],
                                                    self.compression))
        data = request.SerializeToString()
        if len(data) > min([q.call.max_unary_bytes for q in group]):
            return None
        name = "BackwardPacked" if backward else "ForwardPacked"
        timeout = max(0.001, max([q.deadline for q in group]) - loop.time())
        try:
            reply_data = await self._stub(endpoint, tls)[name](data, timeout=timeout,
                                                               metadata=self._metadata(name))
        except grpc.RpcError as e:
            if status_code(e) != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self._unpacked.found(endpoint, tls, "packed calls", e)
            return None
        try:
            reply = pb.PackedReply.FromString(reply_data)
        except DecodeError as e:
            raise WireError(f"undecodable PackedReply: {e}") from None
        if len(reply.codes) != len(group) or len(reply.messages) != len(group):
            raise WireError(f"a packed reply of {len(reply.codes)} parts to a call of {len(group)}")
        self._remember_batched(endpoint, tls)
        tokens = sum(rows)
        ok = grpc.StatusCode.OK.value[0]
        codes = list(reply.codes)
        # the rows of the parts answered (all of them, as a rule)
        sizes = rows if codes.count(ok) == len(codes) else [n for n, code in zip(rows, codes) if code == ok]
        results: list[torch.Tensor | BaseException] = []
        outputs: list[torch.Tensor] = []
        failure: BaseException = WireError("no outputs in a packed reply")
        within = False  # the answered parts' values are known to be finite and within max_reply_abs
        if sizes:  # outputs of the inputs' shape: the inputs' (all parts answered), else of fewer rows
            like = inputs if sizes is rows else torch.empty((sum(sizes), *inputs.shape[1:]),
                                                            dtype=inputs.dtype, device="meta")
            try:
                decoded = _decoded([reply.outputs], like)
            except ValueError as e:  # the answered parts' outputs do not decode: each of them failed
                failure = e
            else:  # checked whole (one op, not a cat of the parts): part by part only if out of bounds
                within = _within([decoded], self.max_reply_abs)
                outputs = list(decoded.split(sizes))
        given = iter(outputs)
        for index, (queued, n, code) in enumerate(zip(group, rows, codes)):
            if queued.shares is not None:
                queued.shares.append(n / tokens)
            if code != ok:
                status = _STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
                results.append(PartFailed(status, reply.messages[index] or f"status {code}"))
            else:
                results.append(next(given) if outputs else failure)
        if within:  # the answered parts' values, all in one tensor, were checked at once
            return results
        return _bounded(results, self.max_reply_abs)

    async def _backward(self, calls, backward_timeout, on_result):
        finite = _all_finite([c.inputs for c in calls] + [c.grad_outputs for c in calls
                                                          if c.grad_outputs is not None])
        replies = await all_settled([self._start(c, backward_timeout, True, finite=finite) for c in calls])
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



def _release(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _bounded(results: list[torch.Tensor | BaseException], max_abs: float
             ) -> list[torch.Tensor | BaseException]:
    """The replies of a call's parts, each that holds values not finite or above ``max_abs`` replaced by its
    ValueError: all of them checked at once, and part by part only if some are out of bounds."""
    decoded = [r for r in results if isinstance(r, torch.Tensor)]
    if decoded and not _within(decoded, max_abs):
        for index, result in enumerate(results):
            if isinstance(result, torch.Tensor):
                try:
                    _check_values(result, max_abs)
                except ValueError as e:
                    results[index] = e
    return results


def _check_finite(call: ExpertCall, inputs: torch.Tensor, grad_outputs: torch.Tensor | None, backward: bool,
                  finite: bool) -> None:
    """LocalInputError (nothing is sent) unless the values of a request are finite (not checked again if
    known to be)."""
    if not finite and (not _all_finite([inputs]) or (grad_outputs is not None
                                                      and not _all_finite([grad_outputs]))):
        raise LocalInputError(f"this client's {'gradients' if backward else 'inputs'} for {call.uid} "
                              "are not finite (has the model diverged?); not sent")


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _length_delimited(number: int, data: bytes) -> bytes:
    """Protobuf's encoding of field ``number`` holding ``data`` (bytes, or an embedded message)."""
    head = bytearray()
    for varint in ((number << 3) | 2, len(data)):
        while varint >= 0x80:
            head.append(varint & 0x7F | 0x80)
            varint >>= 7
        head.append(varint)
    return bytes(head) + data


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


_NOT_PLAIN = pb.Tensor(dtype="", compression=pb.NONE)  # stands for a part deserialize_plain must leave


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of these tensors is finite: one check for all of them where they share a
    dtype (a step's calls do), else one each."""
    if not tensors:
        return True
    if len(tensors) > 1 and all(t.dtype == tensors[0].dtype for t in tensors):
        try:  # rows of one width (a step's are) join as they are: a reshape each costs more than the check
            tensors = [torch.cat(tensors)]
        except RuntimeError:  # other shapes: flattened first
            tensors = [torch.cat([t.reshape(-1) for t in tensors])]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _token_counts(token_ids: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """How many of these lists of token ids (each without repeats) name each token: [num_tokens]."""
    if not token_ids:
        return torch.zeros(num_tokens, dtype=torch.long)
    return torch.bincount(torch.cat(token_ids), minlength=num_tokens)[:num_tokens]


def _checked(tensors, like: torch.Tensor, max_abs: float = float("inf")) -> torch.Tensor:
    """The one reply tensor, if it has the shape and dtype of ``like`` and finite values no larger
    than ``max_abs`` in magnitude (else ValueError)."""
    tensor = _decoded(tensors, like)
    _check_values(tensor, max_abs)
    return tensor


def _decoded(tensors, like: torch.Tensor) -> torch.Tensor:
    """The one reply tensor, if it has the shape and dtype of ``like`` (else ValueError); its values
    unchecked."""
    if len(tensors) != 1:
        raise ValueError(f"expected 1 tensor in the reply, got {len(tensors)}")
    tensor = deserialize(tensors[0], max_numel=like.numel())
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise ValueError(f"reply of shape {list(tensor.shape)} {tensor.dtype}, "
                         f"expected {list(like.shape)} {like.dtype}")
    return tensor


def _within(tensors: list[torch.Tensor], max_abs: float) -> bool:
    """Whether all values of these tensors are finite and no larger than ``max_abs`` in magnitude (one
    check for all of them where they share a dtype)."""
    if len(tensors) > 1 and all(t.dtype == tensors[0].dtype for t in tensors):
        tensors = [torch.cat([t.reshape(-1) for t in tensors])]
    for tensor in tensors:
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if not (math.isfinite(largest) and largest <= max_abs):
            return False
    return True


def _check_values(tensor: torch.Tensor, max_abs: float) -> None:
    """ValueError unless the values of a reply tensor are finite and no larger than ``max_abs``."""
    largest = float(tensor.abs().max()) if tensor.numel() else 0.0
    if not math.isfinite(largest):
        raise ValueError("reply holds NaN or Inf")
    if largest > max_abs:
        raise ValueError(f"reply holds {largest:.3g}, above max_reply_abs={max_abs:g}")
