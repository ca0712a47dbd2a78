"""A hostile ExpertService for tests: it answers each uid the way the test asks, and the records it
plants in the DHT point clients at it, as a modified node would.

Modes (per uid): ``huge`` (outputs of 1e8), ``wrong_shape`` (one row too few), ``garbage`` (a reply
that is not a protobuf), ``slow`` (the right answer, ``slow_seconds`` late), ``honest_zero`` (zeros).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch
from loop_server import LoopServer

from dmoe.core.dht import DHTPeer
from dmoe.core.records import ExpertRecord, NodeRecord, store_announcement_async
from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name


class HostileServer(LoopServer):
    def __init__(self, modes: dict[str, str], slow_seconds: float = 3.0):
        self.modes, self.slow_seconds = modes, slow_seconds
        self.calls: dict[str, int] = {uid: 0 for uid in modes}
        super().__init__()
        self.endpoint = ""

    def start(self) -> HostileServer:
        self.endpoint = self._run_on_loop(self._start())
        return self

    async def _start(self) -> str:
        self._server = grpc.aio.server()
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._answer(backward=name == "Backward"),
                                                             request_deserializer=None,
                                                             response_serializer=None)
                    for name in ("Forward", "Backward")}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    def _answer(self, *, backward: bool):
        async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            request = (pb.BackwardRequest if backward else pb.ForwardRequest).FromString(data)
            mode = self.modes.get(request.uid)
            if mode is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such expert")
            self.calls[request.uid] += 1
            x = deserialize(request.inputs[0], max_numel=1 << 24)
            out = torch.zeros_like(x)
            if mode == "huge":
                out = torch.full_like(x, 1e8)
            elif mode == "wrong_shape":
                out = out[1:]
            elif mode == "garbage":
                return b"\xff\xff\xff\xff not a protobuf"
            elif mode == "slow":
                await asyncio.sleep(self.slow_seconds)
            reply = (pb.BackwardResponse(grad_inputs=[serialize(out)]) if backward
                     else pb.ForwardResponse(outputs=[serialize(out)]))
            return reply.SerializeToString()

        return handle



def plant_records(peer: DHTPeer, records: dict[str, str], node_id: str = "hostile",
                  ttl: float = 300.0, **fields) -> None:
    """Announce uid -> endpoint records in the DHT, as a node with this id would: owned by the peer's
    own key, so each is one more replica of its uid, beside those of honest nodes; ``fields``: the
    records' other fields, as such a node would announce them."""
    from hivemind.utils import get_dht_time

    experts = [ExpertRecord(uid=uid, endpoint=endpoint, node_id=node_id, expert_cls="ffn", **fields)
               for uid, endpoint in records.items()]
    node = NodeRecord(node_id=node_id, endpoint=next(iter(records.values())), updated_at=time.time(),
                      experts=list(records))
    stored = peer.run(store_announcement_async(peer.node, experts, node, get_dht_time() + ttl), 30)
    assert stored > 0, "the DHT accepted none of the planted records"
