"""ExpertService: the gRPC servicer of a node (Forward, Backward, their batched forms, their streams,
Info, GetState).

The handlers are registered with raw-bytes request deserialisers instead of the generated
``add_ExpertServiceServicer_to_server``: parsing the request ourselves lets garbage on the wire get
INVALID_ARGUMENT with a message, where grpc's own deserialiser would answer an opaque INTERNAL.
Every call first passes the node's :class:`~dmoe.node.guard.CallGuard` (swarm key, limits per
peer), then its request is decoded and checked against the expert's schema (dtype, rank, sizes,
finite values no larger than the node's bounds) before it is queued, so a bad request never
reaches a batch that good requests share. :func:`check_declared_request` (uid, declared shapes and
dtypes, size) and :func:`decode_request` (the values) are that path as plain functions, as are
:func:`check_info_request` (Info's uids) and :class:`ChunkJoiner` (a request stream's chunks), which
the fuzzer (``fuzz/fuzz_request.py``) drives in-process. Nothing on the event loop does work per
element of a count the peer chose before that count is checked: the uids of an Info call, the
tensors of a request and their dimensions, the chunks of a stream (each one a request against the
peer's rate).

Batched calls (ForwardBatch, BackwardBatch, and their streams for requests above the message limit)
carry several experts' requests in one call, so that a client sends a node one call per step instead of
one per expert. Each part is exactly a per-expert request and is served as its own call would be:
admitted by the guard as one more request of the peer (:meth:`CallGuard.admit_part`: in flight among its
parts, ``max_parts_per_peer``, and against its rate), parsed, checked and decoded the same way, queued
in its expert's queue (:meth:`Runtime.submit`), counted in its expert's stats; a part refused fails
alone, with the status and message its own call would get, and the others are served. The call answers
once every part is done, one :class:`PartReply` per part. The parts are found on the wire
(:func:`batch_parts`) before any is parsed: at most ``MAX_BATCH_PARTS`` of them and ``MAX_BATCH_FIELDS``
fields in all, or the whole call is refused; a batched request is one request in bytes
(``max_message_bytes``, ``max_request_bytes``). Decoding and encoding of all parts each take one trip
off the event loop.

Packed calls (ForwardPacked, BackwardPacked) are batched calls whose parts' rows travel in one tensor,
the uids and row counts beside it (:class:`PackedRequest`), for experts of one input and one output of
one row shape: no message per part on either side. Each part is admitted, checked (its uid, its rows'
shape and dtype, its tokens, its values), queued and counted as a per-expert call of its rows would be,
and fails alone with that call's status; what cannot be told apart part by part (the row counts do not
add up to the tensor, a tensor that does not decode, too many parts) refuses the whole call. The outputs
of the parts that succeeded come back in one tensor, each part's status beside it (:class:`PackedReply`).
A packed call's decoding and its reply's encoding take one trip off the event loop each, unless the call
is small (``INLINE_BYTES``). The parts of experts of one schema are checked once per call (the others as
the first: ``ExpertBackend.packed_key``), and the parts' outcomes are one :class:`~dmoe.node.runtime.Parts`
that wakes the call once: the node's work per part is a few dictionary and list operations.

GetState streams an expert's parameters, optimizer state and version to another node (the layout
and its checks are in :mod:`dmoe.node.transfer`). It passes the same guard; a node runs at most
``max_state_exports`` of them at once, since each holds a copy of an expert's state until sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from dmoe.core.auth import fullmethod
from dmoe.core.futures import all_settled
from dmoe.core.logsafe import printable
from dmoe.core.wire import DTYPES, deserialize, deserialize_plain, serialize, split_chunks
from dmoe.node.backend import ExpertBackend, OutOfBounds
from dmoe.node.guard import CallGuard, Refused
from dmoe.node.runtime import Overloaded, Parts, Runtime, Task
from dmoe.node.stats import ExpertCounters
from dmoe.node.transfer import export_state, state_chunks
from dmoe.proto import expert_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name
MiB = 1 << 20
STEP_WAIT = 10.0  # at most this long (s) an Info waits for an optimizer step after an answered Backward
INFO_BYTES_PER_UID = 256  # an InfoRequest longer than this per uid allowed is refused before it is parsed
MAX_RANK = 64  # dimensions of a grad_output, checked before its shape is read
# a batched call carries at most this many parts, and this many fields in all (its parts' and their
# tensors' included): an honest part is about 13 fields, so 1,024 of them fit, and the node's work on
# the event loop before parsing stays within about twice that of the largest Forward it accepts
MAX_BATCH_PARTS = 1024
MAX_BATCH_FIELDS = 32768
# a packed call of at most this many bytes is decoded and its reply encoded on the event loop: that takes
# microseconds, a trip to a worker thread and back longer
INLINE_BYTES = 64 << 10
# the calling peer's key from CallGuard.admit, set per call (each call runs in a task of its own):
# the runtime counts each peer's optimizer steps with it (dmoe.node.influence)
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("dmoe_node_caller", default="")


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ExpertServicer:
    def __init__(
        self,
        backends: Mapping[str, ExpertBackend],
        runtime: Runtime,
        counters: Mapping[str, ExpertCounters],
        *,
        max_batch_tokens: int,
        max_request_bytes: int,
        node_info: Callable[[list[str]], pb.NodeInfo],
        chunk_bytes: int,
        max_inflight_bytes: int,
        guard: CallGuard,
        max_input_abs: float = float("inf"),
        max_grad_abs: float = float("inf"),
        receive_timeout: float = float("inf"),
        max_state_exports: int = 2,
        max_info_uids: int = 4096,
    ):
        self.backends, self.runtime, self.counters = backends, runtime, counters
        self.guard, self.max_input_abs, self.max_grad_abs = guard, max_input_abs, max_grad_abs
        self.receive_timeout = receive_timeout
        self.max_batch_tokens, self.max_request_bytes = max_batch_tokens, max_request_bytes
        self.node_info = node_info
        self.chunk_bytes = chunk_bytes  # response chunk size of the streams, within the message limit
        self.max_inflight_bytes = max_inflight_bytes
        self._inflight_bytes = 0  # bytes held by request streams being received (event loop only)
        self.max_state_exports = max_state_exports  # GetState calls served at once
        self._state_exports = 0  # GetState calls being served (event loop only)
        # Info calls waiting for optimizer steps to end: (the steps' events, the future that wakes the call)
        self._settling: list[tuple[list[threading.Event], asyncio.Future]] = []
        self._settle_poller: asyncio.Task | None = None
        self.max_info_uids = max_info_uids  # uids one Info call may name
        # calls received (Info's stats): Forward/Backward in every form, of them batched ones, their parts
        self.num_expert_calls = self.num_batched_calls = self.num_batched_parts = 0
        self.num_packed_calls = 0  # of the batched calls, packed ones

    # ---- registration -----------------------------------------------------------------------
    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, response_cls):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=None, response_serializer=response_cls.SerializeToString
            )

        # chunks arrive as bytes too, parsed by _join: garbage gets INVALID_ARGUMENT, not UNKNOWN
        def stream(fn):
            return grpc.stream_stream_rpc_method_handler(
                fn, request_deserializer=None, response_serializer=pb.Chunk.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Forward": unary(self.forward, pb.ForwardResponse),
                "Backward": unary(self.backward, pb.BackwardResponse),
                "ForwardStream": stream(self.forward_stream),
                "BackwardStream": stream(self.backward_stream),
                "ForwardBatch": unary(self.forward_batch, pb.ForwardBatchResponse),
                "BackwardBatch": unary(self.backward_batch, pb.BackwardBatchResponse),
                "ForwardBatchStream": stream(self.forward_batch_stream),
                "BackwardBatchStream": stream(self.backward_batch_stream),
                "ForwardPacked": unary(self.forward_packed, pb.PackedReply),
                "BackwardPacked": unary(self.backward_packed, pb.PackedReply),
                "Info": grpc.unary_unary_rpc_method_handler(
                    self.info, request_deserializer=None, response_serializer=pb.NodeInfo.SerializeToString
                ),
                "GetState": grpc.unary_stream_rpc_method_handler(
                    self.get_state, request_deserializer=None,
                    response_serializer=pb.StateChunk.SerializeToString,
                ),
            },
        )

    # ---- handlers -----------------------------------------------------------------------------
    async def forward(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        self.num_expert_calls += 1
        return await self._answer(context, "Forward",
                                  lambda: self._run(_parse(pb.ForwardRequest, data), backward=False))

    async def backward(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.BackwardResponse:
        self.num_expert_calls += 1
        return await self._answer(context, "Backward",
                                  lambda: self._run(_parse(pb.BackwardRequest, data), backward=True))

    async def forward_batch(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ForwardBatchResponse:
        self.num_expert_calls += 1
        self.num_batched_calls += 1
        return await self._answer(context, "ForwardBatch", lambda: self._run_batch(data, backward=False))

    async def backward_batch(self, data: bytes, context: grpc.aio.ServicerContext
                             ) -> pb.BackwardBatchResponse:
        self.num_expert_calls += 1
        self.num_batched_calls += 1
        return await self._answer(context, "BackwardBatch", lambda: self._run_batch(data, backward=True))

    async def forward_packed(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.PackedReply:
        self.num_expert_calls += 1
        self.num_batched_calls += 1
        self.num_packed_calls += 1
        return await self._answer(context, "ForwardPacked", lambda: self._run_packed(data, backward=False))

    async def backward_packed(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.PackedReply:
        self.num_expert_calls += 1
        self.num_batched_calls += 1
        self.num_packed_calls += 1
        return await self._answer(context, "BackwardPacked", lambda: self._run_packed(data, backward=True))

    async def forward_stream(
        self, chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        # grpc wants an async generator here
        async for chunk in self._stream(chunks, context, backward=False):
            yield chunk

    async def backward_stream(
        self, chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        # grpc wants an async generator here
        async for chunk in self._stream(chunks, context, backward=True):
            yield chunk

    async def forward_batch_stream(
        self, chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        async for chunk in self._stream(chunks, context, backward=False, batched=True):
            yield chunk

    async def backward_batch_stream(
        self, chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        async for chunk in self._stream(chunks, context, backward=True, batched=True):
            yield chunk

    async def info(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.NodeInfo:
        async def handle() -> pb.NodeInfo:
            uids = check_info_request(self.backends, data, max_info_uids=self.max_info_uids)
            # a Backward is answered before its optimizer step: the versions reported include that step
            stepping = [b.settled for b in (map(self.backends.get, uids) if uids else self.backends.values())
                        if b is not None and not b.settled.is_set()]
            if stepping:
                await self._steps_settled(stepping)
            info = self.node_info(uids)
            info.receiving_bytes = self._inflight_bytes
            info.expert_calls, info.batched_calls = self.num_expert_calls, self.num_batched_calls
            info.batched_parts = self.num_batched_parts
            info.packed_calls = self.num_packed_calls
            return info

        return await self._answer(context, "Info", handle)

    async def _steps_settled(self, events: list[threading.Event]) -> None:
        """Until every event is set, or STEP_WAIT. Waited for on the loop, not on a worker thread: a thread
        parked per Info would let a peer's Info calls take every thread that decodes the node's Forward and
        Backward calls. One task polls the events of every waiting Info, so a wake-up costs the loop the
        same however many wait."""
        waiter = asyncio.get_running_loop().create_future()
        self._settling.append((events, waiter))
        if self._settle_poller is None or self._settle_poller.done():
            self._settle_poller = asyncio.create_task(self._poll_settled(), name="dmoe-info-settled")
        try:
            await asyncio.wait_for(waiter, STEP_WAIT)
        except TimeoutError:
            pass  # answered with the versions as they are (the step is counted by the next Info)

    async def _poll_settled(self) -> None:
        pause = 0.0005
        while self._settling:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.005)
            waiting = []
            for events, waiter in self._settling:
                if waiter.done():  # its Info gave up (STEP_WAIT, or the call ended)
                    continue
                if all(event.is_set() for event in events):
                    waiter.set_result(None)
                else:
                    waiting.append((events, waiter))
            self._settling = waiting

    async def get_state(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        """The expert's state as a stream of StateChunk (written here, not yielded, so that the
        time a reader may take is bounded: receive_timeout plus a second per MiB of state)."""
        async def handle() -> None:
            request = _parse(pb.GetStateRequest, data)
            backend = self.backends.get(request.uid)
            if backend is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"no expert {request.uid!r} on this node")
            if self._state_exports >= self.max_state_exports:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self._state_exports} state transfers in progress already; retry later")
            # the slot is held until the call ends and its export (a copy of the state, on a worker thread)
            # has ended too: a call cancelled by its caller's deadline leaves its export running, and a
            # peer cancelling its calls must not get more exports at once than the limit
            self._state_exports += 1
            export = asyncio.ensure_future(asyncio.to_thread(export_state, backend,
                                                             optimizer=not request.skip_optimizer))
            try:
                await self._send_state(backend, export, context)
            finally:
                if export.done():
                    self._state_exports -= 1
                else:
                    export.add_done_callback(functools.partial(self._export_ended, request.uid))

        await self._answer(context, "GetState", handle)

    def _export_ended(self, uid: str, export: asyncio.Future) -> None:
        """An export whose call ended before it did (its caller gave up): its slot back, its error logged."""
        self._state_exports -= 1
        error = None if export.cancelled() else export.exception()
        if error is not None and not isinstance(error, ValueError):
            logger.warning("the export of %s's state for a call that ended failed: %s", printable(uid),
                           printable(error))

    async def _send_state(self, backend: ExpertBackend, export: asyncio.Future,
                          context: grpc.aio.ServicerContext) -> None:
        try:
            header, views = await asyncio.shield(export)
        except ValueError as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        limit = self.receive_timeout + header.total_bytes / MiB
        try:
            async with asyncio.timeout(None if limit == float("inf") else limit):
                for chunk in state_chunks(header, views, self.chunk_bytes):
                    await context.write(chunk)
        except TimeoutError:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"the state of {backend.uid} was not taken within {limit:.0f}s") from None
        logger.debug("sent the state of %s (version %d, %d bytes) to %s", backend.uid, header.version,
                     header.total_bytes, printable(context.peer()))

    # ---- the work ------------------------------------------------------------------------------
    async def _answer(self, context: grpc.aio.ServicerContext, method: str,
                      handle: Callable[[], Awaitable[Message | None]],
                      on_admit: Callable[[str], None] | None = None) -> Message | None:
        try:
            peer = self.guard.admit(fullmethod(SERVICE_NAME, method), context.peer(),
                                    context.invocation_metadata(), context.auth_context())
        except Refused as e:
            await context.abort(e.code, e.message)
            raise AssertionError("abort returns only by raising") from None
        _caller.set(peer)
        if on_admit is not None:
            on_admit(peer)
        try:
            return await handle()
        except RequestError as e:
            await context.abort(e.code, e.message)
            raise AssertionError("abort returns only by raising") from None
        finally:
            self.guard.release(peer)

    async def _stream(
        self, chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext, *, backward: bool,
        batched: bool = False,
    ) -> AsyncIterator[pb.Chunk]:
        async def handle() -> Message:
            data = await self._join(chunks, peer)
            if batched:
                return await self._run_batch(data, backward=backward)
            request_cls = pb.BackwardRequest if backward else pb.ForwardRequest
            return await self._run(_parse(request_cls, data), backward=backward)

        peer = ""  # the caller's key, set by _answer before handle runs

        def admitted(key: str) -> None:
            nonlocal peer
            peer = key

        self.num_expert_calls += 1
        self.num_batched_calls += batched
        method = ("Backward" if backward else "Forward") + ("Batch" if batched else "") + "Stream"
        response = await self._answer(context, method, handle, on_admit=admitted)
        for chunk in split_chunks(response.SerializeToString(), self.chunk_bytes):
            yield chunk

    async def _join(self, messages: AsyncIterator[bytes], peer: str) -> bytes:
        """Join a request stream (:class:`ChunkJoiner`: no empty chunk, within max_request_bytes), and
        within the node-wide budget of bytes held by streams being received (max_inflight_bytes), so
        many streams cannot exhaust memory. Every chunk after the first is one more request of
        ``peer`` against its rate (peer_rate), so a stream of tiny chunks is no cheaper than calls."""
        joiner = ChunkJoiner(self.max_request_bytes)
        held = 0
        try:
            timeout = None if self.receive_timeout == float("inf") else self.receive_timeout
            async with asyncio.timeout(timeout):
                async for message in messages:
                    if joiner.num_chunks:
                        try:
                            self.guard.charge(peer)
                        except Refused as e:
                            raise RequestError(e.code, e.message) from None
                    size = joiner.add(message)
                    held += size
                    self._inflight_bytes += size
                    if self._inflight_bytes > self.max_inflight_bytes:
                        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           "node is receiving too much data at once; retry later")
            return joiner.join()
        except TimeoutError:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the request took more than "
                               f"{self.receive_timeout:g}s to arrive (receive_timeout)") from None
        finally:
            self._inflight_bytes -= held

    async def _run(self, request: pb.ForwardRequest | pb.BackwardRequest, *, backward: bool) -> Message:
        """One per-expert call's answer, or RequestError."""
        result = (await self._serve([request], backward=backward))[0]
        if isinstance(result, RequestError):
            raise result
        if backward:
            return pb.BackwardResponse(grad_inputs=result)
        return pb.ForwardResponse(outputs=result)

    async def _run_batch(self, data: bytes, *, backward: bool) -> Message:
        """A batched call's answer: one PartReply per part, each what the part's own call would answer
        (RequestError for the whole call only if its parts cannot be told apart or are too many)."""
        parts = batch_parts(data, backward=backward)
        self.num_batched_parts += len(parts)
        request_cls = pb.BackwardRequest if backward else pb.ForwardRequest
        peer, admitted = _caller.get(), 0
        requests: list[Message | RequestError] = []
        try:
            for index, part in enumerate(parts):
                if index:  # the call's own admission stands for its first part
                    try:
                        self.guard.admit_part(peer)
                    except Refused as e:
                        requests.append(RequestError(e.code, e.message))
                        continue
                    admitted += 1
                try:
                    requests.append(_parse(request_cls, part))
                except RequestError as e:
                    requests.append(e)
            results = await self._serve(requests, backward=backward)
        finally:
            for _ in range(admitted):
                self.guard.release_part(peer)
        replies = [pb.PartReply(code=r.code.value[0], message=r.message) if isinstance(r, RequestError)
                   else pb.PartReply(tensors=r) for r in results]
        return (pb.BackwardBatchResponse if backward else pb.ForwardBatchResponse)(parts=replies)

    async def _run_packed(self, data: bytes, *, backward: bool) -> pb.PackedReply:
        """A packed call's answer: each part served as a per-expert call of its rows would be (RequestError
        for the whole call only if its parts cannot be told apart, or are too many)."""
        started = time.perf_counter()
        limit = self.max_batch_tokens
        request = parse_packed(data, backward=backward, max_batch_tokens=limit)
        uids = list(request.uids)
        count = len(uids)
        self.num_batched_parts += count
        rows = list(request.rows)
        shape = tuple(request.inputs.shape)
        results: list[torch.Tensor | RequestError | None] = [None] * count
        checked: dict[int, tuple[ExpertBackend, int]] = {}  # part -> (backend, tokens)
        # the parts of experts of one packed_key pass alike: checked once, then tokens per row (per key)
        passed: dict[int, int] = {}
        peer, admitted = _caller.get(), 0
        try:
            for index, (uid, n) in enumerate(zip(uids, rows)):
                if index:  # the call's own admission stands for its first part
                    try:
                        self.guard.admit_part(peer)
                    except Refused as e:
                        results[index] = RequestError(e.code, e.message)
                        continue
                    admitted += 1
                backend = self.backends.get(uid)
                key = None if backend is None else backend.packed_key
                per_row = None if key is None else passed.get(key)
                if per_row is not None and n * per_row <= limit:
                    checked[index] = (backend, n * per_row)  # type: ignore[assignment]
                    continue
                try:
                    checked[index] = check_packed_part(self.backends, uid, (n, *shape[1:]), request,
                                                       backward=backward, max_batch_tokens=limit)
                except RequestError as e:
                    results[index] = self._refused(uid, e)
                    continue
                if key is not None:
                    passed[key] = checked[index][1] // n
            if checked:
                await self._serve_packed(request, uids, rows, checked, results, backward)
        finally:
            for _ in range(admitted):
                self.guard.release_part(peer)
        failed = [isinstance(r, RequestError) for r in results]  # else a tensor: every part ends as one
        done = [i for i, bad in enumerate(failed) if not bad]

        def encode() -> pb.Tensor:
            return serialize(torch.cat([results[i] for i in done]), request.reply_compression)

        reply = pb.PackedReply(
            codes=[r.code.value[0] if bad else 0 for r, bad in zip(results, failed)],  # type: ignore[union-attr]
            messages=[r.message if bad else "" for r, bad in zip(results, failed)])  # type: ignore[union-attr]
        if done:
            small = len(data) <= INLINE_BYTES
            reply.outputs.CopyFrom(encode() if small else await asyncio.to_thread(encode))
        seconds = time.perf_counter() - started
        for index in done:
            self.counters[uids[index]].record_call(backward, checked[index][1], seconds)
        return reply

    async def _serve_packed(self, request: pb.PackedRequest, uids: list[str], rows: list[int],
                            checked: dict[int, tuple[ExpertBackend, int]],
                            results: list[torch.Tensor | RequestError | None], backward: bool) -> None:
        """Decode a packed call's tensors (off the event loop), check each checked part's values, queue the
        parts in their experts' queues at once and put each one's output (or error) in ``results``. The
        parts' outcomes are one :class:`Parts`, which wakes this call once, when the last is settled."""
        def decode() -> PackedParts:
            return decode_packed(request, rows, {i: backend for i, (backend, _) in checked.items()},
                                 backward=backward, max_input_abs=self.max_input_abs,
                                 max_grad_abs=self.max_grad_abs)

        small = request.ByteSize() <= INLINE_BYTES
        xs, gs, refused = decode() if small else await asyncio.to_thread(decode)
        for index, error in refused.items():
            results[index] = self._refused(uids[index], error)
        submitted = [index for index in checked if index not in refused]
        if not submitted:
            return
        loop = asyncio.get_running_loop()
        all_done = loop.create_future()

        def settle() -> None:
            if not all_done.done():
                all_done.set_result(None)

        def on_done() -> None:  # in the runtime thread (or here, if every part was refused)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        parts, peer, now = Parts(len(submitted), on_done), _caller.get(), time.monotonic()
        items = [(uids[index], Task([xs[index]], None if gs is None else [gs[index]], rows[index],
                                    checked[index][1], parts.part(k), enqueued_at=now, peer=peer))
                 for k, index in enumerate(submitted)]
        for k, ((uid, task), queued) in enumerate(zip(items, self.runtime.submit_many(items))):
            if isinstance(queued, Overloaded):
                results[submitted[k]] = self._refused(uid, RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                        str(queued)))
                task.future.set_exception(queued)  # settled: the others' wait does not wait for it
        try:
            await all_done
        except asyncio.CancelledError:  # the call's deadline, the caller gone: drop what has not run
            parts.cancel()
            raise
        for index, output in zip(submitted, parts.outcomes):
            if results[index] is not None:  # refused by its queue
                continue
            if type(output) is list and len(output) == 1:  # the common case, checked with the fewest steps
                out, x = output[0], xs[index]
                if out.dtype == x.dtype and out.shape == x.shape:
                    results[index] = out
                    continue
            uid = uids[index]
            if isinstance(output, BaseException):
                self.counters[uid].errors += 1
                results[index] = RequestError(grpc.StatusCode.INTERNAL,
                                              f"{uid} failed: {type(output).__name__}: {output}")
            elif (len(output) != 1 or output[0].shape != xs[index].shape
                  or output[0].dtype != xs[index].dtype):
                self.counters[uid].errors += 1
                results[index] = RequestError(grpc.StatusCode.INTERNAL, f"{uid} answered other than its "
                                              "inputs' shape and dtype")
            else:
                results[index] = output[0]

    async def _serve(self, requests: list[Message | RequestError], *, backward: bool
                     ) -> list[list[pb.Tensor] | RequestError]:
        """Serve each request as its own call: checked against its expert's schema, decoded (all of them
        in one trip off the event loop), queued in its expert's queue and run there, its outputs encoded
        (one trip for all). Each request's encoded outputs, or the RequestError its call ends with; a
        RequestError in ``requests`` (a part refused before) stays as it is."""
        started = time.perf_counter()
        results: list[list[pb.Tensor] | RequestError] = [r if isinstance(r, RequestError) else []
                                                         for r in requests]
        checked: dict[int, tuple[ExpertBackend, int, int]] = {}
        for index, request in enumerate(requests):
            if not isinstance(request, RequestError):
                try:
                    checked[index] = check_declared_request(self.backends, request,
                                                            max_batch_tokens=self.max_batch_tokens)
                except RequestError as e:
                    results[index] = self._refused(request.uid, e)
        if not checked:
            return results
        decoded = await asyncio.to_thread(self._decode, requests, checked, backward)
        waiting: dict[int, concurrent.futures.Future] = {}
        submitted: list[tuple[int, tuple[str, Task]]] = []
        for index, item in decoded.items():
            uid = requests[index].uid
            if isinstance(item, RequestError):
                results[index] = self._refused(uid, item)
                continue
            _, rows, num_tokens = checked[index]
            task = Task(item[0], item[1], rows, num_tokens, concurrent.futures.Future(), peer=_caller.get())
            submitted.append((index, (uid, task)))
        # all at once: the device thread sees every part together (and can run them as one group)
        for (index, (uid, _)), queued in zip(submitted, self.runtime.submit_many([s for _, s in submitted])):
            if isinstance(queued, Overloaded):
                results[index] = self._refused(uid, RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                 str(queued)))
            else:
                waiting[index] = queued
        if not waiting:
            return results
        outputs = await all_settled(list(waiting.values()))
        done: dict[int, list[torch.Tensor]] = {}
        for index, output in zip(waiting, outputs):
            uid = requests[index].uid
            if isinstance(output, BaseException):
                self.counters[uid].errors += 1
                results[index] = RequestError(grpc.StatusCode.INTERNAL,
                                              f"{uid} failed: {type(output).__name__}: {output}")
            else:
                done[index] = output

        def encode() -> dict[int, list[pb.Tensor]]:
            return {index: [serialize(o, requests[index].reply_compression) for o in outputs]
                    for index, outputs in done.items()}

        encoded = await asyncio.to_thread(encode) if done else {}
        seconds = time.perf_counter() - started
        for index, tensors in encoded.items():
            self.counters[requests[index].uid].record_call(backward, checked[index][2], seconds)
            results[index] = tensors
        return results

    def _decode(self, requests: list, checked: dict[int, tuple[ExpertBackend, int, int]], backward: bool
                ) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor] | None] | RequestError]:
        """decode_request of each checked request (off the event loop), or its RequestError."""
        decoded: dict[int, tuple[list[torch.Tensor], list[torch.Tensor] | None] | RequestError] = {}
        plain = self._decode_plain(requests, checked, backward) if len(checked) > 1 else {}
        for index, (backend, _, _) in checked.items():
            try:
                decoded[index] = decode_request(backend, requests[index], backward=backward,
                                                max_input_abs=self.max_input_abs,
                                                max_grad_abs=self.max_grad_abs, plain=plain.get(index))
            except RequestError as e:
                decoded[index] = e
        return decoded

    def _decode_plain(self, requests: list, checked: dict[int, tuple[ExpertBackend, int, int]],
                      backward: bool) -> dict[int, Plain]:
        """The parts of a batched call whose single input (and output gradient) is plain, decoded with one
        copy for all, and whether all their values are within the node's bounds (one check for all; if
        not, each is checked alone, so that a bad part still fails alone)."""
        single = [i for i, (backend, _, _) in checked.items()
                  if len(requests[i].inputs) == 1 and len(backend.input_schema) == 1
                  and (not backward or len(requests[i].grad_outputs) == 1)]
        if not single:
            return {}

        def like(tensor: pb.Tensor, dtype: str, bound: int) -> torch.Tensor | None:
            shape = tuple(tensor.shape)
            if math.prod(shape) > bound or dtype not in DTYPES:
                return None
            return torch.empty(shape, dtype=DTYPES[dtype], device="meta")

        def decode(tensors: list[pb.Tensor], dtypes: list[str]) -> list[torch.Tensor | None]:
            likes = [like(t, d, checked[i][0].max_numel) for i, t, d in zip(single, tensors, dtypes)]
            chosen = [k for k, want in enumerate(likes) if want is not None]
            out: list[torch.Tensor | None] = [None] * len(single)
            for k, tensor in zip(chosen, deserialize_plain([tensors[k] for k in chosen],
                                                           [likes[k] for k in chosen])):
                out[k] = tensor
            return out

        inputs = decode([requests[i].inputs[0] for i in single],
                        [checked[i][0].input_schema[0].dtype for i in single])
        grads = (decode([requests[i].grad_outputs[0] for i in single],
                        [checked[i][0].output_schema[0].dtype if checked[i][0].output_schema else ""
                         for i in single]) if backward else [None] * len(single))
        inputs_ok = _all_within([t for t in inputs if t is not None], self.max_input_abs)
        grads_ok = _all_within([t for t in grads if t is not None], self.max_grad_abs)
        return {i: (x, g, inputs_ok, grads_ok) for i, x, g in zip(single, inputs, grads)}

    def _refused(self, uid: str, error: RequestError) -> RequestError:
        """Count a refused request in its expert's stats (if hosted): shed (RESOURCE_EXHAUSTED), else an
        error."""
        counters = self.counters.get(uid)
        if counters is not None:
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                counters.rejected += 1
            else:
                counters.errors += 1
        return error



