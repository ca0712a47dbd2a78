"""Hostile peers against relays and the nodes they serve: client connections held idle
through a relay, registrations that no node of the swarm backs, and a relay that tells a node it
cannot be dialled so as to carry its traffic.

Everything runs on loopback. The defences tell peers apart by address, so a hostile client that
hogs a node's connections connects from 127.0.0.2, and hostile relays listen on 127.0.0.2 and
127.0.0.3 (still this machine: 127.0.0.0/8 is all loopback), while the swarm's bootstrap peer, the
honest relay and the nodes are on 127.0.0.1. One bootstrap DHT peer, one honest relay and one
relayed node serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest
import torch
from swarm_fixtures import NodeProcess, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.addresses import host_port, split_address
from dmoe.core.auth import SwarmKey
from dmoe.core.dht import DHTPeer
from dmoe.moe.remote import RemoteMoE
from dmoe.node.reachability import dial_back, dialable, trusted_relays
from dmoe.node.relaylink import RelayLink
from dmoe.relay.limits import RelayLimits
from dmoe.relay.protocol import send_message
from dmoe.relay.server import Relay

pytestmark = pytest.mark.timeout(120)
HIDDEN = 16
IDLE = 2.5  # the module relay's idle_timeout
GRACE = 6.0  # its record_grace (a starting node announces its record well within it)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an HTTP/2 client sends first; the node's server answers
                                          # with its SETTINGS


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[DHTPeer]:
    with DHTPeer() as peer:
        yield peer


@pytest.fixture(scope="module")
def relay(bootstrap: DHTPeer) -> Iterator[Relay]:
    """The honest relay of the module's relayed node. It checks its registrations against the swarm's
    records, as an announced relay does, but it is not announced itself, so that the only relay a
    node of this swarm can find in the DHT is the hostile one of test_a_lone_relay_...."""
    limits = RelayLimits(max_connections_per_node=4, max_nodes_per_ip=4, idle_timeout=IDLE,
                         record_grace=GRACE)
    with Relay(limits=limits) as relay:
        relay.watch_records(bootstrap)
        yield relay


@pytest.fixture(scope="module")
def relayed(bootstrap: DHTPeer, relay: Relay, tmp_path_factory) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path_factory.mktemp("relayed"),
                          ["--swarm", bootstrap.visible_maddrs[0], "--experts", "ffn.[0:2]",
                           "--hidden-dim", str(HIDDEN), "--reachability", "relay", "--relay", relay.address],
                          name="relayed")
    try:
        yield process.start()
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def swarm(bootstrap: DHTPeer) -> Iterator[Swarm]:
    with Swarm(SwarmConfig(initial_peers=bootstrap.visible_maddrs, cache_ttl=60)) as swarm:
        yield swarm


def step(layer: RemoteMoE) -> None:
    """One training step of ``layer``; every call answered."""
    x = torch.randn(8, HIDDEN, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.last_num_failed == 0 and x.grad is not None and torch.isfinite(x.grad).all()


def remote_moe_step(swarm: Swarm) -> None:
    """One training step of a new RemoteMoE over the relayed node's two experts; its channels closed after."""
    layer = RemoteMoE(swarm, prefix="ffn", grid=(2,), in_features=HIDDEN, k=2, k_min=2)
    try:
        step(layer)
    finally:
        layer.dispatcher.close()


