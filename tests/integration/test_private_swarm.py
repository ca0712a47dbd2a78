"""A private swarm: a coordinator and a node started with --swarm-key refuse whoever lacks the key,
on the gRPC data plane (UNAUTHENTICATED, nothing changes) and in the DHT (no answer at all)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import grpc
import pytest
import torch
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from swarm_fixtures import CoordinatorProcess, NodeProcess, wait_for

from dmoe.cli import main
from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.auth import SwarmKey
from dmoe.core.tls import NODE_NAME, ca_pem, channel_credentials
from dmoe.core.wire import serialize
from dmoe.errors import DmoeError
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.relay.protocol import probe
from dmoe.relay.server import Relay

pytestmark = pytest.mark.timeout(120)
HIDDEN = 16
FORWARD = "/dmoe.ExpertService/Forward"


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    """(key path, coordinator, node): both started with the same new key; the node joined the coordinator."""
    workdir = tmp_path_factory.mktemp("private")
    key = workdir / "swarm.key"
    result = CliRunner().invoke(main, ["swarm", "keygen", str(key)])
    assert result.exit_code == 0, result.output
    coordinator = CoordinatorProcess(workdir, ["--swarm-key", str(key)], "coordinator")
    node = None
    try:
        coordinator.start()
        node = NodeProcess(workdir, ["--swarm-key", str(key), "--swarm", coordinator.swarm[0], "--experts",
                                     "ffn.[0:2]", "--experts", "lm0.[0:2]", "--experts", "lm1.[0:2]",
                                     "--hidden-dim", str(HIDDEN)], "node").start()
        yield key, coordinator, node
    finally:
        for process in (node, coordinator):
            if process is not None:
                process.cleanup()


def stub(endpoint: str, key: SwarmKey) -> tuple[grpc.Channel, pbg.ExpertServiceStub]:
    """A channel as a member makes it: TLS, trusting the CA that the swarm key makes."""
    credentials, options = channel_credentials(key)
    channel = grpc.secure_channel(endpoint, credentials, options=options)
    return channel, pbg.ExpertServiceStub(channel)


def test_keygen_writes_a_private_file_and_never_overwrites(tmp_path):
    path = tmp_path / "k"
    first = CliRunner().invoke(main, ["swarm", "keygen", str(path)])
    assert first.exit_code == 0 and "fingerprint" in first.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(bytes.fromhex(path.read_text())) == 32
    before = path.read_text()
    again = CliRunner().invoke(main, ["swarm", "keygen", str(path)])
    assert again.exit_code == 1 and "never overwritten" in again.output
    assert path.read_text() == before


def test_calls_without_the_key_are_unauthenticated_and_change_nothing(private, tmp_path):
    key_path, _, node = private
    key = SwarmKey.load(key_path)
    other = SwarmKey.generate(tmp_path / "other.key")
    assert node.ready["tls"] is True
    channel, service = stub(node.endpoint, key)
    x = torch.randn(4, HIDDEN)
    forward = pb.ForwardRequest(uid="ffn.0", inputs=[serialize(x)])
    backward = pb.BackwardRequest(uid="ffn.0", inputs=[serialize(x)],
                                  grad_outputs=[serialize(torch.ones(4, HIDDEN))])
    try:
        version = expert_version_with(service, key)
        attempts = [
            (lambda md: service.Forward(forward, timeout=10, metadata=md), "call it with the swarm's key"),
            (lambda md: service.Backward(backward, timeout=10, metadata=md),
             "call it with the swarm's key"),
            (lambda md: service.Info(pb.InfoRequest(), timeout=10, metadata=md),
             "call it with the swarm's key"),
            (lambda md: list(service.BackwardStream(iter([pb.Chunk(data=backward.SerializeToString())]),
                                                    timeout=10, metadata=md)),
             "call it with the swarm's key"),
        ]
        for call, message in attempts:
            for metadata, why in ((None, message), (other.call_metadata(FORWARD), "wrong swarm key"),
                                  ((("dmoe-auth", "not.a.token"),), "malformed")):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
                assert why in refused.value.details()
        # a token is for one method and one use
        wrong_method = key.call_metadata("/dmoe.ExpertService/Info")
        with pytest.raises(grpc.RpcError) as refused:
            service.Backward(backward, timeout=10, metadata=wrong_method)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = key.call_metadata(FORWARD)
        assert len(service.Forward(forward, timeout=10, metadata=token).outputs) == 1
        with pytest.raises(grpc.RpcError) as replayed:
            service.Forward(forward, timeout=10, metadata=token)
        assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "already used" in replayed.value.details()
        assert expert_version_with(service, key) == version  # no outsider's Backward reached the optimizer
        # a member's Backward does
        service.Backward(backward, timeout=10, metadata=key.call_metadata("/dmoe.ExpertService/Backward"))
        assert expert_version_with(service, key) == version + 1
        # the health service stays open to process supervisors
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
    # without the key, not even a connection: plain text; TLS trusting another swarm's CA; or TLS that
    # trusts this swarm's CA (public knowledge to whoever saw a node's certificate) but has no client
    # certificate of it, so that an outsider cannot even hold a call slot open
    no_client_cert = grpc.secure_channel(node.endpoint,
                                         grpc.ssl_channel_credentials(root_certificates=ca_pem(key)),
                                         options=[("grpc.ssl_target_name_override", NODE_NAME)])
    for outsider, _ in (
        (grpc.insecure_channel(node.endpoint), None), stub(node.endpoint, other), (no_client_cert, None),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            pbg.ExpertServiceStub(outsider).Forward(forward, timeout=10, metadata=key.call_metadata(FORWARD))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        outsider.close()
    channel, service = stub(node.endpoint, key)
    assert expert_version_with(service, key) == version + 1
    channel.close()


def expert_version_with(service, key: SwarmKey) -> int:
    info = service.Info(pb.InfoRequest(uids=["ffn.0"]), timeout=10,
                        metadata=key.call_metadata("/dmoe.ExpertService/Info"))
    return info.experts[0].version


def test_members_train_through_it_and_outsiders_cannot_join(private, tmp_path):
    key_path, coordinator, node = private
    key = SwarmKey.load(key_path)
    channel, service = stub(node.endpoint, key)
    with Swarm(SwarmConfig(initial_peers=coordinator.swarm, swarm_key=str(key_path), cache_ttl=60)) as swarm:
        wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == 2, 30, "the node's experts")
        layer = RemoteMoE(swarm, prefix="ffn", grid=(2,), in_features=HIDDEN, k=2, k_min=2)
        before = expert_version_with(service, key)
        x = torch.randn(8, HIDDEN, requires_grad=True)
        y = layer(x)
        assert layer.last_num_failed == 0 and bool(y.abs().sum() > 0)
        y.sum().backward()
        assert x.grad is not None and bool(x.grad.abs().sum() > 0)
        assert expert_version_with(service, key) > before  # the expert learned from a member's step
    channel.close()
    SwarmKey.generate(tmp_path / "wrong.key")
    for key in (None, str(tmp_path / "wrong.key")):
        outsider = Swarm(SwarmConfig(initial_peers=coordinator.swarm, swarm_key=key))
        with pytest.raises(DmoeError, match="private swarm answers only peers holding its key"):
            outsider.start(30)
        outsider.peer.shutdown()


def test_a_node_without_the_key_cannot_join_and_says_why(private, tmp_path):
    _, coordinator, _ = private
    proc = subprocess.run(
        [sys.executable, "-m", "dmoe", "node", "start", "--swarm", coordinator.swarm[0], "--device", "cpu",
         "--experts", "ffn.[5:6]", "--hidden-dim", str(HIDDEN)],
        capture_output=True, text=True, timeout=90, cwd=tmp_path, env=dict(os.environ),
    )
    assert proc.returncode != 0
    assert "private swarm answers only peers holding its key (--swarm-key)" in proc.stdout + proc.stderr


def test_a_trainer_with_the_key_trains_and_starts_its_averager_in_the_private_dht(private, tmp_path):
    """``dmoe train --run-id`` in a process of its own (its averager forks, which must happen before
    grpc starts threads, and this test process has them): the averager runs on the trainer's own DHT
    peer, which joins with the key."""
    key_path, coordinator, _ = private
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "dmoe", "train", "--swarm", coordinator.swarm[0], "--swarm-key", str(key_path),
         "--run-id", "private", "--d-model", str(HIDDEN), "--num-heads", "2", "--num-layers", "2",
         "--num-experts", "2", "--expert-inner", str(4 * HIDDEN),  # the node's experts: 4 x hidden
         "--seq-len", "16", "--steps", "4", "--batch-size", "2", "--eval-interval", "0",
         "--timeout-after-k-min", "30", "--save", str(tmp_path / "run"), "--metrics-file", str(metrics)],
        capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["failed_calls"] == 0 for r in steps)
    assert "Traceback" not in proc.stderr


def test_swarm_status_reads_a_private_swarm_with_the_key_only(private):
    key_path, coordinator, node = private
    common = [sys.executable, "-m", "dmoe", "swarm", "status", "--swarm", coordinator.swarm[0], "--json",
              "--timeout", "20"]
    member = subprocess.run([*common, "--swarm-key", str(key_path), "--wait-nodes", "1"], capture_output=True,
                            text=True, timeout=60)
    assert member.returncode == 0, member.stderr
    assert node.ready["node_id"] in member.stdout
    outsider = subprocess.run(common, capture_output=True, text=True, timeout=60)
    assert outsider.returncode == 1 and "private swarm answers only peers holding its key" in outsider.stderr


def test_a_relay_checks_a_private_node_through_its_tls(private):
    """The coordinator's relay holds the key: its dial-back calls the node over the swarm's TLS and
    checks who answers. A relay without the key can only see that the port accepts connections."""
    key_path, _, node = private
    assert node.ready["reachable"] is True and node.ready["tls"] is True
    assert "back and this node answered)" in node.log()
    node_id, port = node.ready["node_id"], node.ready["port"]
    key = SwarmKey.load(key_path)
    with Relay(key=key) as member:
        reply = asyncio.run(probe(member.address, port, key=key, node_id=node_id, tls=True))
        assert reply["reachable"] is True and reply["verified"] is True
        reply = asyncio.run(probe(member.address, port, key=key, node_id="QmSomebodyElse", tls=True))
        assert reply["reachable"] is False
        assert reply["error"] == f"another dmoe node answered there ({node_id})"
    with Relay() as keyless:
        reply = asyncio.run(probe(keyless.address, port, key=None, node_id=node_id, tls=True))
        assert reply["reachable"] is True and reply["verified"] is False


def test_a_relay_checks_a_private_node_without_tls_by_its_token(private, node_factory):
    """A private node with --no-tls: a relay without the key is refused by the node (UNAUTHENTICATED),
    which shows that a server is there but not whose, so the node starting under --reachability auto
    counts as reachable, unverified, and says so; a relay with the key calls it with a token and
    checks who answers."""
    key_path, _, _ = private
    key = SwarmKey.load(key_path)
    with Relay() as keyless:
        # its only relay: it starts a swarm of its own
        node = node_factory("--swarm-key", str(key_path), "--no-tls", "--experts", "ffn.[0:1]",
                            "--hidden-dim", str(HIDDEN), "--relay", keyless.address)
        node_id, port = node.ready["node_id"], node.ready["port"]
        assert node.ready["tls"] is False and node.ready["reachable"] is True
        assert "could not check that this node answers there" in node.log()
        reply = asyncio.run(probe(keyless.address, port, key=key, node_id=node_id, tls=False))
        assert reply["reachable"] is True and reply["verified"] is False and reply["error"] == ""
    with Relay(key=key) as member:
        reply = asyncio.run(probe(member.address, port, key=key, node_id=node_id, tls=False))
        assert reply["reachable"] is True and reply["verified"] is True