def check_info_request(backends: Mapping[str, ExpertBackend], data: bytes, *,
                       max_info_uids: int) -> list[str]:
    """The uids a serialized InfoRequest names, each once, in order (empty: every expert), else
    RequestError. Counted before anything is done per uid (by bytes before parsing, by uids after),
    so the node's work stays within max_info_uids entries whatever the request repeats."""
    too_many = RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"an Info call may name at most "
                            f"{max_info_uids} uids (max_info_uids); ask for fewer at a time")
    if len(data) > max_info_uids * INFO_BYTES_PER_UID or not within_fields(data, max_info_uids + 16):
        raise too_many
    request = _parse(pb.InfoRequest, data)
    if len(request.uids) > max_info_uids:
        raise too_many
    uids = list(dict.fromkeys(request.uids))
    unknown = next((uid for uid in uids if uid not in backends), None)
    if unknown is not None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"no expert {unknown!r} on this node")
    return uids


class ChunkJoiner:
    """The chunks of one request stream, joined: each must parse as a Chunk and carry data, and all
    of them together stay within ``max_bytes``; else RequestError (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_chunks = self.num_bytes = 0
        self._parts: list[bytes] = []

    def add(self, message: bytes) -> int:
        """Keep one serialized Chunk; return the bytes it carries."""
        chunk = _parse(pb.Chunk, message)
        if not chunk.data:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "empty chunk in a request stream (every chunk must carry part of the request)")
        if self.num_bytes + len(chunk.data) > self.max_bytes:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"streamed request exceeds {self.max_bytes} bytes (max_request_bytes)")
        self.num_chunks += 1
        self.num_bytes += len(chunk.data)
        self._parts.append(chunk.data)
        return len(chunk.data)

    def join(self) -> bytes:
        return b"".join(self._parts)


def check_declared_request(
    backends: Mapping[str, ExpertBackend], request: pb.ForwardRequest | pb.BackwardRequest, *,
    max_batch_tokens: int,
) -> tuple[ExpertBackend, int, int]:
    """(backend, rows, tokens) of a request whose declared uid, reply compression, input shapes and
    dtypes fit, and whose tokens are within max_batch_tokens, else RequestError. Looks at no
    buffer: cheap, and it bounds what decoding may allocate."""
    backend = backends.get(request.uid)
    if backend is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"no expert {request.uid!r} on this node")
    try:
        if request.reply_compression not in pb.Compression.values():
            raise ValueError(f"unknown reply compression {request.reply_compression}")
        # counts first (len of a repeated field costs nothing): no list is built from a count the peer chose
        specs = backend.input_schema
        if len(request.inputs) != len(specs):
            raise ValueError(f"{backend.uid} takes {len(specs)} inputs, got {len(request.inputs)}")
        for i, (tensor, spec) in enumerate(zip(request.inputs, specs)):
            if len(tensor.shape) != len(spec.shape):
                raise ValueError(f"inputs[{i}] of {backend.uid} must have rank {len(spec.shape)}, "
                                 f"got {len(tensor.shape)}")
        shapes = [tuple(t.shape) for t in request.inputs]
        rows, num_tokens = backend.check_input_shapes(shapes, [t.dtype for t in request.inputs])
        if num_tokens > max_batch_tokens:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request of {num_tokens} tokens exceeds "
                               f"this node's limit of {max_batch_tokens}; split it")
    except ValueError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return backend, rows, num_tokens


# a part's single input and output gradient decoded already (None: decode it here), and whether the values
# of all such inputs, and of all such gradients, are known to be finite and within the node's bounds
Plain = tuple[torch.Tensor | None, torch.Tensor | None, bool, bool]


def _all_within(tensors: list[torch.Tensor], max_abs: float) -> bool:
    """Whether every value of these floating-point tensors is finite and at most ``max_abs`` in magnitude
    (one pass over all of them); False for anything else, which is then checked tensor by tensor."""
    if not tensors or any(not t.is_floating_point() or t.dtype != tensors[0].dtype for t in tensors):
        return False
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if flat.numel() == 0:
        return True
    largest = float(flat.abs().max())
    return math.isfinite(largest) and largest <= max_abs


def _values(backend: ExpertBackend, tensors, plain: torch.Tensor | None, checked: bool, what: str,
            max_abs: float) -> list[torch.Tensor]:
    """A request's ``what`` (inputs or grad_outputs): the one decoded already (``plain``, its values
    ``checked`` or not), else decoded here; ValueError unless finite and within ``max_abs``."""
    values = [plain] if plain is not None else [deserialize(t, max_numel=backend.max_numel) for t in tensors]
    if plain is None or not checked:
        backend.check_values(values, what, max_abs)
    return values


def decode_request(
    backend: ExpertBackend, request: pb.ForwardRequest | pb.BackwardRequest, *, backward: bool,
    max_input_abs: float, max_grad_abs: float, plain: Plain | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Decoded inputs (and grad_outputs), finite and within the node's bounds, else RequestError
    (INVALID_ARGUMENT). Runs off the event loop; check_declared_request has passed already. The
    shapes of grad_outputs are checked here, since for an expert whose output shapes do not follow
    from its schema that takes a probe (a forward pass of one row). ``plain``: what the batched call's
    decoding did for this part already (see ExpertServicer._decode_plain)."""
    plain_inputs, plain_grads, inputs_ok, grads_ok = plain or (None, None, False, False)
    try:
        if backward:
            if len(request.grad_outputs) != len(backend.output_schema):
                raise ValueError(f"{backend.uid} has {len(backend.output_schema)} outputs, got "
                                 f"{len(request.grad_outputs)} grad_outputs")
            if any(len(t.shape) > MAX_RANK for t in request.grad_outputs):
                raise ValueError(f"grad_outputs of {backend.uid} of more than {MAX_RANK} dimensions")
            backend.check_grad_output_shapes([tuple(t.shape) for t in request.inputs],
                                             [tuple(t.shape) for t in request.grad_outputs],
                                             [t.dtype for t in request.grad_outputs])
        inputs = _values(backend, request.inputs, plain_inputs, inputs_ok, "inputs", max_input_abs)
        if not backward:
            return inputs, None
        grads = _values(backend, request.grad_outputs, plain_grads, grads_ok, "grad_outputs", max_grad_abs)
    except OutOfBounds as e:  # well-formed, but values this node will not take: the caller's to fix
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE, str(e)) from None
    except ValueError as e:  # WireError is a ValueError
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return inputs, grads


