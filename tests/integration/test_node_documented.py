"""Documented behaviours of a node, and of the coordinator watching it, that had no test; against one
real coordinator and one real node for the module, whose tests run in order:

- /metrics (README, "Watching a swarm"): ``dmoe_node_errors_total`` and
  ``dmoe_node_latency_p99_seconds`` follow the node's failed and served calls, and the coordinator
  logs a line for a node that fails calls;
- ``--max-concurrent-calls`` (docs/security.md, "Limits a node enforces"): a call beyond it is
  refused with RESOURCE_EXHAUSTED, whatever its kind, and served again once a slot frees;
- a client never sends non-finite inputs (docs/security.md): a RemoteMoE forward of NaN or Inf
  reaches no node, as the node's own counters show;
- the coordinator logs a node that restarts (killed, started again with its identity): the
  restarted node is the module's node from then on;
- the dashboard refreshes every ``?refresh`` seconds, and every 2 s for a value that is not one;
- SIGINT (README, "SIGINT/SIGTERM"): the node withdraws its records, checkpoints and exits 0. The
  last test: it stops the node.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from chromium import rendered_page
from prometheus_client.parser import text_string_to_metric_families
from swarm_fixtures import CoordinatorProcess, NodeProcess, stub, wait_for

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


@dataclass
class Watched:
    coordinator: CoordinatorProcess
    node: NodeProcess  # replaced by the restart test
    node_args: list[str]


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Iterator[Watched]:
    workdir = tmp_path_factory.mktemp("watched")
    coordinator = CoordinatorProcess(workdir, ["--poll-interval", "0.3"], "coordinator")
    processes: list[NodeProcess] = [coordinator]
    try:
        coordinator.start()
        args = ["--swarm", coordinator.swarm[0], "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN),
                "--max-concurrent-calls", str(MAX_CONCURRENT_CALLS),
                "--checkpoint-dir", str(workdir / "ckpt"), "--identity-path", str(workdir / "node.key"),
                "--heartbeat-interval", "0.5", "--record-ttl", "60"]
        processes.append(NodeProcess(workdir, args, "node"))
        watched = Watched(coordinator, processes[-1].start(), args)
        yield watched
        processes.append(watched.node)
    finally:
        for process in processes:
            process.cleanup()


def forward_request(uid: str = "ffn.0") -> pb.ForwardRequest:
    return pb.ForwardRequest(uid=uid, inputs=[serialize(torch.ones(2, HIDDEN))])


# ---- /metrics and the coordinator's log -----------------------------------------------------------------
def node_metrics(url: str, node_id: str) -> dict[str, float]:
    """This node's samples on the coordinator's /metrics, by metric name (those without a kind label)."""
    with urllib.request.urlopen(url + "metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("node") == node_id and "kind" not in s.labels}


def monitor_lines(process: NodeProcess, pattern: str) -> list[str]:
    """The messages of the coordinator's monitor in its log that match ``pattern`` in full."""
    found = (re.search(r" dmoe\.coordinator\.monitor: (.*)$", line) for line in process.log().splitlines())
    return [m.group(1) for m in found if m and re.fullmatch(pattern, m.group(1))]


