"""A minimal ExpertService for tests that counts what clients send it: calls and stream chunks per uid.

It answers Forward and Backward (unary or streamed) of any uid with zeros of the input's shape, as an
honest expert of an all-zero function would, on 127.0.0.1 and, if asked, on a unix socket too; with
``batched``, ForwardBatch and BackwardBatch too (as a node from before packed calls); with ``packed``, a
function from a PackedRequest to the bytes it answers ForwardPacked and BackwardPacked with (anything
a node could send). Its own event loop runs in a thread, so a test's blocking client can call it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable

import grpc
import torch
from loop_server import LoopServer

from dmoe.core.wire import deserialize, join_chunks, serialize, split_chunks
from dmoe.proto import expert_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name
MAX_BYTES = 64 << 20


class CountingServer(LoopServer):
    def __init__(self, unix_path: str | None = None, delay: float = 0.0, num_ports: int = 1,
                 batched: bool = False, packed: Callable[[pb.PackedRequest], bytes] | None = None):
        self.unix_path, self.delay, self.num_ports = unix_path, delay, num_ports
        self.batched, self.packed = batched, packed
        self.methods: collections.Counter[str] = collections.Counter()  # calls received, per method
        self.calls: collections.Counter[str] = collections.Counter()  # requests answered, per uid
        self.chunks: collections.Counter[str] = collections.Counter()  # stream chunks received, per uid
        self.started = threading.Event()  # set when a call begins (it then waits ``delay``)
        self.refuse: set[str] = set()  # uids whose unary calls it refuses with INVALID_ARGUMENT
        super().__init__()
        self.endpoints: list[str] = []  # one per port it listens on (num_ports), all on 127.0.0.1

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    def start(self) -> CountingServer:
        self.endpoints = self._run_on_loop(self._start())
        return self

    async def _start(self) -> list[str]:
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_BYTES)])
        handlers = {}
        raw = {"request_deserializer": None, "response_serializer": None}
        for name in ("Forward", "Backward"):
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._unary(backward=name == "Backward"), **raw)
            handlers[name + "Stream"] = grpc.stream_stream_rpc_method_handler(
                self._stream(backward=name == "Backward"), **raw)
            if self.batched:
                handlers[name + "Batch"] = grpc.unary_unary_rpc_method_handler(
                    self._batch(backward=name == "Backward"), **raw)
            if self.packed is not None:
                handlers[name + "Packed"] = grpc.unary_unary_rpc_method_handler(self._packed(name + "Packed"),
                                                                                **raw)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        ports = [self._server.add_insecure_port("127.0.0.1:0") for _ in range(self.num_ports)]
        if self.unix_path:
            self._server.add_insecure_port(f"unix:{self.unix_path}")
        await self._server.start()
        return [f"127.0.0.1:{port}" for port in ports]

    async def _reply(self, data: bytes, backward: bool, chunks: int = 0) -> bytes:
        request = (pb.BackwardRequest if backward else pb.ForwardRequest).FromString(data)
        self.calls[request.uid] += 1
        self.chunks[request.uid] += chunks
        self.started.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        out = torch.zeros_like(deserialize(request.inputs[0], max_numel=1 << 24))
        reply = (pb.BackwardResponse(grad_inputs=[serialize(out)]) if backward
                 else pb.ForwardResponse(outputs=[serialize(out)]))
        return reply.SerializeToString()

    def _unary(self, *, backward: bool):
        async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            uid = (pb.BackwardRequest if backward else pb.ForwardRequest).FromString(data).uid
            if uid in self.refuse:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{uid}: refused")
            return await self._reply(data, backward)

        return handle

    def _batch(self, *, backward: bool):
        async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.methods["BackwardBatch" if backward else "ForwardBatch"] += 1
            parts = (pb.BackwardBatchRequest if backward else pb.ForwardBatchRequest).FromString(data).parts
            replies = [pb.PartReply.FromString(await self._reply(part.SerializeToString(), backward))
                       for part in parts]  # a Forward/BackwardResponse's field 1 is PartReply's field 1
            return (pb.BackwardBatchResponse if backward else pb.ForwardBatchResponse)(
                parts=replies).SerializeToString()

        return handle

    def _packed(self, method: str):
        async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.methods[method] += 1
            request = pb.PackedRequest.FromString(data)
            for uid in request.uids:
                self.calls[uid] += 1
            return self.packed(request)

        return handle

    def _stream(self, *, backward: bool):
        async def handle(requests, context: grpc.aio.ServicerContext):
            num_chunks = 0

            async def parsed():
                nonlocal num_chunks
                async for data in requests:
                    num_chunks += 1
                    yield pb.Chunk.FromString(data)

            data = await join_chunks(parsed(), max_bytes=MAX_BYTES)
            reply = await self._reply(data, backward, num_chunks)
            for chunk in split_chunks(reply, 1 << 20):
                yield chunk.SerializeToString()

        return handle