# Fields a message may hold, counted on the wire before it is parsed (parsing holds the event loop,
# and costs per field: 16 million empty tensors in one 32 MiB Forward took seconds): at its top
# level, and in each of its tensors (field number -> limit). A real request has a uid, a few tensors
# of four fields each (a packed shape is one field) and a compression.
MAX_REQUEST_FIELDS, MAX_TENSOR_FIELDS = 256, 64
FIELD_LIMITS: dict[type[Message], tuple[int, dict[int, int]]] = {
    pb.ForwardRequest: (MAX_REQUEST_FIELDS, {2: MAX_TENSOR_FIELDS}),
    pb.BackwardRequest: (MAX_REQUEST_FIELDS, {2: MAX_TENSOR_FIELDS, 3: MAX_TENSOR_FIELDS}),
    pb.Chunk: (16, {}),
    pb.GetStateRequest: (16, {}),
}


def within_fields(data: bytes | memoryview, limit: int, nested: Mapping[int, int] | None = None) -> bool:
    """False if the protobuf message in ``data`` has more than ``limit`` fields, or a field numbered
    in ``nested`` holds a message of more fields than its limit there. Reads tags and lengths only
    (a length-delimited field is skipped whatever its size); wire data it cannot follow is left to the
    parser to refuse (True)."""
    return _walk(memoryview(data), limit, nested or {}, math.inf) >= 0


