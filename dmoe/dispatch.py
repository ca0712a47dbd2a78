"""Dispatcher: expert calls from a client, all in flight at once, with deadlines and a quorum.

Calls run on the Swarm's background event loop (uvloop) over one long-lived grpc.aio channel per
endpoint. :meth:`Dispatcher.forward` waits until every token has ``k_min`` answers
(or every call has ended, or ``forward_timeout`` passed), then at most ``timeout_after_k_min``
more for the rest. A reply that is malformed, of the wrong shape or dtype, or not finite counts as
a failure of that expert, exactly like an error status or a missed deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import torch

from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.wire import deserialize, serialize

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20


@dataclasses.dataclass(slots=True)
class ExpertCall:
    uid: str
    endpoint: str
    inputs: torch.Tensor  # [n, D], the rows of the tokens sent to this expert
    token_ids: torch.Tensor  # [n], which tokens of the batch they are
    grad_outputs: torch.Tensor | None = None


class Dispatcher:
    """Expert calls on an event loop that runs in another thread (the Swarm's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, compression: int = pb.NONE):
        self._loop, self.compression = loop, compression
        self._channels: dict[str, tuple[grpc.aio.Channel, pbg.ExpertServiceStub]] = {}

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        """Close the channels (the loop belongs to the caller)."""
        if self._loop.is_closed():
            return

        async def close() -> None:
            for channel, _ in self._channels.values():
                await channel.close()
            self._channels.clear()

        self.run(close())

    def _stub(self, endpoint: str) -> pbg.ExpertServiceStub:
        if endpoint not in self._channels:
            channel = grpc.aio.insecure_channel(endpoint, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ])
            self._channels[endpoint] = (channel, pbg.ExpertServiceStub(channel))
        return self._channels[endpoint][1]

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self, calls: list[ExpertCall], *, num_tokens: int, k_min: int, forward_timeout: float,
        timeout_after_k_min: float, on_result: Callable[[str, bool], None],
    ) -> dict[int, torch.Tensor]:
        """Outputs of the calls that answered in time and well, by index in ``calls``."""
        return self.run(self._forward(calls, num_tokens, k_min, forward_timeout, timeout_after_k_min, on_result))

    async def _call_forward(self, call: ExpertCall, timeout: float) -> torch.Tensor:
        request = pb.ForwardRequest(uid=call.uid, inputs=[serialize(call.inputs, self.compression)],
                                    reply_compression=self.compression)
        reply = await self._stub(call.endpoint).Forward(request, timeout=timeout)
        return _checked(reply.outputs, call.inputs)

    async def _forward(self, calls, num_tokens, k_min, forward_timeout, timeout_after_k_min, on_result):
        started = time.monotonic()
        tasks = {asyncio.create_task(self._call_forward(c, forward_timeout)): i for i, c in enumerate(calls)}
        candidates_T = torch.zeros(num_tokens, dtype=torch.long)
        for call in calls:
            candidates_T[call.token_ids] += 1
        need_T = candidates_T.clamp(max=k_min)
        answered_T = torch.zeros(num_tokens, dtype=torch.long)
        results: dict[int, torch.Tensor] = {}
        pending, quorum_at = set(tasks), None
        while pending:
            now = time.monotonic()
            deadline = started + forward_timeout
            if quorum_at is not None:
                deadline = min(deadline, quorum_at + timeout_after_k_min)
            done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - now),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for task in done:
                index = tasks[task]
                call = calls[index]
                try:
                    results[index] = task.result()
                except (grpc.RpcError, ValueError) as e:
                    logger.debug("forward to %s at %s failed: %s", call.uid, call.endpoint, e)
                    on_result(call.endpoint, False)
                    continue
                on_result(call.endpoint, True)
                answered_T[call.token_ids] += 1
            if quorum_at is None and bool((answered_T >= need_T).all()):
                quorum_at = time.monotonic()
        for task in pending:  # late: dropped, and counted as a failure of its endpoint
            task.cancel()
            on_result(calls[tasks[task]].endpoint, False)
        return results

    # ---- backward -----------------------------------------------------------------------------
    def backward(
        self, calls: list[ExpertCall], *, backward_timeout: float, on_result: Callable[[str, bool], None]
    ) -> dict[int, torch.Tensor]:
        """Input gradients of the calls that answered in time and well, by index in ``calls``."""
        return self.run(self._backward(calls, backward_timeout, on_result))

    async def _call_backward(self, call: ExpertCall, timeout: float) -> torch.Tensor:
        assert call.grad_outputs is not None
        request = pb.BackwardRequest(uid=call.uid, inputs=[serialize(call.inputs, self.compression)],
                                     grad_outputs=[serialize(call.grad_outputs, self.compression)],
                                     reply_compression=self.compression)
        reply = await self._stub(call.endpoint).Backward(request, timeout=timeout)
        return _checked(reply.grad_inputs, call.inputs)

    async def _backward(self, calls, backward_timeout, on_result):
        replies = await asyncio.gather(*(self._call_backward(c, backward_timeout) for c in calls),
                                       return_exceptions=True)
        results = {}
        for index, (call, reply) in enumerate(zip(calls, replies)):
            if isinstance(reply, (grpc.RpcError, ValueError)):
                logger.debug("backward to %s at %s failed: %s", call.uid, call.endpoint, reply)
                on_result(call.endpoint, False)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                on_result(call.endpoint, True)
                results[index] = reply
        return results


def _checked(tensors, like: torch.Tensor) -> torch.Tensor:
    """The one reply tensor, if it has the shape and dtype of ``like`` and finite values (else ValueError)."""
    if len(tensors) != 1:
        raise ValueError(f"expected 1 tensor in the reply, got {len(tensors)}")
    tensor = deserialize(tensors[0], max_numel=like.numel())
    if tensor.shape != like.shape or tensor.dtype != like.dtype:
        raise ValueError(f"reply of shape {list(tensor.shape)} {tensor.dtype}, expected {list(like.shape)} {like.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("reply holds NaN or Inf")
    return tensor
