"""Documented behaviours of one node that had no test, each against a real node (one per module):

- ``--max-concurrent-calls`` (docs/security.md, "Limits a node enforces"): a call beyond it is
  refused with RESOURCE_EXHAUSTED, whatever its kind, and served again once a slot frees;
- a client never sends non-finite inputs (docs/security.md): a RemoteMoE forward of NaN or Inf
  reaches no node, as the node's own counters show;
- SIGINT (README, "SIGINT/SIGTERM"): the node withdraws its records, checkpoints and exits 0. This
  is the module's last test: it stops the node.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from swarm_fixtures import NodeProcess, stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.records import find_experts, find_nodes
from dmoe.core.wire import deserialize, serialize
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(90)
HIDDEN = 8
MAX_CONCURRENT_CALLS = 4
UIDS = ["ffn.0", "ffn.1"]


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("limits")
    process = NodeProcess(workdir, ["--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN),
                                    "--max-concurrent-calls", str(MAX_CONCURRENT_CALLS),
                                    "--checkpoint-dir", str(workdir / "ckpt"), "--record-ttl", "60"])
    try:
        yield process.start()
    finally:
        process.cleanup()


def counters(endpoint: str) -> tuple[int, int, int]:
    """(expert calls, batched calls, parts of batched calls) the node received, from its Info."""
    channel, service = stub(endpoint)
    try:
        info = service.Info(pb.InfoRequest(), timeout=10)
        return info.expert_calls, info.batched_calls, info.batched_parts
    finally:
        channel.close()


def forward_request() -> pb.ForwardRequest:
    return pb.ForwardRequest(uid="ffn.0", inputs=[serialize(torch.ones(2, HIDDEN))])


def test_a_call_past_max_concurrent_calls_is_refused_and_served_once_a_slot_frees(node):
    """Streams whose request never ends hold their call slots: with MAX_CONCURRENT_CALLS - 1 of them
    open, one more call is served (an Info that sees the streams' bytes arriving); with one more
    stream, the next call is refused, RESOURCE_EXHAUSTED; once the streams end, each is answered
    and calls are served again."""
    data = forward_request().SerializeToString()
    release = threading.Event()

    def held_request() -> Iterator[pb.Chunk]:
        yield pb.Chunk(data=data)  # the whole request, but the stream stays open until release
        release.wait(60)

    channel, service = stub(node.endpoint)
    streams = []
    try:
        for _ in range(MAX_CONCURRENT_CALLS - 1):
            streams.append(service.ForwardStream(held_request(), timeout=60))
        # MAX_CONCURRENT_CALLS - 1 streams held and this Info: the limit exactly, all served
        wait_for(lambda: service.Info(pb.InfoRequest(), timeout=10).receiving_bytes
                 == (MAX_CONCURRENT_CALLS - 1) * len(data), 20, "the held streams' bytes to arrive")
        streams.append(service.ForwardStream(held_request(), timeout=60))

        def refused() -> grpc.RpcError | None:
            try:
                service.Info(pb.InfoRequest(), timeout=10)
            except grpc.RpcError as e:
                return e
            return None

        error = wait_for(refused, 20, "a call past the limit to be refused")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        with pytest.raises(grpc.RpcError) as forward:
            service.Forward(forward_request(), timeout=10)
        assert forward.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        for stream in streams:  # each held call is answered once its request ends
            reply = pb.ForwardResponse.FromString(b"".join(chunk.data for chunk in stream))
            assert tuple(deserialize(reply.outputs[0], max_numel=1 << 10).shape) == (2, HIDDEN)
        assert len(service.Forward(forward_request(), timeout=10).outputs) == 1
    finally:
        release.set()
        for stream in streams:
            stream.cancel()
        channel.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_remote_moe_never_sends_non_finite_inputs(node, bad):
    with Swarm(SwarmConfig(initial_peers=node.swarm, cache_ttl=60, spot_check_rate=0.0)) as swarm:
        wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == 2, 30, "the experts")
        layer = RemoteMoE(swarm, prefix="ffn", grid=(2,), in_features=HIDDEN, k=2, k_min=1,
                          forward_timeout=20)
        x = torch.randn(4, HIDDEN)
        before = counters(node.endpoint)
        layer(x)  # finite: reaches the node, in one call of it
        sent = counters(node.endpoint)
        assert sent != before and layer.last_num_failed == 0
        x[1, 3] = bad  # one value of one token: every expert's inputs hold it
        y = layer(x)
        assert counters(node.endpoint) == sent  # nothing reached the node
        # both calls failed on this client; the other tokens, with no expert, get zero
        assert layer.last_num_failed == 2 and bool((y[[0, 2, 3]] == 0).all())


def test_sigint_withdraws_the_records_checkpoints_and_exits_0(node, dht_factory, tmp_path):
    """The module's last test: it stops the node. Its records (a 60 s TTL) are gone from a DHT peer
    that held them well before they would expire, so they were withdrawn."""
    dht = dht_factory(node.swarm)
    wait_for(lambda: len(find_experts(dht, UIDS)) == 2 and node.ready["node_id"] in find_nodes(dht), 30,
             "the node's records")
    channel, service = stub(node.endpoint)
    try:
        x = torch.randn(3, HIDDEN)
        service.Backward(pb.BackwardRequest(uid="ffn.1", inputs=[serialize(x)], grad_outputs=[serialize(x)]),
                         timeout=30)
    finally:
        channel.close()
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGINT)  # as Ctrl-C does, to the node alone
    assert node.proc.wait(60) == 0
    log = node.log()
    assert "stopping: withdrawing records" in log and "checkpoint written" in log and "node stopped" in log
    assert "Traceback" not in log and "could not withdraw" not in log
    saved = node.workdir / "ckpt" / "ffn.1" / "000000000001.safetensors"
    assert saved.exists()
    wait_for(lambda: find_experts(dht, UIDS) == {} and find_nodes(dht) == {}, 20, "the records withdrawn")