def _walk(view: memoryview, limit: float, nested: Mapping[int, int | tuple], budget: float) -> float:
    """What is left of ``budget`` (fields, counted at every level walked) once the message in ``view``
    is walked; -1 when it has more than ``limit`` fields, a message it holds in a field numbered in
    ``nested`` is over its limit there (an int; or a (limit, nested) pair, walked the same way), or
    the budget runs out. Wire data it cannot follow ends the walk of that message (left to the parser)."""
    at, count = 0, 0
    try:
        while at < len(view):
            count += 1
            budget -= 1
            if count > limit or budget < 0:
                return -1
            tag, at = _varint(view, at)
            wire = tag & 7
            if wire == 0:
                _, at = _varint(view, at)
            elif wire == 1 or wire == 5:
                at += 8 if wire == 1 else 4
            elif wire == 2:
                size, at = _varint(view, at)
                inner = nested.get(tag >> 3)
                if inner is not None:
                    inner_limit, inner_nested = (inner, {}) if isinstance(inner, int) else inner
                    budget = _walk(view[at : at + size], inner_limit, inner_nested, budget)
                    if budget < 0:
                        return -1
                at += size
            else:  # groups, or no wire type at all
                return budget
    except IndexError:  # cut short
        return budget
    return budget


def batch_parts(data: bytes | memoryview, *, backward: bool) -> list[memoryview]:
    """The parts of a serialized ForwardBatchRequest (BackwardBatchRequest if ``backward``): the bytes
    of each ForwardRequest (BackwardRequest) it carries, in order, each for :func:`_parse` to take
    alone. Found on the wire, before anything is parsed: more than MAX_BATCH_PARTS parts
    (RESOURCE_EXHAUSTED), more than MAX_BATCH_FIELDS fields in all, the parts' and their tensors'
    included, or wire data that cannot be followed (INVALID_ARGUMENT) refuse the whole call. Fields
    of other numbers (a later version's) are skipped."""
    name = "BackwardBatchRequest" if backward else "ForwardBatchRequest"
    view, at, fields = memoryview(data), 0, 0
    parts: list[memoryview] = []

    def undecodable(why: str) -> RequestError:
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {name}: {why}")

    try:
        while at < len(view):
            fields += 1
            if fields > MAX_BATCH_PARTS + 16 or len(parts) > MAX_BATCH_PARTS:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a batched call may carry at most "
                                   f"{MAX_BATCH_PARTS} parts; split it")
            tag, at = _varint(view, at)
            number, wire = tag >> 3, tag & 7
            if number == 0 or (number == 1 and wire != 2):
                raise undecodable(f"field {number} of wire type {wire}")
            if wire == 0:
                _, at = _varint(view, at)
            elif wire == 1 or wire == 5:
                at += 8 if wire == 1 else 4
            elif wire == 2:
                size, at = _varint(view, at)
                if number == 1:
                    parts.append(view[at : at + size])
                at += size
            else:
                raise undecodable(f"wire type {wire}")
    except IndexError:
        raise undecodable("cut short") from None
    if at != len(view):
        raise undecodable("cut short")
    if len(parts) > MAX_BATCH_PARTS:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a batched call may carry at most "
                           f"{MAX_BATCH_PARTS} parts; split it")
    budget: float = MAX_BATCH_FIELDS - fields
    tensors = {2: MAX_BATCH_FIELDS, 3: MAX_BATCH_FIELDS}
    for part in parts:
        budget = _walk(part, MAX_BATCH_FIELDS, tensors, budget)
        if budget < 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"a {name} of more than {MAX_BATCH_FIELDS} fields in all (its parts and "
                               f"their tensors included): refused before parsing")
    return parts


