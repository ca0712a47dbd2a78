"""GatedServer: a CountingServer whose calls wait until the test says how they end, for tests of
timing decisions (the dispatcher's quorum, deadlines and patience) that must not race a real clock.

Each unary call of a uid is counted as it arrives (``arrived``) and then held until the test opens
that uid's gate (:meth:`GatedServer.open`): with no status it is answered as a CountingServer answers
(zeros of the input's shape), with one it ends with that status. A gate once opened stays open: later
calls of the uid pass at once (a test uses uids of its own). ``remaining`` has the time each uid's last
call had left before its deadline when it arrived (the client's timeout, less the way there).
"""

from __future__ import annotations

import asyncio
import collections

import grpc
from counting_server import CountingServer

from dmoe.proto import expert_pb2 as pb


class GatedServer(CountingServer):
    def __init__(self):
        super().__init__()
        self.arrived: collections.Counter[str] = collections.Counter()  # calls received, per uid
        self.remaining: dict[str, float | None] = {}  # uid -> its last call's time left as it arrived
        self._gates: dict[str, asyncio.Event] = {}  # uid -> opened (on the server's loop only)
        self._endings: dict[str, grpc.StatusCode | None] = {}  # uid -> how its calls end once opened

    def _gate(self, uid: str) -> asyncio.Event:
        if uid not in self._gates:
            self._gates[uid] = asyncio.Event()
        return self._gates[uid]

    def open(self, uid: str, code: grpc.StatusCode | None = None) -> None:
        """Let the calls of ``uid`` (held now, or to come) end: answered, or with status ``code``."""
        async def opened() -> None:
            self._endings[uid] = code
            self._gate(uid).set()

        self._run_on_loop(opened())

    def _unary(self, *, backward: bool):
        answer = super()._unary(backward=backward)

        async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            uid = (pb.BackwardRequest if backward else pb.ForwardRequest).FromString(data).uid
            self.remaining[uid] = context.time_remaining()
            self.arrived[uid] += 1
            await self._gate(uid).wait()
            code = self._endings[uid]
            if code is not None:
                await context.abort(code, f"{uid}: ended by the test")
            return await answer(data, context)

        return handle