def spliced(address: str, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A client connection through a relay that the node answered (its HTTP/2 SETTINGS came back)."""
    conn = socket.create_connection(split_address(address), timeout=timeout, source_address=(source, 0))
    conn.sendall(PREFACE)
    assert conn.recv(9), "the relay closed the connection instead of splicing it to the node"
    return conn


def closed_by_peer(conn: socket.socket, timeout: float) -> bool:
    """Whether the other end closes ``conn`` within ``timeout`` (what it still sends is read and dropped)."""
    conn.settimeout(timeout)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


# ---- connections held through a relay ---------------------------------------------------------------
def test_idle_connections_through_a_relay_are_closed_and_free_the_nodes_slots(relay, relayed, swarm):
    """Connections held open with nothing on them took every slot of a relayed node for good (as
    they still do on a relay whose idle_timeout is long): now the relay closes a spliced connection
    after idle_timeout without a byte either way, and a client gets in again. The refusal is shown
    on a relay of its own with the default idle_timeout (300 s), so that no held connection can be
    cut, freeing a slot, before the refused one comes (on a loaded machine, IDLE may pass while
    the four are opened)."""
    host, port = split_address(relayed.endpoint)
    with Relay(limits=RelayLimits(max_connections_per_node=4)) as patient:
        link = RelayLink(lambda: [patient.address], node_id="patient-node", key=None,
                         target=(host, port)).start()
        try:
            held = [spliced(link.endpoint) for _ in range(patient.limits.max_connections_per_node)]
            try:
                with socket.create_connection(split_address(link.endpoint), timeout=5) as refused:
                    refused.sendall(PREFACE)
                    assert closed_by_peer(refused, 2.0)  # the node's slots are full: closed at once
            finally:
                for conn in held:
                    conn.close()
        finally:
            link.shutdown()
    endpoint = relayed.ready["relay_endpoint"]
    wait_for(lambda: relay.stats()["connections"] == 0, 10, "no connection through the relay")
    held = [spliced(endpoint) for _ in range(relay.limits.max_connections_per_node)]
    try:
        started = time.monotonic()
        assert all(closed_by_peer(conn, IDLE + 10) for conn in held)
        assert time.monotonic() - started < IDLE + 10
        wait_for(lambda: relay.stats()["connections"] == 0, 10, "the slots to be freed")
    finally:
        for conn in held:
            conn.close()
    remote_moe_step(swarm)  # a client's calls go through again


def test_a_client_channel_cut_while_idle_reconnects_and_its_next_step_succeeds(relay, relayed, swarm):
    """gRPC channels send nothing between calls (dmoe sets no keepalive pings), so a channel idle
    for idle_timeout is cut by the relay; its next call dials again and no call fails."""
    layer = RemoteMoE(swarm, prefix="ffn", grid=(2,), in_features=HIDDEN, k=2, k_min=2)
    try:
        step(layer)
        assert relay.stats()["connections"] == 1  # the layer's channel, open between calls
        wait_for(lambda: relay.stats()["connections"] == 0, IDLE + 10, "the relay to cut the idle channel")
        step(layer)  # the same channel, dialled again
        step(layer)
    finally:
        layer.dispatcher.close()


def test_a_client_that_hogs_a_nodes_connections_gives_way_to_a_newcomer(relayed):
    """One address holding every slot of a node (active or not) no longer locks others out: a
    client from another address takes the slot of the hog's least recently active connection."""
    host, port = split_address(relayed.endpoint)
    with Relay(limits=RelayLimits(max_connections_per_node=4)) as fair:  # the default, long idle_timeout
        link = RelayLink(lambda: [fair.address], node_id="fair-node", key=None, target=(host, port)).start()
        try:
            hogs = [spliced(link.endpoint, source="127.0.0.2") for _ in range(4)]
            try:
                newcomer = spliced(link.endpoint)  # refused while every slot was the hog's
                newcomer.close()
                closed = [conn for conn in hogs if closed_by_peer(conn, 0.3)]
                assert closed == [hogs[0]]  # the hog's least recently active connection, and only it
            finally:
                for conn in hogs:
                    conn.close()
        finally:
            link.shutdown()


# ---- registrations ----------------------------------------------------------------------------------
class RawNode:
    """A registration made by hand, by a peer that runs no node: it announces no record."""

    def __init__(self, relay: Relay, node_id: str):
        self.conn = socket.create_connection(split_address(relay.address), timeout=5)
        self.conn.sendall(json.dumps({"op": "register", "node_id": node_id}).encode() + b"\n")
        self.file = self.conn.makefile("rb")
        self.reply = json.loads(self.file.readline() or b"{}")

    def dropped_within(self, timeout: float) -> bool:
        """Whether the relay closes this control channel within ``timeout`` (its pings are read)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.conn.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.file.readline():
                    return True
        except TimeoutError:
            pass
        return False

    def close(self) -> None:
        self.file.close()
        self.conn.close()


def test_registrations_no_node_record_backs_are_dropped_and_capped_per_ip(relay, relayed, swarm):
    """An open relay gave a public port to anyone who asked, for as long as they liked. Now: at most
    max_nodes_per_ip per address (the relayed node is one of this address's four), and a
    registration that no node record in the swarm backs within record_grace (a record of that
    node naming its port on this relay) is dropped; after three such drops its address registers
    no new node for a while. The relayed node, whose records name its port, stays and serves."""
    intruders = [RawNode(relay, f"intruder-{i}") for i in range(4)]
    try:
        assert [n.reply["ok"] for n in intruders] == [True, True, True, False]
        assert "(max_nodes_per_ip)" in intruders[3].reply["error"]
        assert all(n.dropped_within(GRACE + 10) for n in intruders[:3])
        again = RawNode(relay, "intruder-again")
        assert not again.reply["ok"] and "record_grace" in again.reply["error"], again.reply
        again.close()
    finally:
        for node in intruders:
            node.close()
    assert relayed.ready["node_id"] in relay.tunnels
    remote_moe_step(swarm)


# ---- reachability verdicts --------------------------------------------------------------------------
class LyingRelay(Relay):
    """A relay that tells every node it cannot be dialled, without dialling it: nodes that believe it
    register with it, and it carries their traffic."""

    async def _probe(self, peer_ip, message, writer) -> None:
        send_message(writer, {"ok": True, "reachable": False, "error": "no answer", "verified": False,
                              "address": host_port(peer_ip, message.get("port"))})
        await writer.drain()


def test_a_lone_relay_that_says_unreachable_does_not_take_a_reachable_nodes_traffic(bootstrap, relayed,
                                                                                     tmp_path_factory):
    """A relay announced in the swarm by anyone said 'unreachable' to a reachable node under
    --reachability auto, and the node served through it. Now one relay that is neither named with
    --relay nor at the address of a --swarm peer cannot send a node through a relay on its word alone."""
    with LyingRelay(host="127.0.0.2") as liar:
        liar.announce(bootstrap, "QmLiar")
        process = NodeProcess(tmp_path_factory.mktemp("auto"),
                              ["--swarm", bootstrap.visible_maddrs[0], "--experts", "auto.[0:1]",
                               "--hidden-dim", str(HIDDEN)], name="auto")
        try:
            process.start()
            assert process.ready["reachable"] is True and process.ready["relay_endpoint"] == ""
            assert "is not believed alone" in process.log()
            assert liar.stats()["nodes"] == 0
        finally:
            process.cleanup()


def test_which_relays_a_node_believes_that_it_cannot_be_dialled():
    """An 'unreachable' verdict settles it when it comes from a trusted relay (named with --relay,
    or at a --swarm peer's address, or any relay in a private swarm), or from two relays at distinct
    addresses; one untrusted relay
    is outvoted by any relay that dialled the node back, and is not believed alone."""
    with LyingRelay(host="127.0.0.2") as liar, LyingRelay(host="127.0.0.3") as other_liar, \
            LyingRelay(host="127.0.0.2") as liar_same_host, Relay() as honest, \
            socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]

        def verdict(relays: list[str], trusted: set[str] = frozenset(), key: SwarmKey | None = None) -> dict:
            result = asyncio.run(dial_back(relays, port, key=key, node_id="", tls=False, trusted=trusted))
            assert result is not None
            return result

        assert verdict([liar.address])["reachable"] is True
        # in a private swarm every announced relay is trusted (only members, with the key, announce)
        assert verdict([liar.address], key=SwarmKey(b"k" * 32))["reachable"] is False
        assert verdict([liar.address], {liar.address})["reachable"] is False  # --relay: believed
        assert verdict([liar.address, other_liar.address])["reachable"] is False  # two addresses agree
        assert verdict([liar.address, liar_same_host.address])["reachable"] is True  # one address, twice
        assert verdict([liar.address, other_liar.address, honest.address])["reachable"] is True
        assert verdict([honest.address])["reachable"] is True
        listening.close()  # now the node cannot be dialled: a trusted relay that says so settles it
        assert verdict([honest.address], {honest.address})["reachable"] is False
        assert verdict([honest.address])["reachable"] is True  # the price: an untrusted one alone does not
    swarm = ["/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWLcX8FcvRwBEFegig9pKb2X4vBFScPWeoWeFhNLJMmHK3"]
    assert trusted_relays(["127.0.0.2:9"], swarm, ["127.0.0.1:40", "127.0.0.3:41", "127.0.0.2:9"]) == {
        "127.0.0.2:9", "127.0.0.1:40"}


class MalformedRelay(Relay):
    """A relay whose probe replies say "ok" without a verdict's form: ``replies`` in turn, one a probe."""

    replies: list[dict] = []

    async def _probe(self, peer_ip, message, writer) -> None:
        send_message(writer, {"ok": True, **self.replies.pop(0)})
        await writer.drain()


@pytest.mark.parametrize("reply", [
    {"reachable": True},  # no address, error or verified
    {"reachable": "yes", "address": "127.0.0.1:1", "error": "", "verified": True},
    {"reachable": False, "address": 7, "error": "no answer", "verified": False},
    {"reachable": False, "address": "127.0.0.1:1", "error": None, "verified": False},
])
def test_a_relay_whose_probe_reply_is_no_verdict_is_taken_as_no_answer(reply):
    """Such a reply (any peer may announce a relay) made the node's start-up fail: reading the verdict
    raised KeyError. Now that relay is one that could not check: alone, the node is taken as reachable;
    beside an honest relay, the honest one's verdict holds."""
    with MalformedRelay(host="127.0.0.2") as malformed, Relay() as honest, \
            socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        malformed.replies = [dict(reply), dict(reply)]

        def verdict(relays: list[str]) -> dict | None:  # each named with --relay: its word alone settles it
            return asyncio.run(dial_back(relays, port, key=None, node_id="", tls=False, trusted=set(relays)))

        alone = verdict([malformed.address])
        assert alone is None and dialable(alone, f"127.0.0.1:{port}") is True
        listening.close()
        both = verdict([malformed.address, honest.address])
        assert both is not None and both["reachable"] is False and both["address"] == f"127.0.0.1:{port}"
        assert dialable(both, f"127.0.0.1:{port}") is False
        assert malformed.replies == []
