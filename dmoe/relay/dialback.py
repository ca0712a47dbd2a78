"""A relay's dial-back (:mod:`dmoe.relay.server`, ``probe``): can the swarm dial a node's gRPC port, and is it
that node which answers there?

A TCP connection alone is not enough: a home router may answer on the port itself, or forward it
to another machine. So the relay also calls ``Info`` at that address, as any member of the swarm
would (the swarm's TLS and a token of its key in a private swarm), and compares the node id in
the reply with the one the node gave. Whatever answers otherwise, or not with a NodeInfo, fails the
check. Some answers show a gRPC server there without showing whose it is: no answer in time (a
node busy starting up), a refusal by the node's own limits or key (a relay that lacks the key of a
private swarm, or calls a TLS node without it), a reply too big to read. The verdict then rests
on the TCP connection, and says so (``"verified": false``).

Nothing of the answering server's reaches the relay's reply but a bounded excerpt: the node reads
replies of at most ``MAX_LINE`` bytes.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError

from dmoe.core.addresses import host_port
from dmoe.core.auth import SwarmKey, fullmethod
from dmoe.proto import expert_pb2 as pb
from dmoe.relay.protocol import close_quietly

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name
MAX_INFO_BYTES = 4 << 20  # a node's Info lists every expert's schema and stats (~150 bytes each)
MAX_EXCERPT = 120  # characters of a node id or status detail quoted in a verdict
# a gRPC server answered, but not whose it is: the connection has to do
UNVERIFIED_CODES = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class Unverified(Exception):
    """Something answered at the address, but whether it is the node cannot be told."""


async def dial_back(ip: str, port: int, *, node_id: object, tls: bool, key: SwarmKey | None, timeout: float,
                    call_timeout: float, credentials: tuple | None = None) -> dict[str, object]:
    """The ``probe`` verdict on ``ip:port``: {"reachable", "address", "error", "verified"}. ``node_id``
    is what the asking node sent: a probe without one (an older node) gets the TCP check alone.
    ``timeout`` bounds the dial, ``call_timeout`` the Info call; ``credentials`` are
    :func:`dmoe.core.tls.channel_credentials` of ``key``, made once by the caller."""
    address = host_port(ip, port)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
        close_quietly(writer)
    except (OSError, TimeoutError) as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        return {"reachable": False, "address": address, "error": reason, "verified": False}
    unverified = {"reachable": True, "address": address, "error": "", "verified": False}
    if not isinstance(node_id, str) or not node_id or (tls and (key is None or credentials is None)):
        return unverified
    try:
        error = await identify(address, node_id, key=key, timeout=call_timeout,
                               credentials=credentials if tls else None)
    except Unverified:
        return unverified
    return {"reachable": not error, "address": address, "error": error, "verified": not error}


async def identify(address: str, node_id: str, *, key: SwarmKey | None, timeout: float,
                   credentials: tuple | None) -> str:
    """'' if the server at ``address`` answers Info as dmoe node ``node_id``; else what is wrong.
    Over TLS if ``credentials`` (:func:`dmoe.core.tls.channel_credentials`). Raises :class:`Unverified`."""
    options = [("grpc.max_receive_message_length", MAX_INFO_BYTES)]
    if credentials is not None:
        channel = grpc.aio.secure_channel(address, credentials[0], options=options + credentials[1])
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    method = fullmethod(SERVICE, "Info")
    try:
        call = channel.unary_unary(method, request_serializer=pb.InfoRequest.SerializeToString,
                                   response_deserializer=None)
        metadata = key.call_metadata(method) if key is not None else None
        info = pb.NodeInfo.FromString(await call(pb.InfoRequest(), timeout=timeout, metadata=metadata))
    except grpc.RpcError as e:
        if e.code() in UNVERIFIED_CODES:
            raise Unverified(e.code().name) from None
        return f"no dmoe node answered there ({e.code().name}: {excerpt(e.details())})"
    except DecodeError:
        return "no dmoe node answered there (its reply is no NodeInfo)"
    finally:
        await channel.close()
    if info.node_id == node_id:
        return ""
    return f"another dmoe node answered there ({excerpt(info.node_id) or '?'})"


def excerpt(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_EXCERPT else text[:MAX_EXCERPT] + "..."