def test_failed_and_served_calls_reach_metrics_and_the_log(watched):
    url, node_id = watched.coordinator.dashboard, watched.node.ready["node_id"]
    first = wait_for(lambda: node_metrics(url, node_id) or None, 30, "the node on /metrics")
    assert (first["dmoe_node_errors_total"], first["dmoe_node_latency_p99_seconds"]) == (0, 0)
    channel, service = stub(watched.node.endpoint)
    try:
        with pytest.raises(grpc.RpcError) as refused:  # the wrong width: refused, one failed call
            service.Forward(pb.ForwardRequest(uid="ffn.0", inputs=[serialize(torch.ones(2, HIDDEN + 1))]),
                            timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wait_for(lambda: node_metrics(url, node_id)["dmoe_node_errors_total"] == 1, 30, "the failed call")
        failures = monitor_lines(watched.coordinator, rf"node {node_id} failed \d+ calls since the last view")
        assert failures == [f"node {node_id} failed 1 calls since the last view"]
        for _ in range(3):
            service.Forward(forward_request("ffn.1"), timeout=10)
        # the worst p99 over the node's experts, as the node measures it; no call after these changes it
        p99_s = max(e.stats.latency_p99_ms for e in service.Info(pb.InfoRequest(), timeout=10).experts) / 1e3
        assert p99_s > 0
        wait_for(lambda: node_metrics(url, node_id)["dmoe_node_latency_p99_seconds"]
                 == pytest.approx(p99_s, abs=1e-6), 30, "the calls' latency on /metrics")
        assert node_metrics(url, node_id)["dmoe_node_errors_total"] == 1
    finally:
        channel.close()


# ---- the node's limits and the client's inputs ----------------------------------------------------------
def counters(endpoint: str) -> tuple[int, int, int]:
    """(expert calls, batched calls, parts of batched calls) the node received, from its Info."""
    channel, service = stub(endpoint)
    try:
        info = service.Info(pb.InfoRequest(), timeout=10)
        return info.expert_calls, info.batched_calls, info.batched_parts
    finally:
        channel.close()




def test_a_call_past_max_concurrent_calls_is_refused_and_served_once_a_slot_frees(watched):
    """Streams whose request never ends hold their call slots: with MAX_CONCURRENT_CALLS - 1 of them
    open, one more call is served (an Info that sees the streams' bytes arriving); with one more
    stream, the next call is refused, RESOURCE_EXHAUSTED; once the streams end, each is answered
    and calls are served again."""
    data = forward_request().SerializeToString()
    release = threading.Event()

    def held_request() -> Iterator[pb.Chunk]:
        yield pb.Chunk(data=data)  # the whole request, but the stream stays open until release
        release.wait(60)

    channel, service = stub(watched.node.endpoint)
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
def test_remote_moe_never_sends_non_finite_inputs(watched, bad):
    node = watched.node
    with Swarm(SwarmConfig(initial_peers=node.swarm, cache_ttl=60, spot_check_rate=0.0)) as swarm:
        wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == 2, 30, "the experts")
        layer = RemoteMoE(swarm, prefix="ffn", grid=(2,), in_features=HIDDEN, k=2, k_min=1,
                          forward_timeout=20)
        x = torch.randn(4, HIDDEN)
        before = counters(node.endpoint)
        layer(x)  # finite: reaches the node
        sent = counters(node.endpoint)
        assert sent != before and layer.last_num_failed == 0
        x[1, 3] = bad  # one value of one token: every expert's inputs hold it
        y = layer(x)
        assert counters(node.endpoint) == sent  # nothing reached the node
        # both calls failed on this client; the other tokens, with no expert, get zero
        assert layer.last_num_failed == 2 and bool((y[[0, 2, 3]] == 0).all())


# ---- a restart, the dashboard, SIGINT ---------------------------------------------------------------------
def test_a_node_that_restarts_is_logged(watched):
    node_id = watched.node.ready["node_id"]
    watched.node.kill()  # kill -9: its records stay until the restarted node's replace them
    watched.node = NodeProcess(watched.node.workdir, watched.node_args, "restarted").start()
    assert watched.node.ready["node_id"] == node_id
    restarted = rf"node restarted: {node_id} at .*"
    wait_for(lambda: monitor_lines(watched.coordinator, restarted), 30, "the restart logged")
    assert monitor_lines(watched.coordinator, restarted) == [
        f"node restarted: {node_id} at {watched.node.endpoint}"]
    assert not monitor_lines(watched.coordinator, rf"node gone: {node_id} .*")


def rendered_body(url: str, virtual_ms: int) -> dict[str, str]:
    """The data- attributes of the dashboard's body after ``virtual_ms`` of Chromium's virtual time."""
    page = rendered_page(url, virtual_ms)
    body = re.search(r"<body([^>]*)>", page)
    assert body, page[:2000]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


@pytest.mark.parametrize("query, every_ms",
                         [("?refresh=0.5", 500), ("?refresh=-1", 2000), ("?refresh=1e12", 2000)])
def test_the_dashboard_refreshes_every_refresh_seconds(watched, query, every_ms):
    """?refresh=0.5: every 0.5 s; a negative value (which refreshed without a pause) and one too large
    for the browser's timers (which fired at once) keep the default 2 s, as a missing one does."""
    body = rendered_body(watched.coordinator.dashboard + query, 4900)
    # refreshes at 0, every_ms, 2 every_ms, ... within the 4.9 s of virtual time
    assert (body["refresh-ms"], body["refreshes"]) == (str(every_ms), str(4900 // every_ms + 1)), body


def test_sigint_withdraws_the_records_checkpoints_and_exits_0(watched, dht_factory):
    """The module's last test: it stops the node. Its records (a 60 s TTL) are gone from a DHT peer
    that held them well before they would expire, so they were withdrawn."""
    node = watched.node
    dht = dht_factory(node.swarm)
    wait_for(lambda: len(find_experts(dht, UIDS)) == 2 and node.ready["node_id"] in find_nodes(dht), 30,
             "the node's records")
    channel, service = stub(node.endpoint)
    try:
        version = service.Info(pb.InfoRequest(uids=["ffn.1"]), timeout=10).experts[0].version
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
    assert (node.workdir / "ckpt" / "ffn.1" / f"{version + 1:012d}.safetensors").exists()
    wait_for(lambda: find_experts(dht, UIDS) == {} and find_nodes(dht) == {}, 20, "the records withdrawn")
