"""The coordinator: a bootstrap peer whose address survives restarts, its dashboard, JSON API and
metrics, ``dmoe swarm status``, and a swarm that keeps working without it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import torch
from chromium import rendered_page
from prometheus_client.parser import text_string_to_metric_families
from swarm_fixtures import stub, wait_for

import dmoe
from dmoe.core.experts import create_expert
from dmoe.core.records import find_experts
from dmoe.core.wire import serialize
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(180)
HIDDEN = 8


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def node_ids(view: dict) -> set[str]:
    return {n["node_id"] for n in view["nodes"]}


def test_address_is_stable_and_nodes_join_through_it(tmp_path, coordinator_factory, node_factory,
                                                     dht_factory):
    identity = tmp_path / "coordinator.key"
    first = coordinator_factory("--identity", str(identity))
    address = first.ready["swarm"][0]
    port = address.split("/tcp/")[1].split("/")[0]
    assert first.terminate(30) == 0

    second = coordinator_factory("--identity", str(identity), "--dht-port", port)
    assert second.ready["swarm"][0] == address

    node = node_factory("--swarm", address, "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN))
    client = dht_factory([address])
    records = wait_for(lambda: find_experts(client, ["ffn.0", "ffn.1"]), 30, "records via the coordinator")
    assert {r.endpoint for replicas in records.values() for r in replicas} == {node.endpoint}


def test_dashboard_api_metrics_and_status_follow_the_swarm(coordinator_factory, node_factory):
    coordinator = coordinator_factory("--poll-interval", "0.5")
    address, url = coordinator.ready["swarm"][0], coordinator.dashboard
    beats = ("--heartbeat-interval", "1", "--record-ttl", "10")  # a beat may be late on a busy machine
    busy = node_factory("--swarm", address, "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), *beats,
                        name="busy")
    doomed = node_factory("--swarm", address, "--experts", "ffn.[2:4]", "--hidden-dim", str(HIDDEN), *beats,
                          name="doomed")
    busy_id, doomed_id = busy.ready["node_id"], doomed.ready["node_id"]

    _, service = stub(busy.endpoint)
    x = torch.randn(8, HIDDEN)
    for _ in range(3):
        service.Backward(pb.BackwardRequest(uid="ffn.1", inputs=[serialize(x)], grad_outputs=[serialize(x)]),
                         timeout=30)

    def busy_seen():
        view = get_json(url + "api/swarm")
        nodes = {n["node_id"]: n for n in view["nodes"]}
        return set(nodes) == {busy_id, doomed_id} and nodes[busy_id]["backward_calls"] == 3 and view

    view = wait_for(busy_seen, 30, "both nodes and the busy node's calls in /api/swarm", interval=0.3)
    nodes = {n["node_id"]: n for n in view["nodes"]}
    assert nodes[busy_id]["tokens"] == 24 and nodes[busy_id]["endpoint"] == busy.endpoint
    assert nodes[busy_id]["optimizer_steps"] == 3 and nodes[doomed_id]["calls"] == 0
    assert (view["num_nodes"], view["num_experts"], nodes[busy_id]["device"]) == (2, 4, "cpu")
    assert {e["uid"] for e in view["experts"] if e["node_id"] == doomed_id} == {"ffn.2", "ffn.3"}
    assert view["coordinator"]["swarm"] == coordinator.ready["swarm"]

    families = {f.name: f for f in text_string_to_metric_families(get_text(url + "metrics"))}
    assert families["dmoe_swarm_nodes"].samples[0].value == 2
    tokens = {s.labels["node"]: s.value for s in families["dmoe_node_tokens"].samples}
    assert tokens == {busy_id: 24, doomed_id: 0}
    calls = {(s.labels["node"], s.labels["kind"]): s.value for s in families["dmoe_node_calls"].samples}
    assert calls[(busy_id, "backward")] == 3

    wait_for(lambda: get_json(url + "api/history")["nodes"].get(busy_id), 20, "a rate of the busy node")
    for _ in range(5):  # now calls between two of its records: a rate above zero, at most their tokens
        service.Forward(pb.ForwardRequest(uid="ffn.0", inputs=[serialize(x)]), timeout=30)

    def busy_rate():  # and the doomed node's second record seen too: a rate of its own
        history = get_json(url + "api/history")
        rates = [p["tokens_per_s"] for p in history["nodes"][busy_id]]
        return max(rates) > 0 and history["nodes"].get(doomed_id) and history

    history = wait_for(busy_rate, 20, "the busy node's tokens/s above zero", interval=0.3)
    points = history["nodes"][busy_id]
    assert all(set(p) == {"at", "tokens_per_s", "calls_per_s", "errors_per_s"} for p in points)
    # every call is 8 tokens; a rate spans two records of the node, at least a heartbeat (1 s) apart,
    # between which it served at most the 5 calls
    assert all(p["tokens_per_s"] == pytest.approx(8 * p["calls_per_s"], rel=1e-12) for p in points), points
    assert max(p["tokens_per_s"] for p in points) <= 5 * 8 / 1.0
    assert all(p["tokens_per_s"] == 0 for p in history["nodes"][doomed_id])
    # the swarm's rate at a view is the sum of the nodes' latest: the busy node's, as the other's is 0
    swarm_at = {p["at"]: p["tokens_per_s"] for p in history["swarm"]}
    assert all(swarm_at[p["at"]] == p["tokens_per_s"] for p in points), (points, history["swarm"])
    assert get_text(url + "healthz") == "ok"

    status = subprocess.run([sys.executable, "-m", "dmoe", "swarm", "status", "--swarm", address, "--json",
                             "--wait-nodes", "2"], capture_output=True, text=True, timeout=90)
    assert status.returncode == 0, status.stderr
    from_status = json.loads(status.stdout)
    assert node_ids(from_status) == {busy_id, doomed_id}
    assert {n["node_id"]: n["calls"] for n in from_status["nodes"]}[busy_id] >= 3
    table = subprocess.run([sys.executable, "-m", "dmoe", "swarm", "status", "--swarm", busy.swarm[0],
                            "--experts", "--wait-nodes", "2"], capture_output=True, text=True, timeout=90)
    assert table.returncode == 0, table.stderr
    assert "2 nodes, 4 experts" in table.stdout and busy.endpoint in table.stdout and "ffn.3" in table.stdout

    page = rendered_page(url)
    assert f'data-node-id="{busy_id}"' in page and f'data-node-id="{doomed_id}"' in page
    assert 'data-uid="ffn.3"' in page and 'data-series="swarm"' in page

    doomed.kill()  # kill -9: no withdrawal, its records expire
    wait_for(lambda: node_ids(get_json(url + "api/swarm")) == {busy_id}, 60, "the killed node to vanish",
             interval=0.5)
    page = rendered_page(url)
    assert f'data-node-id="{busy_id}"' in page and f'data-node-id="{doomed_id}"' not in page
    assert 'data-uid="ffn.3"' not in page
    log = coordinator.log()
    assert f"node joined: {doomed_id}" in log and f"node gone: {doomed_id}" in log


def test_the_swarm_keeps_working_without_the_coordinator(coordinator_factory, node_factory):
    coordinator = coordinator_factory()
    address = coordinator.ready["swarm"][0]
    first = node_factory("--swarm", address, "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN),
                         name="first")
    coordinator.kill()
    # several addresses, the coordinator's dead: a node and a client join through the live one
    second = node_factory("--swarm", address, "--swarm", first.swarm[0], "--experts", "ffn.[2:4]",
                          "--hidden-dim", str(HIDDEN), name="second")
    with dmoe.Swarm(dmoe.SwarmConfig(initial_peers=[address, first.swarm[0]], cache_ttl=0)) as swarm:
        def both():
            live = swarm.live_under(["ffn."])["ffn."]
            return set(live) == {0, 1, 2, 3} and live
        live = wait_for(both, 30, "experts of both nodes")
        assert {live[0].endpoint, live[2].endpoint} == {first.endpoint, second.endpoint}
        moe = dmoe.RemoteMoE(swarm, prefix="ffn", grid=(4,), in_features=HIDDEN, k=4, k_min=4,
                             forward_timeout=30)
        x = torch.randn(5, HIDDEN)
        y = moe(x)
        assert moe.last_num_failed == 0
        # every expert of both nodes answered: the mixture of all four, as computed here
        experts = [create_expert("ffn", uid=f"ffn.{i}", hidden_dim=HIDDEN)[0] for i in range(4)]
        with torch.no_grad():
            weights = moe.gates[0](x).softmax(-1)
            expected = sum(weights[:, i, None] * experts[i](x) for i in range(4))
        torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-6)


def test_swarm_status_through_a_dead_address_says_what_to_check():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWEFCvBWyYb99onwTpANNAsLYQE2dxu5a5Vpy2wq1SaFc2"  # nobody listens
    result = subprocess.run([sys.executable, "-m", "dmoe", "swarm", "status", "--swarm", dead,
                             "--timeout", "20"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"cannot read the swarm through {dead}" in result.stderr and "Traceback" not in result.stderr
