"""Relayed nodes as their clients see them: per-peer limits that tell relayed clients apart, a private
swarm's TLS end to end through the relay (which forwards only ciphertext), a node that lost its
relay skipped by clients, and the coordinator relay's figures on /metrics.

The module's nodes are CLI processes started together: an open-swarm node and a private-swarm node,
each with --reachability relay and a relay of its own in this process (a bootstrap DHT peer here
too), and a coordinator in a swarm of its own, whose relay the metrics test drives by hand. A
relayed client's address is 127.0.0.N, through a proxy that dials the relay from there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
import torch
from swarm_fixtures import CoordinatorProcess, NodeProcess, stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.addresses import split_address
from dmoe.core.auth import SwarmKey
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import DHTAuthorizer
from dmoe.core.records import find_experts
from dmoe.core.tls import channel_credentials
from dmoe.core.wire import serialize
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.relay.protocol import loopback_source
from dmoe.relay.server import Relay
from dmoe.testing.netproxy import TcpProxy

pytestmark = pytest.mark.timeout(120)
HIDDEN = 16
PEER_BURST = 2  # the open node's requests per peer before its rate (one per 20 s) applies
FORWARD = "/dmoe.ExpertService/Forward"


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "swarm.key"
    SwarmKey.generate(path)
    return path


@pytest.fixture(scope="module")
def key(key_path) -> SwarmKey:
    return SwarmKey.load(key_path)


@pytest.fixture(scope="module")
def swarms(key) -> Iterator[SimpleNamespace]:
    """Bootstrap DHT peers and relays, in this process: ``open`` and ``private`` (with the key)."""
    with DHTPeer() as bootstrap, Relay() as relay, \
            DHTPeer(authorizer=DHTAuthorizer(key)) as private_bootstrap, Relay(key=key) as private_relay:
        yield SimpleNamespace(bootstrap=bootstrap, relay=relay, private_bootstrap=private_bootstrap,
                              private_relay=private_relay)


@pytest.fixture(scope="module")
def processes(swarms, key_path, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The open and private relayed nodes and the coordinator, started at once."""
    workdir = tmp_path_factory.mktemp("relayed")
    started = SimpleNamespace(
        open=NodeProcess(workdir, ["--swarm", swarms.bootstrap.visible_maddrs[0], "--experts", "ffn.[0:2]",
                                   "--hidden-dim", str(HIDDEN), "--reachability", "relay",
                                   "--relay", swarms.relay.address, "--peer-rate", "0.05",
                                   "--peer-burst", str(PEER_BURST), "--heartbeat-interval", "1"], "open"),
        private=NodeProcess(workdir, ["--swarm-key", str(key_path), "--swarm",
                                      swarms.private_bootstrap.visible_maddrs[0], "--experts", "ffn.[0:1]",
                                      "--hidden-dim", str(HIDDEN), "--reachability", "relay",
                                      "--relay", swarms.private_relay.address], "private"),
        coordinator=CoordinatorProcess(workdir, ["--relay-max-nodes", "1", "--relay-record-grace", "0"],
                                       "coordinator"))
    processes = [started.open, started.private, started.coordinator]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
            for done in [pool.submit(process.start) for process in processes]:
                done.result()
        yield started
    finally:
        for process in processes:
            process.cleanup()


