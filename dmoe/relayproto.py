"""The relay's wire protocol, its limits, and the byte pipe that both of its sides use (:mod:`dmoe.relay`,
:mod:`dmoe.node.relaylink`).

Every message is one JSON object on one line of at most ``MAX_LINE`` bytes, with a string ``op``;
anything else is a :class:`ProtocolError`. After ``attach``, a connection carries raw bytes that
:func:`splice` copies both ways. Addresses are ``host:port`` (``[v6]:port``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from typing import Any

from dmoe.auth import SwarmKey
from dmoe.errors import ConfigError

MAX_LINE = 4096
CHUNK = 256 << 10
PING_INTERVAL = 10.0
REGISTER_METHOD = "/dmoe.Relay/Register/"  # + node id: a token names the node it registers
PROBE_METHOD = "/dmoe.Relay/Probe"
PROBE_REPLY_TIMEOUT = 10.0  # seconds a node waits for a relay's verdict on its probe (dial + Info call)


@dataclasses.dataclass(kw_only=True, slots=True)
class RelayLimits:
    max_nodes: int = 256  # nodes registered at once
    max_nodes_per_ip: int = 16  # nodes registered from one IP (a household behind one NAT)
    max_connections_per_node: int = 64  # client connections spliced to one node
    max_connections_per_client: int = 16  # client connections from one IP, all nodes together
    max_control_connections_per_ip: int = 64  # connections from one IP on the relay's own port
    rate_mbit: float = 0.0  # bytes forwarded per node, both directions together (0: no limit)
    first_line_timeout: float = 5.0  # seconds a new connection on the relay's port has to say what it wants
    attach_timeout: float = 10.0  # seconds a client connection waits for its node to attach
    probes_per_minute: float = 30.0  # probes one IP may ask for
    probe_timeout: float = 3.0  # seconds a probe's dial may take
    probe_call_timeout: float = 5.0  # seconds the Info call that checks who answers may take
    control_timeout: float = 3 * PING_INTERVAL  # a control channel silent this long is dropped

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_nodes_per_ip", "max_connections_per_node", "max_connections_per_client",
                     "max_control_connections_per_ip", "first_line_timeout", "attach_timeout",
                     "probes_per_minute", "probe_timeout", "probe_call_timeout", "control_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"relay {name} must be > 0, got {getattr(self, name)}")
        if self.rate_mbit < 0:
            raise ConfigError(f"relay rate_mbit must be >= 0, got {self.rate_mbit}")
        if self.probe_timeout + self.probe_call_timeout >= PROBE_REPLY_TIMEOUT:
            raise ConfigError(f"relay probe_timeout + probe_call_timeout must stay under the "
                              f"{PROBE_REPLY_TIMEOUT:g} s a node waits for the verdict")
        if self.control_timeout <= PING_INTERVAL:
            raise ConfigError(f"relay control_timeout must be longer than the ping interval ({PING_INTERVAL:g} s)")


class ProtocolError(Exception):
    """A peer sent something that is not the relay's protocol."""


async def read_message(reader: asyncio.StreamReader, timeout: float | None = None) -> dict[str, Any]:
    """One JSON object from one line; ProtocolError for anything else, EOFError when the peer left."""
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
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
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE), timeout)


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError if it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def parse_port_range(text: str) -> tuple[int, int]:
    """(first, last) of 'FIRST-LAST' (or one port); ValueError otherwise."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"expected a port range such as 40000-40999, got {text!r}") from None
    if not 0 < low <= high < 65536:
        raise ValueError(f"expected a port range within 1-65535, got {text!r}")
    return low, high


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_source(peer: str) -> str:
    """A loopback address that stands for a relayed client (127.x.y.z from its IP), so that the
    node's per-peer limits still tell relayed clients apart."""
    ip = peer.rpartition(":")[0].strip("[]")
    a, b, c = hashlib.blake2b(ip.encode(), digest_size=3).digest()
    return f"127.{a}.{b}.{max(2, c)}"


class TokenBucket:
    """``rate`` units per second with room for ``burst``; ``take`` waits while in debt."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, amount: float = 1.0) -> bool:
        self._refill()
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    async def take(self, amount: float) -> None:
        self._refill()
        self.tokens -= amount
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 bucket: TokenBucket | None = None, counter: list[int] | None = None) -> None:
    """Copy bytes both ways until either side ends; then close both."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            if bucket is not None:
                await bucket.take(len(data))
            if counter is not None:
                counter[0] += len(data)
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(pipe(a[0], b[1])), asyncio.ensure_future(pipe(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
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
    return reply


def register_message(node_id: str, key: SwarmKey | None, secret: str | None = None) -> dict[str, Any]:
    """``secret``: what the relay answered this node's last registration, which lets it take its
    place (and port) back before the relay noticed it was gone."""
    message: dict[str, Any] = {"op": "register", "node_id": node_id}
    if key is not None:
        message["auth"] = key.call_metadata(REGISTER_METHOD + node_id)[0][1]
    if secret:
        message["secret"] = secret
    return message
