"""A batched call streamed to a node not yet known to have batched calls first asks it with an empty batched
call; the stream after it gets what that call left of the deadline, not the whole deadline again."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import grpc
import pytest
import torch

from dmoe.client.dispatch import Dispatcher, ExpertCall
from dmoe.core.records import ExpertRecord

pytestmark = pytest.mark.timeout(60)
PROBE_DELAY = 1.6  # the stand-in answers the empty batched call this late
TIMEOUT = 2.0  # backward_timeout


class SlowBatchedNode(grpc.GenericRpcHandler):
    """Answers the empty batched call after PROBE_DELAY; a batched stream takes the chunks, then stays
    silent until the test ends."""

    def __init__(self):
        self.released = threading.Event()

    def service(self, details):
        name = details.method.rsplit("/", 1)[1]
        if name in ("ForwardBatch", "BackwardBatch"):
            return grpc.unary_unary_rpc_method_handler(self.empty)
        if name.endswith("BatchStream"):
            return grpc.stream_stream_rpc_method_handler(self.silent)
        return None

    def empty(self, request: bytes, context) -> bytes:
        self.released.wait(PROBE_DELAY)
        return b""

    def silent(self, chunks, context):
        for _ in chunks:
            pass
        self.released.wait(30)
        return iter(())


def test_a_streamed_backward_ends_by_its_deadline_even_after_the_empty_batched_call():
    handler = SlowBatchedNode()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop)
    try:
        # 16 x 64 floats: above the record's 1 KiB messages, so the batch is streamed
        records = [ExpertRecord(uid=f"ffn.{i}", endpoint=f"127.0.0.1:{port}", node_id="n",
                                max_message_bytes=1024) for i in range(2)]
        calls = [ExpertCall.to(r, torch.randn(16, 64), torch.arange(16)) for r in records]
        for call in calls:
            call.grad_outputs = torch.randn(16, 64)
        failures = []
        started = time.monotonic()
        answers = dispatcher.backward(calls, backward_timeout=TIMEOUT,
                                      on_result=lambda call, error: failures.append(error))
        took = time.monotonic() - started
        assert took < TIMEOUT + 0.8, f"the backward took {took:.2f}s against a deadline of {TIMEOUT}s"
        assert len(failures) == 2 and all(error is not None for error in failures)
        assert not answers
    finally:
        handler.released.set()
        dispatcher.close()
        server.stop(0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