def info(service: pbg.ExpertServiceStub) -> str:
    """What one Info call gets: "OK", or the status and its details."""
    try:
        service.Info(pb.InfoRequest(), timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


@contextlib.contextmanager
def client_from(source: str, endpoint: str) -> Iterator[pbg.ExpertServiceStub]:
    """A stub whose connection reaches the relay at ``endpoint`` from the address ``source``."""
    with TcpProxy(split_address(endpoint), source=source) as proxy:
        channel, service = stub(f"127.0.0.1:{proxy.port}")
        with channel:
            yield service


def test_per_peer_limits_tell_relayed_clients_apart(processes):
    """Every relayed client reaches the node from the relay's side, yet the node's limits per peer
    (here --peer-rate) count each client address on its own: the node sees each one from a loopback
    address derived from the client's IP, and one client that spent its budget leaves another's whole."""
    endpoint = processes.open.ready["relay_endpoint"]
    with client_from("127.0.0.2", endpoint) as first, client_from("127.0.0.3", endpoint) as second:
        assert [info(first) for _ in range(PEER_BURST)] == ["OK"] * PEER_BURST
        spent = info(first)
        assert spent.startswith("RESOURCE_EXHAUSTED") and "peer_rate=" in spent, spent
        assert f" from {loopback_source('127.0.0.2:1')} (" in spent, spent  # the node saw the client's own
        assert [info(second) for _ in range(PEER_BURST)] == ["OK"] * PEER_BURST  # a budget of its own
        assert info(first).startswith("RESOURCE_EXHAUSTED")


class Tap:
    """A TCP forwarder on 127.0.0.1 to ``target`` that keeps every byte it passes: ``sent`` (from
    the client) and ``received`` (back to it). In front of a relay's port for a node, that is what the
    relay reads from the client and what it forwards back from the node."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.sent, self.received = target, bytearray(), bytearray()
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.port = self.listening.getsockname()[1]
        self.pipes: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listening.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target, timeout=30)
            for source, sink, kept in ((client, upstream, self.sent), (upstream, client, self.received)):
                pipe = threading.Thread(target=self._pipe, args=(source, sink, kept), daemon=True)
                pipe.start()
                self.pipes.append(pipe)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, kept: bytearray) -> None:
        try:
            while data := source.recv(1 << 16):
                kept += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc) -> None:
        self.listening.close()
        for pipe in self.pipes:
            pipe.join(10)


def forward_through(tap: Tap, channel: grpc.Channel, metadata=None) -> tuple[bytes, pb.Tensor]:
    """One Forward of ffn.0 on ``channel`` (to ``tap``): the input's bytes and the reply's tensor."""
    x = torch.arange(4 * HIDDEN, dtype=torch.float32).reshape(4, HIDDEN) / 7 - 3
    with channel:
        reply = pbg.ExpertServiceStub(channel).Forward(pb.ForwardRequest(uid="ffn.0", inputs=[serialize(x)]),
                                                       timeout=20, metadata=metadata)
    assert len(reply.outputs) == 1 and list(reply.outputs[0].shape) == [4, HIDDEN]
    return serialize(x).buffer, reply.outputs[0]


def test_an_open_relay_forwards_the_calls_as_they_are(processes):
    """What the tap below keeps does show a call's plaintext when there is some: in an open swarm the
    relay forwards gRPC as it is, uid and tensors readable (docs/nat.md says so)."""
    with Tap(split_address(processes.open.ready["relay_endpoint"])) as tap:
        inputs, output = forward_through(tap, grpc.insecure_channel(f"127.0.0.1:{tap.port}"))
    assert b"ffn.0" in tap.sent and inputs in tap.sent and output.buffer in tap.received


def test_a_private_swarms_relay_forwards_only_ciphertext(processes, key):
    """A relayed node of a private swarm: the member's call goes through the relay over the swarm's
    TLS, end to end with the node, and the bytes the relay reads and forwards hold no trace of the
    call's uid, its input or its output."""
    private = processes.private
    assert private.ready["tls"] is True and private.ready["reachable"] is False
    with Tap(split_address(private.ready["relay_endpoint"])) as tap:
        credentials, options = channel_credentials(key)
        channel = grpc.secure_channel(f"127.0.0.1:{tap.port}", credentials, options=options)
        inputs, output = forward_through(tap, channel, key.call_metadata(FORWARD))
    assert tap.sent[:1] == b"\x16" and tap.received[:1] == b"\x16"  # TLS handshake records, both ways
    assert len(tap.sent) > len(inputs) and len(tap.received) > len(output.buffer)
    for plain in (b"ffn.0", inputs, inputs[:16], inputs[-16:]):
        assert plain not in tap.sent
    for plain in (output.buffer, output.buffer[:16], output.buffer[-16:]):
        assert plain not in tap.received


def test_clients_skip_a_node_that_lost_its_relay(processes, swarms):
    """The open node's relay goes away and no other relay takes it: its records stay in the DHT but name
    no address to dial (at its next heartbeat), and client lookups leave its experts out."""
    node = processes.open
    with Swarm(SwarmConfig(initial_peers=swarms.bootstrap.visible_maddrs, cache_ttl=60)) as swarm:
        found = swarm.live_under(["ffn."], refresh=True)["ffn."]
        assert {r.dial_endpoint for r in found.values()} == {node.ready["relay_endpoint"]} and len(found) == 2
        swarms.relay.shutdown()

        def without_relay() -> bool:
            records = find_experts(swarm.peer, ["ffn.0", "ffn.1"])
            return len(records) == 2 and all(r.relay == "" for rs in records.values() for r in rs)

        wait_for(without_relay, 30, "the node to announce that it has no relay")
        records = find_experts(swarm.peer, ["ffn.0", "ffn.1"])
        assert all(not r.reachable and r.dial_endpoint == "" for rs in records.values() for r in rs)
        assert swarm.live_replicas_under(["ffn."], refresh=True) == {"ffn.": {}}
        assert swarm.live_levels(["ffn."], refresh=True)[0].coords == []
        assert swarm.live_levels(["ffn."], exact=True)[0].coords == []
    assert "lost relay" in node.log()


def relay_metrics(coordinator: CoordinatorProcess) -> dict[str, float]:
    with urllib.request.urlopen(coordinator.dashboard + "metrics", timeout=10) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^(dmoe_relay_\w+) (\S+)$", text, re.M)}


class RawNode:
    """A node's control channel to ``relay``, made by hand."""

    def __init__(self, relay: str, node_id: str):
        self.conn = socket.create_connection(split_address(relay), timeout=10)
        self.conn.sendall(json.dumps({"op": "register", "node_id": node_id}).encode() + b"\n")
        self.file = self.conn.makefile("rb")
        self.reply = json.loads(self.file.readline() or b"{}")

    def next_open(self) -> str:
        """The connection name of the next client the relay announces (its pings skipped)."""
        while (message := json.loads(self.file.readline()))["op"] != "open":
            pass
        return message["conn"]

    def close(self) -> None:
        self.file.close()
        self.conn.close()


def test_the_coordinators_metrics_follow_its_relays_connections_and_refusals(processes):
    """/metrics, scraped from the coordinator: dmoe_relay_connections counts a client connection while
    it is spliced to its node and not after; dmoe_relay_refused_total counts a refused registration
    (the coordinator runs with --relay-max-nodes 1)."""
    coordinator = processes.coordinator
    relay = coordinator.ready["relay"]
    before = relay_metrics(coordinator)
    assert (before["dmoe_relay_nodes"], before["dmoe_relay_connections"],
            before["dmoe_relay_refused_total"]) == (0, 0, 0), before
    node, extra = RawNode(relay, "raw-node"), RawNode(relay, "raw-extra")
    try:
        assert node.reply["ok"] and not extra.reply["ok"] and "(max_nodes)" in extra.reply["error"]
        after = relay_metrics(coordinator)
        assert (after["dmoe_relay_nodes"], after["dmoe_relay_connections"],
                after["dmoe_relay_refused_total"]) == (1, 0, 1), after
        with socket.create_connection(split_address(node.reply["endpoint"]), timeout=10) as client:
            with socket.create_connection(split_address(relay), timeout=10) as attached:
                attached.sendall(json.dumps({"op": "attach", "conn": node.next_open()}).encode() + b"\n")
                client.sendall(b"spliced")
                assert attached.recv(16) == b"spliced"
                assert relay_metrics(coordinator)["dmoe_relay_connections"] == 1
                client.close()
                assert attached.recv(16) == b""  # the relay ended the splice
            wait_for(lambda: relay_metrics(coordinator)["dmoe_relay_connections"] == 0, 10,
                     "the metrics to show the connection closed")
        assert relay_metrics(coordinator)["dmoe_relay_refused_total"] == 1
    finally:
        node.close()
        extra.close()
