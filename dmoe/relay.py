"""Relay: serves the experts of nodes that nobody can dial, over connections those nodes dial themselves.

A node behind a home router can dial out but cannot be dialled. It registers with a relay (the
coordinator runs one; any reachable node may offer one with ``--offer-relay``), which opens a
public port for it. A client that connects to that port is announced to the node over its control
connection; the node dials the relay once more for that client, and the relay splices the two TCP
connections. The client speaks the node's own gRPC through it, TLS included, so deadlines, quorum,
compression, validation and the swarm key's checks are the direct path's, and in a private swarm
the relay forwards ciphertext: it never sees tensors or tokens, and parses nothing but its own
JSON lines. (Why a TCP relay and not libp2p's circuit relays in hivemind.P2P: see docs/nat.md;
in short, the libp2p path costs every call a trip through the p2p daemon's socket and protobuf
framing even when direct, and the gRPC data plane would be written twice.)

Protocol, on one listening port. Every message is one JSON line of at most 4 KiB:

- ``{"op": "probe", "port": P}``: the relay dials *the asking connection's own IP* at port P
  (never another address) and answers ``{"reachable": bool, "address": "ip:P", "error": str}``.
  That is how a node learns whether others can dial its gRPC endpoint.
- ``{"op": "register", "node_id": ID, "auth": TOKEN}``: answered ``{"ok": true, "endpoint":
  "host:port"}``, the node's public address on this relay, or ``{"ok": false, "error": ...}``. The
  connection stays open as the node's control channel: the relay sends ``{"op": "open", "conn":
  C, "peer": "ip:port"}`` for every client connection and ``{"op": "ping"}``; the node answers pings.
- ``{"op": "attach", "conn": C}`` on a new connection from the node: from then on raw bytes,
  spliced to the client connection C (a 128-bit random name, known only to the node).

In a private swarm, probe and register carry a token of the swarm key (:mod:`dmoe.auth`);
without it they are refused. Limits (:class:`RelayLimits`): registered nodes, connections per node
and per client IP, bytes per second per node, probes per IP, and how long a client waits for its node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import json
import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from dmoe.auth import CallVerifier, SwarmKey
from dmoe.errors import ConfigError

if TYPE_CHECKING:
    from dmoe.peer import DHTPeer

logger = logging.getLogger(__name__)

MAX_LINE = 4096
CHUNK = 256 << 10
PING_INTERVAL = 10.0
REGISTER_METHOD = "/dmoe.Relay/Register/"  # + node id: a token names the node it registers
PROBE_METHOD = "/dmoe.Relay/Probe"


@dataclasses.dataclass(kw_only=True, slots=True)
class RelayLimits:
    max_nodes: int = 256  # nodes registered at once
    max_connections_per_node: int = 64  # client connections spliced to one node
    max_connections_per_client: int = 16  # client connections from one IP, all nodes together
    rate_mbit: float = 0.0  # bytes forwarded per node, both directions together (0: no limit)
    attach_timeout: float = 10.0  # seconds a client connection waits for its node to attach
    probes_per_minute: float = 30.0  # probes one IP may ask for
    probe_timeout: float = 3.0  # seconds a probe's dial may take
    control_timeout: float = 3 * PING_INTERVAL  # a control channel silent this long is dropped

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_connections_per_node", "max_connections_per_client", "attach_timeout",
                     "probes_per_minute", "probe_timeout", "control_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"relay {name} must be > 0, got {getattr(self, name)}")
        if self.rate_mbit < 0:
            raise ConfigError(f"relay rate_mbit must be >= 0, got {self.rate_mbit}")


class ProtocolError(Exception):
    """A peer of the relay sent something that is not its protocol."""


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
    except (UnicodeDecodeError, json.JSONDecodeError):
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


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
            writer.close()


@dataclasses.dataclass(slots=True)
class _Tunnel:
    """One registered node: its control channel, public port and client connections."""
    node_id: str
    control: asyncio.StreamWriter
    server: asyncio.Server
    endpoint: str
    bucket: TokenBucket | None
    pending: dict[str, asyncio.Future] = dataclasses.field(default_factory=dict)
    num_connections: int = 0
    forwarded: list[int] = dataclasses.field(default_factory=lambda: [0])


class Relay:
    """``with Relay(host=..., key=...) as relay: relay.address``; runs on a thread of its own."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, announce_host: str | None = None,
                 key: SwarmKey | None = None, limits: RelayLimits | None = None):
        if host in ("0.0.0.0", "::") and not announce_host:
            raise ConfigError(f"a relay listening on {host} needs an address to announce (announce host)")
        self.host, self.port, self.announce_host = host, port, announce_host or host
        self.verifier = CallVerifier(key) if key is not None else None
        self.limits = limits or RelayLimits()
        self.address = ""  # host:port nodes dial to probe and register, once started
        self.tunnels: dict[str, _Tunnel] = {}
        self.num_refused = 0  # registrations, probes and client connections refused by a limit or the key
        self._clients: dict[str, int] = {}  # open client connections per IP
        self._probe_buckets: dict[str, TokenBucket] = {}
        self._last_port: dict[str, int] = {}  # node id -> its last public port, offered again on re-register
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Relay:
        from dmoe.peer import new_event_loop

        self.loop = new_event_loop("uvloop")
        self._thread = threading.Thread(target=self.loop.run_forever, name="dmoe-relay", daemon=True)
        self._thread.start()
        try:
            self.run(self._start(), timeout)
        except BaseException:
            self.shutdown()
            raise
        logger.info("relay listening on %s", self.address)
        return self

    def run(self, coroutine, timeout: float | None = None) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_LINE)
        self.address = join_address(self.announce_host, self._server.sockets[0].getsockname()[1])

    def spawn(self, coroutine, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def shutdown(self) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        try:
            self.run(self._stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self.loop.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for tunnel in list(self.tunnels.values()):
            self._drop(tunnel)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def announce(self, dht: DHTPeer, peer_id: str, *, interval: float = 10.0, ttl: float = 30.0) -> None:
        """Store this relay's record in the swarm's DHT now, and again every ``interval`` seconds."""
        from hivemind.utils import get_dht_time

        from dmoe.records import RelayRecord, store_relay_async

        async def store() -> bool:
            assert dht.node is not None
            record = RelayRecord(address=self.address, peer_id=peer_id, updated_at=time.time())
            return await dht.run_async(store_relay_async(dht.node, record, get_dht_time() + ttl))

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    if not await store():
                        logger.warning("no DHT peer took this relay's record; retrying in %.0fs", interval)
                except Exception as e:
                    logger.warning("could not announce this relay: %s", e)

        async def begin() -> None:
            await store()
            self.spawn(beat(), "dmoe-relay-announce")

        self.run(begin(), 30)

    def public_ports(self) -> list[int]:
        return [t.server.sockets[0].getsockname()[1] for t in list(self.tunnels.values()) if t.server.sockets]

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "nodes": len(self.tunnels), "refused": self.num_refused,
                "connections": sum(t.num_connections for t in self.tunnels.values()),
                "forwarded_bytes": sum(t.forwarded[0] for t in self.tunnels.values())}

    # ---- the listening port -----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_ip = writer.get_extra_info("peername")[0]
        keep = False
        try:
            message = await read_message(reader, timeout=self.limits.attach_timeout)
            op = message.get("op")
            if op == "probe":
                await self._probe(peer_ip, message, writer)
            elif op == "register":  # returns when the node's control channel ends
                await self._register(message, reader, writer)
            elif op == "attach":
                keep = self._attach(message, reader, writer)
            else:
                raise ProtocolError(f"unknown op {op!r}")
        except (ProtocolError, TimeoutError, EOFError, OSError) as e:
            logger.debug("relay: dropped a connection from %s: %s", peer_ip, e or type(e).__name__)
        finally:
            if not keep:
                writer.close()

    def _refuse(self, writer: asyncio.StreamWriter, error: str) -> None:
        self.num_refused += 1
        send_message(writer, {"ok": False, "error": error})

    def _auth_error(self, method: str, message: dict[str, Any]) -> str | None:
        if self.verifier is None:
            return None
        auth = message.get("auth")
        return self.verifier.check(method, [("dmoe-auth", auth)] if isinstance(auth, str) else None)

    async def _probe(self, peer_ip: str, message: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        port = message.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ProtocolError("probe needs an integer port in 1..65535")
        bucket = self._probe_buckets.get(peer_ip)
        if bucket is None:
            if len(self._probe_buckets) > 10_000:
                self._probe_buckets.clear()
            bucket = self._probe_buckets[peer_ip] = TokenBucket(self.limits.probes_per_minute / 60,
                                                                max(1.0, self.limits.probes_per_minute / 6))
        if (error := self._auth_error(PROBE_METHOD, message)) is not None:
            return self._refuse(writer, error)
        if not bucket.try_take():
            return self._refuse(writer, f"too many probes from {peer_ip} (probes_per_minute="
                                        f"{self.limits.probes_per_minute:g})")
        address = join_address(peer_ip, port)
        try:
            _, probe_writer = await asyncio.wait_for(asyncio.open_connection(peer_ip, port),
                                                     self.limits.probe_timeout)
            probe_writer.close()
            send_message(writer, {"ok": True, "reachable": True, "address": address, "error": ""})
        except (OSError, TimeoutError) as e:
            reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            send_message(writer, {"ok": True, "reachable": False, "address": address, "error": reason})
        await writer.drain()

    async def _register(self, message: dict[str, Any], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        node_id = message.get("node_id")
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 128:
            raise ProtocolError("register needs a node_id string")
        if (error := self._auth_error(REGISTER_METHOD + node_id, message)) is not None:
            return self._refuse(writer, error)
        old = self.tunnels.get(node_id)
        if old is not None:  # the node came back on a new connection: the old one is dead to it
            self._drop(old)
        if len(self.tunnels) >= self.limits.max_nodes:
            return self._refuse(writer, f"this relay serves {self.limits.max_nodes} nodes already (max_nodes)")
        server = await self._listen_for(node_id)
        rate = self.limits.rate_mbit * 1e6 / 8
        tunnel = _Tunnel(node_id=node_id, control=writer, server=server,
                         endpoint=join_address(self.announce_host, server.sockets[0].getsockname()[1]),
                         bucket=TokenBucket(rate, max(rate / 10, 4 * CHUNK)) if rate else None)
        self.tunnels[node_id] = tunnel
        self._last_port[node_id] = server.sockets[0].getsockname()[1]
        send_message(writer, {"ok": True, "endpoint": tunnel.endpoint})
        logger.info("relay: node %s registered, public at %s", node_id, tunnel.endpoint)
        try:
            pinger = self.spawn(self._ping(writer), "dmoe-relay-ping")
            try:
                while True:
                    reply = await read_message(reader, timeout=self.limits.control_timeout)
                    if reply.get("op") != "pong":
                        raise ProtocolError(f"unexpected {reply.get('op')!r} on a control channel")
            finally:
                pinger.cancel()
        finally:
            if self.tunnels.get(node_id) is tunnel:
                self._drop(tunnel)
                logger.info("relay: node %s left", node_id)

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            send_message(writer, {"op": "ping"})

    async def _listen_for(self, node_id: str) -> asyncio.Server:
        def handler(reader, writer):
            return self._client(node_id, reader, writer)

        last = self._last_port.get(node_id, 0)
        if last:
            try:
                return await asyncio.start_server(handler, self.host, last)
            except OSError:
                pass
        return await asyncio.start_server(handler, self.host, 0)

    def _drop(self, tunnel: _Tunnel) -> None:
        self.tunnels.pop(tunnel.node_id, None)
        tunnel.server.close()
        tunnel.control.close()
        for future in tunnel.pending.values():
            future.cancel()

    # ---- client connections -----------------------------------------------------------------------
    async def _client(self, node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_ip = peer[0]
        tunnel = self.tunnels.get(node_id)
        if tunnel is None or tunnel.num_connections >= self.limits.max_connections_per_node \
                or self._clients.get(peer_ip, 0) >= self.limits.max_connections_per_client:
            self.num_refused += 1
            logger.debug("relay: refused a client of %s from %s (limits or node gone)", node_id, peer_ip)
            writer.close()
            return
        conn = secrets.token_hex(16)
        attached: asyncio.Future = asyncio.get_running_loop().create_future()
        tunnel.pending[conn] = attached
        tunnel.num_connections += 1
        self._clients[peer_ip] = self._clients.get(peer_ip, 0) + 1
        try:
            send_message(tunnel.control, {"op": "open", "conn": conn, "peer": join_address(peer_ip, peer[1])})
            try:
                node_side = await asyncio.wait_for(attached, self.limits.attach_timeout)
            except (TimeoutError, asyncio.CancelledError):
                logger.debug("relay: node %s did not attach a connection for %s", node_id, peer_ip)
                writer.close()
                return
            await splice((reader, writer), node_side, tunnel.bucket, tunnel.forwarded)
        finally:
            tunnel.pending.pop(conn, None)
            tunnel.num_connections -= 1
            left = self._clients.get(peer_ip, 1) - 1
            if left > 0:
                self._clients[peer_ip] = left
            else:
                self._clients.pop(peer_ip, None)

    def _attach(self, message: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        conn = message.get("conn")
        for tunnel in self.tunnels.values():
            future = tunnel.pending.get(conn) if isinstance(conn, str) else None
            if future is not None and not future.done():
                future.set_result((reader, writer))
                return True
        raise ProtocolError("attach for no waiting connection")


# ---- the node's side: probe and register ------------------------------------------------------------
async def probe(relay: str, port: int, *, key: SwarmKey | None, timeout: float = 10.0) -> dict[str, Any]:
    """Ask ``relay`` to dial this host back at ``port``: {"reachable": bool, "address", "error"}.
    Raises OSError/ProtocolError when the relay cannot be asked, ConnectionRefusedError if it refuses."""
    reader, writer = await open_connection(relay, timeout)
    try:
        message: dict[str, Any] = {"op": "probe", "port": port}
        if key is not None:
            message["auth"] = key.call_metadata(PROBE_METHOD)[0][1]
        send_message(writer, message)
        reply = await read_message(reader, timeout)
    except EOFError:
        raise ProtocolError(f"relay {relay} closed the connection") from None
    finally:
        writer.close()
    if not reply.get("ok"):
        raise ConnectionRefusedError(f"relay {relay} refused the probe: {reply.get('error')}")
    return reply


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register_message(node_id: str, key: SwarmKey | None) -> dict[str, Any]:
    message: dict[str, Any] = {"op": "register", "node_id": node_id}
    if key is not None:
        message["auth"] = key.call_metadata(REGISTER_METHOD + node_id)[0][1]
    return message


def loopback_source(peer: str) -> str:
    """A loopback address that stands for a relayed client (127.x.y.z from its IP), so that the
    node's per-peer limits still tell relayed clients apart."""
    ip = peer.rpartition(":")[0].strip("[]")
    a, b, c = hashlib.blake2b(ip.encode(), digest_size=3).digest()
    return f"127.{a}.{b}.{max(2, c)}"
