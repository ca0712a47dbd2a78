"""Relay: serves the experts of nodes that nobody can dial, over connections those nodes dial themselves.

A node behind a home router can dial out but cannot be dialled. It registers with a relay (the
coordinator runs one; any reachable node may offer one with ``--offer-relay``), which opens a
public port for it. A client that connects to that port is announced to the node over its control
connection; the node dials the relay once more for that client, and the relay splices the two TCP
connections. The client speaks the node's own gRPC through it, TLS included, so deadlines, quorum,
compression, validation and the swarm key's checks are the direct path's, and in a private swarm
the relay forwards ciphertext: it never sees tensors or tokens, and parses nothing but its own
JSON lines (:mod:`dmoe.relay.protocol`). Why a TCP relay and not libp2p's circuit relays
(hivemind.P2P): docs/nat.md.

Protocol, on one listening port:

- ``{"op": "probe", "port": P, "node_id": ID, "tls": bool}``: the relay dials *the asking
  connection's own IP* at port P (never another address), checks that node ID answers there
  (:mod:`dmoe.relay.dialback`), and answers ``{"reachable": bool, "address": "ip:P", "error": str,
  "verified": bool}``. That is how a node learns whether others can dial its gRPC endpoint.
- ``{"op": "register", "node_id": ID, "auth": TOKEN, "secret": S}``: answered ``{"ok": true,
  "endpoint": "host:port", "secret": S'}``, the node's public address on this relay, or ``{"ok":
  false, "error": ...}``. A node id that is registered already can only be taken over with the
  secret its registration was given (the same node on a new connection), which also gets its old
  port back. The connection stays open as the node's control channel: the relay sends ``{"op":
  "open", "conn": C, "peer": "ip:port"}`` for every client connection and ``{"op": "ping"}``.
- ``{"op": "attach", "conn": C}`` on a new connection from the node: from then on raw bytes,
  spliced to the client connection C (a 128-bit random name, known only to the node).

In a private swarm, probe and register carry a token of the swarm key (:mod:`dmoe.core.auth`);
without it they are refused. Limits: :class:`RelayLimits`, counted per address group
(:func:`~dmoe.core.addresses.address_group`: an IPv4 address, an IPv6 /64). A spliced connection with
no byte either way for ``idle_timeout`` is closed, and a node whose connections are all taken gives
a newcomer the least recently active connection of the address that holds the most, when that
address holds at least two more than the newcomer's. A relay that reads the swarm's DHT
(:meth:`Relay.watch_records`, which :meth:`Relay.announce` calls) drops a registration that no node
record of the swarm backs within ``record_grace`` (an online record of that node id naming its
port here). A read that finds no record at all drops nobody, and one that finds none of the
registrations it backed before drops no never-backed one (a DHT read may come back empty or
partial); a backed registration is checked again
every ``BACKED_RECHECK`` grace periods and dropped only after ``BACKED_MISSES`` checks in a row find
no record of it (a node in its shutdown grace has withdrawn its record already). An address group
whose never-backed registrations are dropped ``UNBACKED_STRIKES`` times within ``UNBACKED_COOLDOWN``
grace periods registers no new never-backed node for that long.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import resource
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from dmoe.core.addresses import address_group, host_port
from dmoe.core.auth import CallVerifier, SwarmKey
from dmoe.core.logsafe import printable
from dmoe.core.ratelimit import TokenBucket
from dmoe.errors import ConfigError
from dmoe.relay.dialback import dial_back
from dmoe.relay.limits import PING_INTERVAL, RelayLimits
from dmoe.relay.protocol import (
    MAX_LINE,
    PROBE_METHOD,
    REGISTER_METHOD,
    ProtocolError,
    close_quietly,
    read_message,
    send_message,
    splice,
)

if TYPE_CHECKING:
    from dmoe.core.dht import DHTPeer

logger = logging.getLogger(__name__)

MAX_DIAL_BACKS = 32  # probes dialling back at once, from all IPs together
MAX_REMEMBERED = 10_000  # probe buckets and past registrations kept (least recently used go first)
UNBACKED_COOLDOWN = 10  # record_grace periods an address group that had UNBACKED_STRIKES registrations
                        # dropped for no node record waits before it may register a node never backed
UNBACKED_STRIKES = 3  # never-backed registrations dropped within UNBACKED_COOLDOWN grace periods that
                      # put their address group on that cool-down
BACKED_RECHECK = 4  # record_grace periods between two checks of a registration a record backed
BACKED_MISSES = 3  # checks in a row that find no record of a backed registration before it is dropped


@dataclasses.dataclass(slots=True)
class _Client:
    """One client connection to a node: its address group, its writer, when a byte last moved on it."""
    group: str
    writer: asyncio.StreamWriter
    activity: list[float]


@dataclasses.dataclass(slots=True)
class _Usage:
    """What one node id uses, across its registrations: connections, rate, bytes forwarded; since when
    it is registered, and whether a node record of the swarm has backed it."""
    bucket: TokenBucket | None
    clients: dict[str, _Client] = dataclasses.field(default_factory=dict)  # by connection name
    forwarded: list[int] = dataclasses.field(default_factory=lambda: [0])
    since: float = dataclasses.field(default_factory=time.monotonic)
    backed: bool = False
    checked: float = 0.0  # when a record last backed it (time.monotonic())
    misses: int = 0  # checks in a row since then that found no record of it

    @property
    def num_connections(self) -> int:
        return len(self.clients)


@dataclasses.dataclass(slots=True)
class _Tunnel:
    """One registration: the node's control channel, public port and waiting client connections."""
    node_id: str
    group: str  # the address group (address_group) it registered from
    secret: str
    control: asyncio.StreamWriter
    server: asyncio.Server
    endpoint: str
    pending: dict[str, asyncio.Future] = dataclasses.field(default_factory=dict)
    registered_at: float = dataclasses.field(default_factory=time.monotonic)