def parse_packed(data: bytes, *, backward: bool, max_batch_tokens: int) -> pb.PackedRequest:
    """A serialized PackedRequest whose parts can be told apart, else RequestError for the whole call:
    its fields counted before it is parsed (at most MAX_BATCH_PARTS uids and row counts), at most
    MAX_BATCH_PARTS parts and no more rows than they may carry (max_batch_tokens each: RESOURCE_EXHAUSTED),
    a row count per uid, each at least 1, adding up to the first dimension of the inputs (and of the output
    gradients, backward), tensors of rank 2 to MAX_RANK of a dtype the wire carries, and a known reply
    compression (INVALID_ARGUMENT)."""
    if not within_fields(data, 2 * MAX_BATCH_PARTS + 16, {3: MAX_TENSOR_FIELDS, 4: MAX_TENSOR_FIELDS}):
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a packed call may carry at most "
                           f"{MAX_BATCH_PARTS} parts (or it has too many fields); split it")
    try:
        request = pb.PackedRequest.FromString(data)
    except DecodeError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable PackedRequest: {e}") from None

    def refuse(why: str) -> RequestError:
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed PackedRequest: {why}")

    if len(request.uids) > MAX_BATCH_PARTS:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a packed call may carry at most "
                           f"{MAX_BATCH_PARTS} parts; split it")
    if not request.uids:
        raise refuse("no parts")
    if len(request.rows) != len(request.uids) or min(request.rows) < 1:
        raise refuse("a row count of at least 1 per uid")
    if sum(request.rows) > len(request.uids) * max_batch_tokens:  # more than its parts may carry: not decoded
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a packed call of {sum(request.rows)} rows "
                           f"in {len(request.uids)} parts exceeds the limit of {max_batch_tokens} per part")
    if request.reply_compression not in pb.Compression.values():
        raise refuse(f"unknown reply compression {request.reply_compression}")
    tensors = [("inputs", request.inputs)] + ([("grad_outputs", request.grad_outputs)] if backward else [])
    for name, tensor in tensors:
        if not 2 <= len(tensor.shape) <= MAX_RANK or tensor.dtype not in DTYPES:
            raise refuse(f"{name} must be a tensor of rank 2 to {MAX_RANK} of a dtype the wire carries")
        if tensor.shape[0] != sum(request.rows):
            raise refuse(f"{name} of {tensor.shape[0]} rows, the parts' rows add up to {sum(request.rows)}")
    return request


