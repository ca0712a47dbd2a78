"""The relay's limits and a node's re-registration, end to end: a real relay (dmoe.relay.server) on
127.0.0.1, nodes registered by hand or by a real RelayLink, and clients on real sockets.

The node behind a RelayLink here is an echo server: the relay forwards bytes and parses none of
them, so what the node's server is does not matter to it, and an echo shows that a connection was
spliced (and lets a test count the bytes that went both ways). Clients come from 127.0.0.N, each
address a client of its own to the relay's limits per address.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from relay_hand import Registration
from swarm_fixtures import wait_for

from dmoe.core.addresses import split_address
from dmoe.node.relaylink import RelayLink
from dmoe.relay.limits import RelayLimits
from dmoe.relay.protocol import CHUNK
from dmoe.relay.server import Relay
from dmoe.testing.netproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)
HELLO = b"hello through the relay"


class EchoServer:
    """A TCP server on 127.0.0.1 that sends back every byte it reads: the node behind a RelayLink."""

    def __init__(self):
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.address = self.listening.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listening.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(CHUNK):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.listening.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def connect(endpoint: str, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(split_address(endpoint), timeout=10, source_address=(source, 0))


def spliced(endpoint: str, source: str = "127.0.0.1") -> socket.socket:
    """A client connection from ``source`` that the relay spliced to the node (its echo came back)."""
    conn = connect(endpoint, source)
    conn.sendall(HELLO)
    received = b""
    while len(received) < len(HELLO) and (data := conn.recv(len(HELLO) - len(received))):
        received += data
    assert received == HELLO, f"the relay closed a connection from {source} instead of splicing it"
    return conn


def refused(endpoint: str, source: str) -> bool:
    """Whether the relay closes a new connection from ``source`` at once, before any echo."""
    with connect(endpoint, source) as conn:
        try:
            conn.sendall(HELLO)
            return conn.recv(len(HELLO)) == b""
        except ConnectionResetError:  # closed before our bytes arrived
            return True


def test_the_relay_serves_at_most_max_nodes_from_all_addresses_together():
    """max_nodes counts every address: the third node is refused though each came from an address of
    its own (max_nodes_per_ip, 16, is far off). A node that takes its place back with its secret is no
    new node; once one leaves, there is room again."""
    with Relay(limits=RelayLimits(max_nodes=2)) as relay:
        a = Registration(relay, "node-a", "127.0.0.2")
        b = Registration(relay, "node-b", "127.0.0.3")
        c = Registration(relay, "node-c", "127.0.0.4")
        opened = [a, b, c]
        try:
            assert a.reply["ok"] and b.reply["ok"], (a.reply, b.reply)
            assert not c.reply["ok"] and "(max_nodes)" in c.reply["error"], c.reply
            assert relay.stats()["nodes"] == 2 and relay.stats()["refused"] == 1
            again = Registration(relay, "node-a", "127.0.0.2", secret=a.reply["secret"])
            opened.append(again)
            assert again.reply["ok"] and again.reply["endpoint"] == a.reply["endpoint"], again.reply
            b.close()
            wait_for(lambda: relay.stats()["nodes"] == 1, 10, "node-b to be dropped")
            c.close()
            opened.append(Registration(relay, "node-c", "127.0.0.4"))
            assert opened[-1].reply["ok"], opened[-1].reply
        finally:
            for registration in opened:
                registration.close()


def test_client_connections_per_client_address_are_capped_across_nodes(echo):
    """max_connections_per_client counts one client address's connections to every node together:
    its third is closed at once, while another address still gets in, and the address gets in again
    once one of its connections ends."""
    with Relay(limits=RelayLimits(max_connections_per_client=2)) as relay:
        links = [RelayLink(lambda: [relay.address], node_id=f"node-{i}", key=None,
                           target=echo.address).start() for i in range(2)]
        held: list[socket.socket] = []
        try:
            held += [spliced(links[0].endpoint, "127.0.0.2"), spliced(links[1].endpoint, "127.0.0.2")]
            assert relay.stats()["refused"] == 0
            assert refused(links[1].endpoint, "127.0.0.2") and refused(links[0].endpoint, "127.0.0.2")
            assert relay.stats()["refused"] == 2
            held.append(spliced(links[1].endpoint, "127.0.0.3"))  # another address: an allowance of its own
            held.pop(0).close()
            wait_for(lambda: relay.stats()["connections"] == 2, 10, "the relay to see the connection end")
            held.append(spliced(links[1].endpoint, "127.0.0.2"))  # room again
        finally:
            for conn in held:
                conn.close()
            for link in links:
                link.shutdown()


def read_until_closed(registration: Registration, timeout: float) -> tuple[float | None, list[dict]]:
    """When (time.monotonic()) the relay closed ``registration``'s control channel, None if not within
    ``timeout``; and the messages it sent meanwhile."""
    deadline, messages = time.monotonic() + timeout, []
    try:
        while time.monotonic() < deadline:
            registration.conn.settimeout(max(0.01, deadline - time.monotonic()))
            line = registration.file.readline()
            if not line:
                return time.monotonic(), messages
            messages.append(json.loads(line))
    except TimeoutError:
        pass
    except ConnectionResetError:
        return time.monotonic(), messages
    return None, messages


def test_a_silent_control_channel_is_dropped_after_control_timeout(monkeypatch, echo):
    """A node that answers no ping for control_timeout is dropped (its control channel closed, its
    registration gone), not before; a node that answers every ping stays, the same registration.
    The ping interval is cut to 0.2 s so that the limit can be 2 s (it must exceed the interval)."""
    monkeypatch.setattr("dmoe.relay.limits.PING_INTERVAL", 0.2)
    monkeypatch.setattr("dmoe.relay.server.PING_INTERVAL", 0.2)
    limits = RelayLimits(control_timeout=2.0)
    with Relay(limits=limits) as relay:
        link = RelayLink(lambda: [relay.address], node_id="answering", key=None, target=echo.address).start()
        try:
            tunnel = relay.tunnels["answering"]
            started = time.monotonic()
            silent = Registration(relay, "silent")
            try:
                assert silent.reply["ok"] and "silent" in relay.tunnels
                closed, messages = read_until_closed(silent, limits.control_timeout + 10)
            finally:
                silent.close()
            assert closed is not None, "the relay kept a control channel that answered no ping"
            assert closed - started >= limits.control_timeout
            assert messages and all(m == {"op": "ping"} for m in messages)  # pinged, and never answered
            wait_for(lambda: "silent" not in relay.tunnels, 5, "the silent node's registration to go")
            # the answering node was registered longer than control_timeout, and is still the same one
            assert relay.tunnels.get("answering") is tunnel
            spliced(link.endpoint).close()
        finally:
            link.shutdown()


def test_the_byte_rate_per_node_bounds_what_the_relay_forwards_both_ways(echo):
    """rate_mbit bounds the bytes forwarded for one node, both directions together: a client that
    sends SENT bytes to the echoing node and reads them back moves 2 * SENT bytes through the node's
    token bucket (its burst at most, then the rate). Only the upper bound on throughput is checked
    (a loaded machine only slows the transfer down): unthrottled, this takes milliseconds here."""
    rate_mbit = 8.0
    rate, burst = rate_mbit * 1e6 / 8, float(1 << 20)  # the relay's bucket: max(rate / 10, 1 MiB) of burst
    sent = 3 << 19  # 1.5 MiB each way
    with Relay(limits=RelayLimits(rate_mbit=rate_mbit)) as relay:
        link = RelayLink(lambda: [relay.address], node_id="limited", key=None, target=echo.address).start()
        try:
            with connect(link.endpoint) as conn:
                payload = bytes(range(256)) * (sent // 256)
                started = time.monotonic()
                sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
                sender.start()
                received = 0
                while received < sent and (data := conn.recv(CHUNK)):
                    received += len(data)
                elapsed = time.monotonic() - started
                sender.join(10)
            assert received == sent
            # each direction may have one chunk read before the window and forwarded in it
            assert elapsed >= (2 * sent - burst - 2 * CHUNK) / rate, elapsed
            assert relay.stats()["forwarded_bytes"] >= 2 * sent
        finally:
            link.shutdown()


def test_a_node_whose_control_channel_breaks_registers_again_on_its_old_port(echo):
    """The network cuts the node's control channel (a proxy between node and relay resets it): the
    RelayLink registers again at once with its registration's secret and gets its old port back, so
    its endpoint never changes (the node has nothing to re-announce) and clients dial it as before."""
    changes: list[str] = []
    with Relay() as relay, TcpProxy(split_address(relay.address)) as path:
        link = RelayLink(lambda: [f"127.0.0.1:{path.port}"], node_id="moving", key=None, target=echo.address,
                         on_change=changes.append).start()
        try:
            endpoint, first = link.endpoint, relay.tunnels["moving"]
            spliced(endpoint).close()
            path.cut_connections()
            wait_for(lambda: relay.tunnels.get("moving") not in (None, first), 15,
                     "the node to register again")
            assert relay.tunnels["moving"].endpoint == endpoint and link.endpoint == endpoint
            assert changes == [endpoint]  # registered once at start; no change since
            spliced(endpoint).close()
        finally:
            link.shutdown()