class Relay:
    """``with Relay(host=..., key=...) as relay: relay.address``; runs on a thread of its own."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, announce_host: str | None = None,
                 key: SwarmKey | None = None, limits: RelayLimits | None = None,
                 public_ports: tuple[int, int] | None = None):
        if host in ("0.0.0.0", "::") and not announce_host:
            raise ConfigError(f"a relay listening on {host} needs an address to announce (announce host)")
        self.host, self.port, self.announce_host = host, port, announce_host or host
        self.public_ports = public_ports  # (first, last): the ports opened for nodes (None: any free port)
        self.key = key
        self._credentials: tuple | None = None  # channel credentials for dial-backs over TLS, once needed
        self._dialling = asyncio.Semaphore(MAX_DIAL_BACKS)
        self.verifier = CallVerifier(key) if key is not None else None
        self.limits = limits or RelayLimits()
        self.address = ""  # host:port nodes dial to probe and register, once started
        self.tunnels: dict[str, _Tunnel] = {}
        self.num_refused = 0  # registrations, probes and client connections refused by a limit or the key
        self._usage: dict[str, _Usage] = {}
        self._forwarded_before = 0  # bytes forwarded for nodes whose usage is forgotten
                                    # (stats stay cumulative)
        # open client connections per address group (address_group), and connections on the relay's port
        self._clients: collections.Counter[str] = collections.Counter()
        self._control: collections.Counter[str] = collections.Counter()
        # address group -> until when (time.monotonic()) it registers no node never backed by a record
        self._unbacked: collections.OrderedDict[str, float] = collections.OrderedDict()
        # address group -> when its never-backed registrations were dropped (within the cool-down window)
        self._strikes: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._watching = False  # whether registrations are checked against the swarm's records
        self._probe_buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        # node id -> (port, secret)
        self._resume: collections.OrderedDict[str, tuple[int, str]] = collections.OrderedDict()
        self._writers: set[asyncio.StreamWriter] = set()  # every open connection, closed by shutdown
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Relay:
        from dmoe.core.dht import new_event_loop

        _raise_file_limit()
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
        self.address = host_port(self.announce_host, self._server.sockets[0].getsockname()[1])

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
        for writer in list(self._writers):  # spliced and waiting connections: their handlers then end
            close_quietly(writer)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # let the connection handlers see their closed connections

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def announce(self, dht: DHTPeer, peer_id: str, *, interval: float = 10.0, ttl: float = 30.0) -> None:
        """Store this relay's record in the swarm's DHT now, and again every ``interval`` seconds."""
        from hivemind.utils import get_dht_time

        from dmoe.core.records import RelayRecord, store_relay_async

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
        self.watch_records(dht)

    def watch_records(self, dht: DHTPeer) -> None:
        """From now on, drop registrations that no node record in ``dht``'s swarm backs within
        ``limits.record_grace`` (nothing if it is 0). :meth:`announce` calls it."""
        if self.limits.record_grace <= 0 or self._watching:
            return
        self._watching = True

        async def begin() -> None:
            self.spawn(self._watch_records(dht), "dmoe-relay-records")

        self.run(begin(), 10)

    async def _watch_records(self, dht: DHTPeer) -> None:
        """Every quarter of record_grace: if a registration is due a check (a never-backed one
        registered record_grace ago or more, a backed one checked BACKED_RECHECK grace periods ago),
        read the swarm's node records once and :meth:`review` the registrations against them. A read
        that fails drops nobody."""
        from dmoe.core.records import find_nodes_async

        grace = self.limits.record_grace
        while True:
            await asyncio.sleep(max(0.2, grace / 4))
            if not self._due(time.monotonic()):
                continue
            try:
                assert dht.node is not None
                records = await dht.run_async(find_nodes_async(dht.node))
            except Exception as e:
                logger.warning("relay: could not read the swarm's node records (dropping nobody): %s",
                               printable(e))
                continue
            self.review({(r.node_id, r.relay) for r in records.values() if not r.reachable})

    def _due(self, now: float) -> list[_Tunnel]:
        grace = self.limits.record_grace
        due = []
        for tunnel in self.tunnels.values():
            usage = self._usage.get(tunnel.node_id)
            if usage is not None and (now - usage.checked >= BACKED_RECHECK * grace if usage.backed
                                      else now - usage.since >= grace):
                due.append(tunnel)
        return due

    def review(self, backed: set[tuple[str, str]]) -> None:
        """Check the registrations due a check against ``backed``, the (node id, relay endpoint) pairs
        that the swarm's node records name, as read just now; on the relay's loop. A read with no
        record at all drops nobody; one that finds none of the registrations backed before drops no
        never-backed one (it may be partial). A backed registration is dropped after BACKED_MISSES
        checks in a row that miss it; a never-backed one at its first."""
        if not backed:
            logger.debug("relay: the swarm's node records read empty; dropping nobody")
            return
        now, grace = time.monotonic(), self.limits.record_grace
        was_backed = [t for t in self.tunnels.values() if (u := self._usage.get(t.node_id)) and u.backed]
        partial = bool(was_backed) and not any((t.node_id, t.endpoint) in backed for t in was_backed)
        for tunnel in self._due(now):
            usage = self._usage[tunnel.node_id]
            if (tunnel.node_id, tunnel.endpoint) in backed:
                usage.backed, usage.checked, usage.misses = True, now, 0
                continue
            if usage.backed:
                usage.misses += 1
                usage.checked = now
                if usage.misses < BACKED_MISSES:
                    logger.debug("relay: no node record names node %s's port %s (%d of %d checks)",
                                 printable(tunnel.node_id), tunnel.endpoint, usage.misses, BACKED_MISSES)
                    continue
            elif partial:
                continue
            else:
                self._strike(tunnel.group, now, grace)
            self.num_refused += 1
            logger.info("relay: dropped node %s from %s: no node record of the swarm names its port "
                        "%s (record_grace=%g s)", printable(tunnel.node_id), tunnel.group,
                        tunnel.endpoint, grace)
            self._drop(tunnel)

    def _strike(self, group: str, now: float, grace: float) -> None:
        """A never-backed registration from ``group`` was dropped: UNBACKED_STRIKES of them within the
        cool-down window put the group on cool-down."""
        window = UNBACKED_COOLDOWN * grace
        strikes = [t for t in self._strikes.pop(group, []) if now - t < window] + [now]
        self._strikes[group] = strikes  # most recent last
        if len(self._strikes) > MAX_REMEMBERED:
            self._strikes.popitem(last=False)
        if len(strikes) >= UNBACKED_STRIKES:
            self._unbacked.pop(group, None)
            self._unbacked[group] = now + window
            if len(self._unbacked) > MAX_REMEMBERED:
                self._unbacked.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        usage = list(self._usage.values())
        return {"address": self.address, "nodes": len(self.tunnels), "refused": self.num_refused,
                "connections": sum(u.num_connections for u in usage),
                "forwarded_bytes": self._forwarded_before + sum(u.forwarded[0] for u in usage)}

    # ---- the relay's own port ---------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_ip = peer[0] if peer else "?"
        group = address_group(peer_ip)
        if self._control[group] >= self.limits.max_control_connections_per_ip:
            self.num_refused += 1
            close_quietly(writer)
            return
        self._control[group] += 1
        self._writers.add(writer)
        keep = False
        try:
            message = await read_message(reader, timeout=self.limits.first_line_timeout)
            op = message.get("op")
            if op == "probe":
                await self._probe(peer_ip, message, writer)
            elif op == "register":  # returns when the node's control channel ends
                await self._register(peer_ip, message, reader, writer)
            elif op == "attach":
                keep = self._attach(message, reader, writer)
            else:
                raise ProtocolError(f"unknown op {op!r}")
        except (ProtocolError, TimeoutError, EOFError, OSError, RuntimeError) as e:
            logger.debug("relay: dropped a connection from %s: %s", peer_ip, printable(e or type(e).__name__))
        finally:
            self._control[group] -= 1
            if self._control[group] <= 0:
                del self._control[group]
            if not keep:
                self._writers.discard(writer)
                close_quietly(writer)

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
        if (error := self._auth_error(PROBE_METHOD, message)) is not None:
            return self._refuse(writer, error)
        group = address_group(peer_ip)
        bucket = self._probe_buckets.pop(group, None) or TokenBucket(
            self.limits.probes_per_minute / 60, max(1.0, self.limits.probes_per_minute / 6))
        self._probe_buckets[group] = bucket  # most recently used last
        if len(self._probe_buckets) > MAX_REMEMBERED:
            self._probe_buckets.popitem(last=False)
        if not bucket.try_take():
            return self._refuse(writer, f"too many probes from {peer_ip} (probes_per_minute="
                                        f"{self.limits.probes_per_minute:g})")
        if self._dialling.locked():
            return self._refuse(writer, f"this relay is busy with {MAX_DIAL_BACKS} probes; try again later")
        async with self._dialling:
            # a task of the relay's, so that shutdown cancels it with its gRPC call
            verdict = await self.spawn(dial_back(
                peer_ip, port, node_id=message.get("node_id"), tls=message.get("tls") is True, key=self.key,
                timeout=self.limits.probe_timeout, call_timeout=self.limits.probe_call_timeout,
                credentials=self._tls_credentials()), "dial-back")
        send_message(writer, {"ok": True, **verdict})
        await writer.drain()

    def _tls_credentials(self) -> tuple | None:
        """How this relay calls a private swarm's nodes over TLS (made once: a key and a certificate)."""
        if self.key is not None and self._credentials is None:
            from dmoe.core.tls import channel_credentials

            self._credentials = channel_credentials(self.key)
        return self._credentials

    def _registration_error(self, peer_ip: str, node_id: str, secret: Any) -> str | None:
        old = self.tunnels.get(node_id)
        if old is not None and secret != old.secret:
            return f"node {node_id} is registered here already (a node takes its place back with its secret)"
        group = address_group(peer_ip)
        others = [t for t in self.tunnels.values() if t.node_id != node_id]
        if len(others) >= self.limits.max_nodes:
            return f"this relay serves {self.limits.max_nodes} nodes already (max_nodes)"
        if sum(t.group == group for t in others) >= self.limits.max_nodes_per_ip:
            return (f"{group} has {self.limits.max_nodes_per_ip} nodes registered here already "
                    f"(max_nodes_per_ip)")
        usage = self._usage.get(node_id)
        cooldown = self._unbacked.get(group, 0.0) - time.monotonic()
        if cooldown > 0 and (usage is None or not usage.backed):
            return (f"{UNBACKED_STRIKES} nodes registered from {group} announced no node record naming "
                    f"their port here within record_grace={self.limits.record_grace:g} s; nodes never seen "
                    f"in the swarm's records are refused from there for {cooldown:.0f} s more")
        return None

    async def _register(self, peer_ip: str, message: dict[str, Any], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        node_id, secret = message.get("node_id"), message.get("secret")
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 128:
            raise ProtocolError("register needs a node_id string")
        if (error := self._auth_error(REGISTER_METHOD + node_id, message)) is not None:
            return self._refuse(writer, error)
        if (error := self._registration_error(peer_ip, node_id, secret)) is not None:
            return self._refuse(writer, error)
        old = self.tunnels.pop(node_id, None)
        if old is not None:  # the same node on a new connection: the old one is dead to it
            self._drop(old)
        resumed = self._resume.get(node_id)
        try:
            server = await self._listen_for(node_id, resumed[0] if resumed and resumed[1] == secret else 0)
        except OSError as e:
            return self._refuse(writer, f"no public port for this node: {e}")
        if (error := self._registration_error(peer_ip, node_id, secret)) is not None:  # others came meanwhile
            server.close()
            return self._refuse(writer, error)
        port = server.sockets[0].getsockname()[1]
        tunnel = _Tunnel(node_id=node_id, group=address_group(peer_ip), secret=secrets.token_hex(16),
                         control=writer, server=server, endpoint=host_port(self.announce_host, port))
        self.tunnels[node_id] = tunnel
        if node_id not in self._usage:
            rate = self.limits.rate_mbit * 1e6 / 8
            self._usage[node_id] = _Usage(bucket=TokenBucket(rate, max(rate / 10, 1 << 20)) if rate else None)
        self._resume.pop(node_id, None)
        self._resume[node_id] = (port, tunnel.secret)
        if len(self._resume) > MAX_REMEMBERED:
            self._forget_usage(self._resume.popitem(last=False)[0])
        send_message(writer, {"ok": True, "endpoint": tunnel.endpoint, "secret": tunnel.secret})
        logger.info("relay: node %s registered, public at %s", printable(node_id), tunnel.endpoint)
        pinger = self.spawn(self._ping(writer), "dmoe-relay-ping")
        try:
            while True:
                reply = await read_message(reader, timeout=self.limits.control_timeout)
                if reply.get("op") != "pong":
                    raise ProtocolError(f"unexpected {reply.get('op')!r} on a control channel")
        finally:
            pinger.cancel()
            if self.tunnels.get(node_id) is tunnel:
                self._drop(tunnel)
                logger.info("relay: node %s left", printable(node_id))
            tunnel.server.close()

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            send_message(writer, {"op": "ping"})

    async def _listen_for(self, node_id: str, port: int) -> asyncio.Server:
        def handler(reader, writer):
            return self._client(node_id, reader, writer)

        if self.public_ports is None:
            candidates = [port, 0] if port else [0]
        else:
            first, last = self.public_ports
            start = random.randint(first, last)
            candidates = (([port] if first <= port <= last else [])
                          + [*range(start, last + 1), *range(first, start)])
        for candidate in candidates:
            try:
                return await asyncio.start_server(handler, self.host, candidate)
            except OSError:
                continue
        raise OSError(f"every port of {self.public_ports[0]}-{self.public_ports[1]} is taken"
                      if self.public_ports else "cannot listen")

    def _drop(self, tunnel: _Tunnel) -> None:
        if self.tunnels.get(tunnel.node_id) is tunnel:
            del self.tunnels[tunnel.node_id]
        tunnel.server.close()
        close_quietly(tunnel.control)
        for future in tunnel.pending.values():
            future.cancel()
        self._forget_usage(tunnel.node_id)

    def _forget_usage(self, node_id: str) -> None:
        """Forget what a node used once it is gone, its last connection closed, and its registration
        no longer remembered: a node that registers again (it may, while remembered) goes on with its
        allowance, not a fresh one."""
        usage = self._usage.get(node_id)
        if (usage is not None and usage.num_connections == 0 and node_id not in self.tunnels
                and node_id not in self._resume):
            self._forwarded_before += usage.forwarded[0]
            del self._usage[node_id]

    # ---- client connections -----------------------------------------------------------------------
    async def _client(self, node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_ip = peer[0] if peer else "?"
        group = address_group(peer_ip)
        tunnel, usage = self.tunnels.get(node_id), self._usage.get(node_id)
        if tunnel is None or usage is None or self._clients[group] >= self.limits.max_connections_per_client \
                or (usage.num_connections >= self.limits.max_connections_per_node
                    and not self._make_room(tunnel, usage, group)):
            self.num_refused += 1
            logger.debug("relay: refused a client of %s from %s (limits or node gone)", printable(node_id),
                         peer_ip)
            close_quietly(writer)
            return
        conn = secrets.token_hex(16)
        attached: asyncio.Future = asyncio.get_running_loop().create_future()
        tunnel.pending[conn] = attached
        client = _Client(group=group, writer=writer, activity=[time.monotonic()])
        usage.clients[conn] = client
        self._clients[group] += 1
        self._writers.add(writer)
        try:
            send_message(tunnel.control, {"op": "open", "conn": conn,
                                          "peer": host_port(peer_ip, peer[1] if peer else 0)})
            try:
                node_side = await asyncio.wait_for(attached, self.limits.attach_timeout)
            except (TimeoutError, asyncio.CancelledError):
                logger.debug("relay: node %s did not attach a connection for %s", printable(node_id), peer_ip)
                return
            try:
                await splice((reader, writer), node_side, usage.bucket, usage.forwarded,
                             idle_timeout=self.limits.idle_timeout, activity=client.activity)
            finally:
                self._writers.discard(node_side[1])
        except (OSError, RuntimeError) as e:  # the control channel closed under us
            logger.debug("relay: client of %s from %s: %s", printable(node_id), peer_ip, printable(e))
        finally:
            tunnel.pending.pop(conn, None)
            usage.clients.pop(conn, None)
            self._clients[group] -= 1
            if self._clients[group] <= 0:
                del self._clients[group]
            self._writers.discard(writer)
            close_quietly(writer)
            self._forget_usage(node_id)

    def _make_room(self, tunnel: _Tunnel, usage: _Usage, group: str) -> bool:
        """A node's connections are all taken and a client from ``group`` asks for one: close the least
        recently active connection of the address group that holds the most, if that group holds at
        least two more than ``group`` (so each address keeps a fair share, and a few addresses cannot
        lock the others out, active or not). Whether a slot was freed."""
        held = collections.Counter(c.group for c in usage.clients.values())
        top, most = held.most_common(1)[0] if held else ("", 0)
        if most < held[group] + 2:
            return False
        conn, victim = min(((conn, c) for conn, c in usage.clients.items() if c.group == top),
                           key=lambda item: item[1].activity[0])
        del usage.clients[conn]  # its handler ends once it sees the connection closed
        if (pending := tunnel.pending.get(conn)) is not None:
            pending.cancel()
        close_quietly(victim.writer)
        logger.info("relay: %s holds %d of node %s's %d connections: closed its least active one for a "
                    "client from %s", top, most, printable(tunnel.node_id),
                    self.limits.max_connections_per_node, group)
        return True

    def _attach(self, message: dict[str, Any], reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> bool:
        conn = message.get("conn")
        for tunnel in self.tunnels.values():
            future = tunnel.pending.get(conn) if isinstance(conn, str) else None
            if future is not None and not future.done():
                future.set_result((reader, writer))
                return True
        raise ProtocolError("attach for no waiting connection")


def _raise_file_limit() -> None:
    """Every relayed client holds two sockets here: take the soft limit on open files up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