def check_packed_part(backends: Mapping[str, ExpertBackend], uid: str, shape: tuple[int, ...],
                      request: pb.PackedRequest, *, backward: bool, max_batch_tokens: int
                      ) -> tuple[ExpertBackend, int]:
    """(backend, tokens) of a packed call's part ``uid`` of ``shape``, checked as a per-expert call declaring
    these shapes and dtypes would be (check_declared_request, and decode_request's shape checks), else its
    RequestError; and an expert of one input and one output of its input's shape and dtype."""
    backend = backends.get(uid)
    if backend is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"no expert {uid!r} on this node")
    try:
        if len(backend.input_schema) != 1 or len(backend.output_schema) != 1:
            raise ValueError(f"{uid} takes {len(backend.input_schema)} inputs and gives "
                             f"{len(backend.output_schema)} outputs: call it per expert or batched")
        _, num_tokens = backend.check_input_shapes([shape], [request.inputs.dtype])
        if num_tokens > max_batch_tokens:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request of {num_tokens} tokens "
                               f"exceeds this node's limit of {max_batch_tokens}; split it")
        expected = backend.output_shapes([shape])[0]
        if expected != (shape, request.inputs.dtype):
            raise ValueError(f"{uid} gives outputs of shape {list(expected[0])} {expected[1]}, not its "
                             "inputs': call it per expert or batched")
        if backward:
            backend.check_grad_output_shapes([shape], [(shape[0], *request.grad_outputs.shape[1:])],
                                             [request.grad_outputs.dtype])
    except ValueError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return backend, num_tokens


