"""A relay's dial-back (:mod:`dmoe.relay`, ``probe``): can the swarm dial a node's gRPC port, and is it
that node which answers there?

A TCP connection alone is not enough: a home router may answer on the port itself, or forward it
to another machine. So the relay also calls ``Info`` at that address, as any member of the swarm
would (the swarm's TLS and a token of its key in a private swarm), and compares the node id in
the reply with the one the node gave. Whatever answers otherwise, or not with a NodeInfo, fails the
check. A relay without the key of a private swarm cannot call its nodes, and a node may be too busy
to answer in time: the verdict then rests on the TCP connection, and says so (``"verified": false``).
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError

from dmoe.auth import SwarmKey, fullmethod
from dmoe.proto import expert_pb2 as pb
from dmoe.relayproto import close_quietly, join_address

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name
MAX_INFO_BYTES = 16 << 20  # a node's Info lists every expert's schema and stats


async def dial_back(ip: str, port: int, *, node_id: object, tls: bool, key: SwarmKey | None,
                    timeout: float, call_timeout: float) -> dict[str, object]:
    """The ``probe`` verdict on ``ip:port``: {"reachable", "address", "error", "verified"}. ``node_id``
    is what the asking node sent: a probe without one (an older node) gets the TCP check alone.
    ``timeout`` bounds the dial, ``call_timeout`` the Info call; a connection whose Info call gets no
    answer in time counts as reachable, unverified, since a slow node is likelier than a silent one."""
    address = join_address(ip, port)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
        close_quietly(writer)
    except (OSError, TimeoutError) as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        return {"reachable": False, "address": address, "error": reason, "verified": False}
    unverified = {"reachable": True, "address": address, "error": "", "verified": False}
    if not isinstance(node_id, str) or not node_id or (tls and key is None):
        return unverified
    try:
        error = await identify(address, node_id, tls=tls, key=key, timeout=call_timeout)
    except TimeoutError:  # a node busy starting up, or a silent listener: the connection has to do
        return unverified
    return {"reachable": not error, "address": address, "error": error, "verified": not error}


async def identify(address: str, node_id: str, *, tls: bool, key: SwarmKey | None, timeout: float) -> str:
    """'' if the server at ``address`` answers Info as dmoe node ``node_id``; else what is wrong.
    TimeoutError if nothing answers within ``timeout``."""
    options = [("grpc.max_receive_message_length", MAX_INFO_BYTES)]
    if tls:
        from dmoe.tls import channel_credentials

        assert key is not None
        credentials, tls_options = channel_credentials(key)
        channel = grpc.aio.secure_channel(address, credentials, options=options + tls_options)
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    method = fullmethod(SERVICE, "Info")
    try:
        call = channel.unary_unary(method, request_serializer=pb.InfoRequest.SerializeToString,
                                   response_deserializer=None)
        metadata = key.call_metadata(method) if key is not None else None
        info = pb.NodeInfo.FromString(await call(pb.InfoRequest(), timeout=timeout, metadata=metadata))
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise TimeoutError(f"no answer from {address} in {timeout:g} s") from None
        return f"no dmoe node answered there ({e.code().name}: {e.details()})"
    except DecodeError:
        return "no dmoe node answered there (its reply is no NodeInfo)"
    finally:
        await channel.close()
    return "" if info.node_id == node_id else f"another dmoe node answered there ({info.node_id or '?'})"
