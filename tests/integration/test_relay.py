"""Relays on 127.0.0.1: a node that says it cannot be dialled serves its experts through a relay.

The relays here are real (in this process, or the coordinator's), the nodes are CLI processes,
and the client is a RemoteMoE that finds the records in the DHT. The namespaces test, where the
client really cannot reach the node, is tests/lab/test_nat.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from relay_hand import Registration as RawNode
from swarm_fixtures import wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.auth import SwarmKey
from dmoe.core.experts import create_expert
from dmoe.core.records import find_experts, find_relays
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb
from dmoe.relay.limits import RelayLimits
from dmoe.relay.protocol import MAX_LINE, probe
from dmoe.relay.server import Relay

pytestmark = pytest.mark.timeout(120)
HIDDEN = 16


def ask(coroutine):
    return asyncio.run(coroutine)


def line_exchange(address: str, message: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the relay's port; everything it answers until it closes."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(message)
        received = b""
        while data := conn.recv(4096):
            received += data
        return received


def test_probe_tells_a_listening_port_from_a_closed_one():
    with Relay() as relay, socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        reply = ask(probe(relay.address, port, key=None))
        assert reply["reachable"] is True and reply["address"] == f"127.0.0.1:{port}"
        listening.close()
        reply = ask(probe(relay.address, port, key=None))
        assert reply["reachable"] is False and reply["error"]


def serve_a_web_page(listening: socket.socket) -> None:
    """What a home router may answer on a port it does not forward: an HTTP/1.1 page."""
    while True:
        try:
            conn, _ = listening.accept()
        except OSError:  # closed: the test is over
            return
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nrouter")


def test_probe_checks_that_the_node_itself_answers_at_the_port(node_factory):
    """A dial-back that connects is not enough: the server there must answer Info as the node that
    asked, so a router that answers on that port (or forwards it elsewhere) does not pass."""
    node = node_factory("--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--reachability", "direct")
    node_id, port = node.ready["node_id"], node.ready["port"]
    with Relay(limits=RelayLimits(probe_call_timeout=2.0)) as relay:
        reply = ask(probe(relay.address, port, key=None, node_id=node_id))
        assert reply == {"reachable": True, "address": f"127.0.0.1:{port}", "error": "", "verified": True}
        reply = ask(probe(relay.address, port, key=None, node_id="QmSomebodyElse"))
        assert reply["reachable"] is False and reply["verified"] is False
        assert reply["error"] == f"another dmoe node answered there ({node_id})"
        with socket.create_server(("127.0.0.1", 0)) as web:
            threading.Thread(target=serve_a_web_page, args=(web,), daemon=True).start()
            reply = ask(probe(relay.address, web.getsockname()[1], key=None, node_id=node_id))
            assert reply["reachable"] is False and reply["error"].startswith("no dmoe node answered there (")
        # no answer to Info at all (a node too busy to answer in time, or a silent listener): the
        # connection has to do, and the verdict says it is unverified
        with socket.create_server(("127.0.0.1", 0)) as silent:
            started = time.monotonic()
            reply = ask(probe(relay.address, silent.getsockname()[1], key=None, node_id=node_id))
            assert reply["reachable"] is True and reply["verified"] is False
            assert 2.0 <= time.monotonic() - started < 9.0  # the call's 2 s, within the node's 10 s
        # a probe that names no node (an older node) gets the TCP check alone
        assert ask(probe(relay.address, port, key=None))["verified"] is False
    assert "is reachable" not in node.log()  # --reachability direct: the node asked nobody


class FakeInfoServer:
    """A gRPC server on 127.0.0.1 whose Info answers what a test tells it: a NodeInfo, or a status."""

    def __init__(self, answer):
        self.answer = answer
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        info = grpc.unary_unary_rpc_method_handler(self.info, request_deserializer=None,
                                                   response_serializer=pb.NodeInfo.SerializeToString)
        handler = grpc.method_handlers_generic_handler("dmoe.ExpertService", {"Info": info})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def info(self, request: bytes, context: grpc.ServicerContext) -> pb.NodeInfo:
        if isinstance(self.answer, grpc.StatusCode):
            context.abort(self.answer, "refused by this test")
        return self.answer

    def __enter__(self) -> FakeInfoServer:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(0)


def test_what_a_probed_server_answers_reaches_the_node_bounded():
    """A server that answers Info with a huge node id gets a verdict of one short line (the node reads
    at most MAX_LINE bytes); a gRPC server that refuses the call (its limits, its key) shows a server
    is there but not whose it is: reachable, unverified."""
    with Relay() as relay:
        with FakeInfoServer(pb.NodeInfo(node_id="\x01" * 100_000)) as liar:  # each escaped to 6 bytes in JSON
            reply = ask(probe(relay.address, liar.port, key=None, node_id="QmMe"))
            assert reply["reachable"] is False and reply["verified"] is False
            assert reply["error"] == "another dmoe node answered there (" + "\x01" * 120 + "...)"
            assert len(json.dumps(reply)) < MAX_LINE
        for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED):
            with FakeInfoServer(code) as refusing:
                reply = ask(probe(relay.address, refusing.port, key=None, node_id="QmMe"))
                assert (reply["reachable"] is True and reply["verified"] is False
                        and reply["error"] == ""), code
        with FakeInfoServer(grpc.StatusCode.UNIMPLEMENTED) as other:  # some other gRPC service
            reply = ask(probe(relay.address, other.port, key=None, node_id="QmMe"))
            assert reply["reachable"] is False and reply["error"].startswith(
                "no dmoe node answered there (UNIMPL")


def test_dial_backs_at_once_are_capped_across_ips(monkeypatch):
    """A relay dials back a bounded number of probes at once, whoever asks: past it, probes are refused
    at once with the reason, and served again once a dial-back ends."""
    monkeypatch.setattr("dmoe.relay.server.MAX_DIAL_BACKS", 1)
    with Relay(limits=RelayLimits(probe_call_timeout=2.0)) as relay, \
            socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers Info: 2 s each
        port = silent.getsockname()[1]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(ask, probe(relay.address, port, key=None, node_id="QmSlow"))
            wait_for(lambda: relay._dialling.locked(), 10, "the first dial-back to start")
            with pytest.raises(ConnectionRefusedError, match="busy with 1 probes"):
                ask(probe(relay.address, port, key=None, node_id="QmNext"))
            assert first.result(30)["verified"] is False
        assert ask(probe(relay.address, port, key=None))["reachable"]  # served again


def test_garbage_and_unknown_ops_are_dropped_and_the_relay_keeps_serving():
    with Relay() as relay:
        assert line_exchange(relay.address, b"\x00\xff garbage\n") == b""
        assert line_exchange(relay.address, b'{"op": "launch"}\n') == b""
        assert line_exchange(relay.address, b"x" * 10_000) == b""  # a line longer than the limit
        assert line_exchange(relay.address, b'{"op": "attach", "conn": "nobody"}\n') == b""
        assert line_exchange(relay.address, b'{"op": "probe", "port": "22; rm -rf /"}\n') == b""
        with socket.create_server(("127.0.0.1", 0)) as listening:
            assert ask(probe(relay.address, listening.getsockname()[1], key=None))["reachable"]


def test_probes_are_limited_per_ip():
    with Relay(limits=RelayLimits(probes_per_minute=6)) as relay:  # room for one at once
        with socket.create_server(("127.0.0.1", 0)) as listening:
            port = listening.getsockname()[1]
            assert ask(probe(relay.address, port, key=None))["reachable"]
            with pytest.raises(ConnectionRefusedError, match="too many probes"):
                ask(probe(relay.address, port, key=None))


def test_a_private_relay_refuses_peers_without_the_key(tmp_path):
    key, other = SwarmKey.generate(tmp_path / "swarm.key"), SwarmKey.generate(tmp_path / "other.key")
    with Relay(key=key) as relay, socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        for wrong in (None, other):
            with pytest.raises(ConnectionRefusedError, match="key"):
                ask(probe(relay.address, port, key=wrong))
        reply = line_exchange(relay.address, b'{"op": "register", "node_id": "intruder"}\n')
        assert (json.loads(reply) == {"ok": False, "error": json.loads(reply)["error"]}
                and "key" in reply.decode())
        assert relay.stats()["nodes"] == 0 and relay.stats()["refused"] == 3
        assert ask(probe(relay.address, port, key=key))["reachable"]


def remote_moe_step(swarm: Swarm, prefix: str, num_experts: int, untrained: bool = False) -> RemoteMoE:
    """One forward and backward of a RemoteMoE over every expert; with ``untrained`` (experts that
    have not learnt yet), the output and the input's gradient equal those of the same MoE here."""
    torch.manual_seed(0)
    layer = RemoteMoE(swarm, prefix=prefix, grid=(num_experts,), in_features=HIDDEN, k=2, k_min=2)
    x = torch.randn(32, HIDDEN, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert layer.last_num_failed == 0 and torch.isfinite(y).all() and x.grad is not None
    if untrained:
        experts = [create_expert("ffn", uid=f"{prefix}.{i}", hidden_dim=HIDDEN)[0]
                   for i in range(num_experts)]
        x_local = x.detach().clone().requires_grad_(True)
        top_TK, chosen_TK = layer.gates[0](x_local).topk(2, dim=-1)
        weights_TK = top_TK.softmax(-1)
        expected = torch.stack([sum(weights_TK[t, j] * experts[int(chosen_TK[t, j])](x_local[t : t + 1])[0]
                                    for j in range(2)) for t in range(x.shape[0])])
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        expected.square().sum().backward()
        torch.testing.assert_close(x.grad, x_local.grad, rtol=1e-4, atol=1e-5)
    else:
        assert x.grad.abs().sum() > 0
    return layer


def test_nodes_behind_the_coordinators_relay_and_in_front_of_it(coordinator_factory, node_factory):
    """The coordinator offers a relay and announces it. A node started with --reachability relay finds
    it in the DHT, registers, and its records send clients to the relay's port, through which a
    RemoteMoE trains; a node with the default --reachability auto answers the relay's dial-back and
    is announced as direct."""
    coordinator = coordinator_factory("--relay-public-ports", "20000-20999")  # below the system's own ports
    relay_address = coordinator.ready["relay"]
    assert relay_address.startswith("127.0.0.1:")
    node = node_factory("--swarm", coordinator.swarm[0], "--experts", "ffn.[0:4]",
                        "--hidden-dim", str(HIDDEN), "--reachability", "relay", name="relayed")
    assert 20000 <= int(node.ready["relay_endpoint"].rsplit(":", 1)[1]) <= 20999
    direct = node_factory("--swarm", coordinator.swarm[0], "--experts", "dir.[0:2]",
                          "--hidden-dim", str(HIDDEN), name="direct")
    assert node.ready["reachable"] is False and direct.ready["reachable"] is True
    assert direct.ready["relay_endpoint"] == ""
    assert re.search(r"is reachable \(a relay dialled \S+ back and this node answered\)", direct.log())
    relayed = node.ready["relay_endpoint"]
    assert relayed.rsplit(":", 1)[0] == "127.0.0.1" and relayed != node.endpoint and relayed != relay_address
    with Swarm(SwarmConfig(initial_peers=coordinator.swarm, cache_ttl=60)) as swarm:
        assert [r.address for r in find_relays(swarm.peer).values()] == [relay_address]
        records = wait_for(lambda: find_experts(swarm.peer, [f"ffn.{i}" for i in range(4)]), 20, "records")
        assert {r.dial_endpoint for replicas in records.values() for r in replicas} == {relayed}
        assert all(not r.reachable and r.endpoint == node.endpoint for rs in records.values() for r in rs)
        [record] = wait_for(lambda: find_experts(swarm.peer, ["dir.0"]).get("dir.0"), 20, "the direct record")
        assert record.reachable and record.dial_endpoint == record.endpoint == direct.endpoint
        # every expert answered through the relay, as the same experts here would have
        remote_moe_step(swarm, "ffn", 4, untrained=True).dispatcher.close()
    assert "serving through relay" in node.log()
    with urllib.request.urlopen(coordinator.dashboard + "api/swarm", timeout=10) as response:
        relay = json.load(response)["relay"]
    assert relay["address"] == relay_address and relay["nodes"] == 1 and relay["forwarded_bytes"] > 0
    with urllib.request.urlopen(coordinator.dashboard + "metrics", timeout=10) as response:
        metrics = response.read().decode()
    forwarded = re.search(r"^dmoe_relay_forwarded_bytes_total (\S+)$", metrics, re.M)
    assert forwarded and float(forwarded.group(1)) >= relay["forwarded_bytes"]
    assert re.search(r"^dmoe_relay_nodes 1\.0$", metrics, re.M)


def test_a_node_moves_to_another_relay_when_its_relay_dies(coordinator_factory, node_factory):
    """The relayed node's relay (a second coordinator's) is killed mid-run: the node registers with the
    relay that a reachable node offers (--offer-relay, found in the DHT) and re-announces, and the
    client's next steps go there."""
    bootstrap = coordinator_factory("--no-offer-relay", name="bootstrap")
    doomed = coordinator_factory("--swarm", bootstrap.swarm[0], name="doomed")
    helper = node_factory("--swarm", bootstrap.swarm[0], "--experts", "other.[0:1]",
                          "--hidden-dim", str(HIDDEN), "--offer-relay", "--reachability", "direct",
                          name="helper")
    assert helper.ready["relay"].startswith("127.0.0.1:")
    node = node_factory("--swarm", bootstrap.swarm[0], "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN),
                        "--reachability", "relay", "--relay", doomed.ready["relay"],
                        "--heartbeat-interval", "1", "--record-ttl", "4", name="relayed")
    first_endpoint = node.ready["relay_endpoint"]
    with Swarm(SwarmConfig(initial_peers=bootstrap.swarm, cache_ttl=0.5, ban_max=1.0)) as swarm:
        records = wait_for(lambda: find_experts(swarm.peer, ["ffn.0", "ffn.1"]), 20, "records")
        assert {r.dial_endpoint for replicas in records.values() for r in replicas} == {first_endpoint}
        remote_moe_step(swarm, "ffn", 2).dispatcher.close()
        doomed.kill()

        def moved() -> set[str]:  # as the layer sees them: its lookups are cached
            found = swarm.live_under(["ffn."], refresh=True)["ffn."]
            endpoints = {r.dial_endpoint for r in found.values()}
            return endpoints if len(found) == 2 and first_endpoint not in endpoints else set()

        (second_endpoint,) = wait_for(moved, 60, "records that name another relay", interval=0.5)
        assert second_endpoint.rsplit(":", 1)[0] == "127.0.0.1"
        remote_moe_step(swarm, "ffn", 2).dispatcher.close()
    assert "lost relay" in node.log() and f"through relay {helper.ready['relay']}" in node.log()


def test_a_relay_caps_client_connections_per_node(coordinator_factory, node_factory):
    coordinator = coordinator_factory("--no-offer-relay")
    with Relay(limits=RelayLimits(max_connections_per_node=1)) as relay:
        node = node_factory("--swarm", coordinator.swarm[0], "--experts", "ffn.[0:2]",
                            "--hidden-dim", str(HIDDEN), "--reachability", "relay", "--relay", relay.address)
        host, port = node.ready["relay_endpoint"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as held:
            held.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the first client: spliced to the node
            wait_for(lambda: relay.stats()["connections"] == 1, 10, "the first connection")
            with socket.create_connection((host, int(port)), timeout=5) as extra:
                extra.settimeout(5)
                assert extra.recv(1) == b""  # the second: closed at once
            assert relay.stats()["refused"] >= 1
        wait_for(lambda: relay.stats()["connections"] == 0, 10, "the relay to notice the client left")
        with socket.create_connection((host, int(port)), timeout=5) as again:  # room for one again
            again.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            wait_for(lambda: relay.stats()["connections"] == 1, 10, "a new connection")


def test_a_node_that_registers_again_keeps_its_allowance():
    """The per-node limits (here the byte rate) hold across registrations: neither a takeover with
    the secret nor registering again after leaving gives a fresh allowance."""
    with Relay(limits=RelayLimits(rate_mbit=8.0)) as relay:
        first = RawNode(relay, "node-a")
        bucket = relay._usage["node-a"].bucket
        assert first.reply["ok"] and bucket is not None
        again = RawNode(relay, "node-a", secret=first.reply["secret"])  # a takeover, on a new connection
        assert again.reply["ok"] and relay._usage["node-a"].bucket is bucket
        again.close()
        first.close()
        wait_for(lambda: relay.stats()["nodes"] == 0, 10, "the node to be dropped")
        back = RawNode(relay, "node-a", secret=again.reply["secret"])  # gone, then back
        try:
            assert back.reply["ok"] and relay._usage["node-a"].bucket is bucket
        finally:
            back.close()


def test_a_registered_node_id_cannot_be_taken_over_without_its_secret():
    with Relay() as relay:
        owner = RawNode(relay, "node-a")
        try:
            assert owner.reply["ok"] and owner.reply["secret"]
            thief = RawNode(relay, "node-a")
            assert thief.reply == {"ok": False, "error": thief.reply["error"]}
            assert "registered here already" in thief.reply["error"]
            thief.close()
            wrong = RawNode(relay, "node-a", secret="0" * 32)
            assert not wrong.reply["ok"]
            wrong.close()
            back = RawNode(relay, "node-a", secret=owner.reply["secret"])  # the node itself, on a new
                                                                           # connection
            assert back.reply["ok"] and back.reply["endpoint"] == owner.reply["endpoint"]  # and its port back
            assert owner.file.readline() == b""  # the old control channel is closed
            assert relay.stats()["nodes"] == 1
            back.close()
            wait_for(lambda: relay.stats()["nodes"] == 0, 10, "the node to be dropped")
        finally:
            owner.close()


def test_registrations_and_idle_connections_per_ip_are_capped():
    limits = RelayLimits(max_nodes_per_ip=2, max_control_connections_per_ip=4, first_line_timeout=1.0)
    with Relay(limits=limits) as relay:
        nodes = [RawNode(relay, f"node-{i}") for i in range(3)]
        try:
            assert [n.reply["ok"] for n in nodes] == [True, True, False]
            assert "max_nodes_per_ip" in nodes[2].reply["error"]
            host, port = relay.address.rsplit(":", 1)
            idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]  # 2 + 2 control
            extra = socket.create_connection((host, int(port)), timeout=5)
            assert extra.recv(1) == b""  # over max_control_connections_per_ip: closed at once
            for conn in idle:  # silent past first_line_timeout: dropped
                assert conn.recv(1) == b""
            for conn in (*idle, extra):
                conn.close()
        finally:
            for node in nodes:
                node.close()


def test_public_ports_come_from_the_range_given_and_run_out():
    with socket.socket() as probe_socket:  # a port that is free now
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    with Relay(public_ports=(port, port)) as relay:
        first = RawNode(relay, "node-a")
        second = RawNode(relay, "node-b")
        try:
            assert first.reply["ok"] and first.reply["endpoint"] == f"127.0.0.1:{port}"
            assert not second.reply["ok"] and f"every port of {port}-{port} is taken" in second.reply["error"]
        finally:
            first.close()
            second.close()


def test_a_client_whose_node_never_attaches_is_closed_at_attach_timeout():
    """The node is told of the client ('open') but never dials back (it hung, or died silently):
    the relay closes the client's connection after attach_timeout and frees its slot. The relay's
    other timeouts are far from it (and the default attach_timeout is 10 s), so a close by any
    other timer, or by none, falls outside the bounds."""
    limits = RelayLimits(attach_timeout=2.0, first_line_timeout=30.0, control_timeout=60.0)
    with Relay(limits=limits) as relay:
        node = RawNode(relay, "silent-node")
        try:
            host, port = node.reply["endpoint"].rsplit(":", 1)
            started = time.monotonic()
            with socket.create_connection((host, int(port)), timeout=20) as client:
                opened = json.loads(node.file.readline())
                assert opened["op"] == "open" and len(opened["conn"]) == 32
                assert client.recv(1) == b""  # closed by the relay (a socket timeout at 20 s otherwise)
            closed_after = time.monotonic() - started
            assert limits.attach_timeout <= closed_after < limits.attach_timeout + 4.0, closed_after
            wait_for(lambda: relay.stats()["connections"] == 0, 5, "the slot to be freed")
        finally:
            node.close()