PackedParts = tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, dict[int, RequestError]]


def decode_packed(request: pb.PackedRequest, rows: list[int], checked: Mapping[int, ExpertBackend], *,
                  backward: bool, max_input_abs: float, max_grad_abs: float) -> PackedParts:
    """A packed call's tensors decoded (RequestError for the whole call if they do not decode), and for each
    part in ``checked`` (those that passed check_packed_part) its rows: inputs, output gradients (backward)
    and, for parts whose values are not finite or out of the node's bounds, the RequestError their own call
    would get (all the values checked at once; part by part only if that finds a bad one)."""
    try:  # decoded only up to the rows declared (parse_packed: they are the tensors' first dimension)
        numel = sum(rows) * math.prod(request.inputs.shape[1:])
        inputs = deserialize(request.inputs, max_numel=numel)
        grads = deserialize(request.grad_outputs, max_numel=numel) if backward else None
    except ValueError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable PackedRequest: {e}") from None
    input_rows = inputs.split(rows)  # one view per part
    xs = {i: input_rows[i] for i in checked}
    gs = None
    if grads is not None:
        grad_rows = grads.split(rows)
        gs = {i: grad_rows[i] for i in checked}
    whole = len(checked) == len(rows)  # every part's values: the tensors as they are
    refused: dict[int, RequestError] = {}
    for values, tensor, what, bound in ((xs, inputs, "inputs", max_input_abs),
                                        (gs, grads, "grad_outputs", max_grad_abs)):
        if values is None or _all_within([tensor] if whole else list(values.values()), bound):
            continue
        for i in values:
            if i in refused:
                continue
            try:
                checked[i].check_values([values[i]], what, bound)
            except OutOfBounds as e:
                refused[i] = RequestError(grpc.StatusCode.OUT_OF_RANGE, str(e))
            except ValueError as e:
                refused[i] = RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return xs, gs, refused


def _varint(view: memoryview, at: int) -> tuple[int, int]:
    byte = view[at]
    if byte < 0x80:  # one byte: most tags and lengths of a request (a batched call reads thousands)
        return byte, at + 1
    value = shift = 0
    for _ in range(10):
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    raise IndexError("varint longer than 10 bytes")


def _parse(message_cls: type[Message], data: bytes) -> Message:
    limits = FIELD_LIMITS.get(message_cls)
    if limits is not None and not within_fields(data, *limits):
        tensors = f", or a tensor of more than {MAX_TENSOR_FIELDS}" if limits[1] else ""
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"a {message_cls.__name__} of more than "
                           f"{limits[0]} fields{tensors}: refused before parsing")
    try:
        return message_cls.FromString(data)
    except DecodeError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"undecodable {message_cls.__name__}: {e}") from None
