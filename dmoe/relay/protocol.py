"""The relay's wire protocol, its limits, and the byte pipe that both of its sides use
(:mod:`dmoe.relay.server`, :mod:`dmoe.node.relaylink`).

Every message is one JSON object on one line of at most ``MAX_LINE`` bytes, with a string ``op``;
anything else is a :class:`ProtocolError`. After ``attach``, a connection carries raw bytes that
:func:`splice` copies both ways. Addresses are ``host:port`` (``[v6]:port``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from dmoe.core.addresses import split_address
from dmoe.core.auth import SwarmKey
from dmoe.core.ratelimit import TokenBucket
from dmoe.relay.limits import PROBE_REPLY_TIMEOUT

MAX_LINE = 4096
CHUNK = 256 << 10
REGISTER_METHOD = "/dmoe.Relay/Register/"  # + node id: a token names the node it registers
PROBE_METHOD = "/dmoe.Relay/Probe"


class ProtocolError(Exception):
    """A peer sent something that is not the relay's protocol."""


async def read_message(reader: asyncio.StreamReader, timeout: float | None = None) -> dict[str, Any]:
    """One JSON object from one line; ProtocolError for anything else, EOFError when the peer left."""
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that arrives as the
        # line does (the caller then reads on; a link being shut down never ended)
        async with asyncio.timeout(timeout):
            line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("connection closed mid-message") from None
        raise EOFError from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"message longer than {MAX_LINE} bytes") from None
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested too deep
        raise ProtocolError("not a JSON line") from None
    if not isinstance(message, dict) or not isinstance(message.get("op", ""), str):
        raise ProtocolError("not a JSON object with a string 'op'")
    return message


def send_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


async def open_connection(address: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = split_address(address)
    async with asyncio.timeout(timeout):  # not wait_for: see read_message
        return await asyncio.open_connection(host, port, limit=MAX_LINE)


def loopback_source(peer: str) -> str:
    """A loopback address that stands for a relayed client (127.x.y.z from its IP), so that the
    node's per-peer limits still tell relayed clients apart."""
    ip = peer.rpartition(":")[0].strip("[]")
    a, b, c = hashlib.blake2b(ip.encode(), digest_size=3).digest()
    return f"127.{a}.{b}.{max(2, c)}"


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 bucket: TokenBucket | None = None, counter: list[int] | None = None, *,
                 idle_timeout: float | None = None, activity: list[float] | None = None) -> None:
    """Copy bytes both ways until either side ends, or until no byte has moved either way for
    ``idle_timeout`` seconds (a write that waits on a peer that reads nothing counts as idle too);
    then close both. ``activity[0]`` is kept at the time.monotonic() of the last byte moved."""
    last = activity if activity is not None else [0.0]
    last[0] = time.monotonic()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            last[0] = time.monotonic()
            if bucket is not None:
                await bucket.take(len(data))
            if counter is not None:
                counter[0] += len(data)
            writer.write(data)
            await writer.drain()
            last[0] = time.monotonic()

    tasks = [asyncio.ensure_future(pipe(a[0], b[1])), asyncio.ensure_future(pipe(b[0], a[1]))]
    try:
        while True:
            wait = None if idle_timeout is None else max(0.0, last[0] + idle_timeout - time.monotonic())
            done, _ = await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if done or (idle_timeout is not None and time.monotonic() - last[0] >= idle_timeout):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, writer in (a, b):
            close_quietly(writer)


def close_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (OSError, RuntimeError):  # uvloop: already closed underneath
        pass


# ---- the node's side: probe and register ------------------------------------------------------------
async def probe(relay: str, port: int, *, key: SwarmKey | None, node_id: str = "", tls: bool = False,
                timeout: float = PROBE_REPLY_TIMEOUT) -> dict[str, Any]:
    """Ask ``relay`` to dial this host back at ``port`` and check that node ``node_id`` answers there
    (over the swarm's TLS if ``tls``): {"reachable": bool, "address", "error", "verified"}.
    Raises OSError/ProtocolError when the relay cannot be asked, ConnectionRefusedError if it refuses."""
    reader, writer = await open_connection(relay, timeout)
    try:
        message: dict[str, Any] = {"op": "probe", "port": port, "node_id": node_id, "tls": tls}
        if key is not None:
            message["auth"] = key.call_metadata(PROBE_METHOD)[0][1]
        send_message(writer, message)
        reply = await read_message(reader, timeout)
    except EOFError:
        raise ProtocolError(f"relay {relay} closed the connection") from None
    finally:
        close_quietly(writer)
    if not reply.get("ok"):
        raise ConnectionRefusedError(f"relay {relay} refused the probe: {reply.get('error')}")
    fields = {"reachable": bool, "address": str, "error": str, "verified": bool}
    wrong = [name for name, kind in fields.items() if not isinstance(reply.get(name), kind)]
    if wrong:  # a relay may be anybody's: its reply is read only once it has the verdict's form
        raise ProtocolError(f"relay {relay} answered the probe without a verdict's {', '.join(wrong)}")
    return {name: reply[name] for name in fields}


def register_message(node_id: str, key: SwarmKey | None, secret: str | None = None) -> dict[str, Any]:
    """``secret``: what the relay answered this node's last registration, which lets it take its
    place (and port) back before the relay noticed it was gone."""
    message: dict[str, Any] = {"op": "register", "node_id": node_id}
    if key is not None:
        message["auth"] = key.call_metadata(REGISTER_METHOD + node_id)[0][1]
    if secret:
        message["secret"] = secret
    return message
