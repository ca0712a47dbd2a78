"""Hostile records in a real DHT: records that announce absurd limits, endpoints a client
should never dial (unix sockets, port 0), or numbers that overflow the swarm view. A real client
(:class:`dmoe.client.swarm.Swarm` and its Dispatcher) and a real coordinator read them; the attack
costs them nothing and honest records around them are used as before.

Also: the client's channel cache stays bounded as records rotate endpoints, and a call in flight on a
channel evicted meanwhile still completes."""

from __future__ import annotations

import concurrent.futures
import json
import math
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from counting_server import CountingServer
from hivemind.utils import get_dht_time
from hostile import plant_records
from swarm_fixtures import CoordinatorProcess, wait_for

import dmoe.client.channels
from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import ExpertJob
from dmoe.client.swarm import Swarm
from dmoe.core.dht import DHTPeer
from dmoe.core.owner import owned_subkey
from dmoe.core.recordguard import owner_of
from dmoe.core.records import NODES_KEY, ExpertLoad, ExpertRecord, NodeRecord, find_experts, prefix_entries
from dmoe.moe.remote import RemoteMoE
from dmoe.node import Node, NodeConfig
from dmoe.node.joining import replicas_of

pytestmark = pytest.mark.timeout(120)
HIDDEN, TOKENS = 32, 32  # 16 tokens of 32 floats: 2 KiB, above a 1 KiB message limit


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(tmp_path_factory.mktemp("coordinator"), ["--poll-interval", "0.3"])
    try:
        yield process.start()
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def swarm(coordinator) -> Iterator[Swarm]:
    with Swarm(SwarmConfig(initial_peers=coordinator.swarm, cache_ttl=0.2)) as swarm:
        yield swarm


def plant(peer: DHTPeer, key: str, name: str | int, value: dict, ttl: float = 120.0) -> None:
    """Store a raw record value (whatever a modified node might send) under ``key``, owned and signed
    by ``peer``'s own key, as that peer's record named ``name``."""
    owner = owner_of(peer.node).owner_id
    stored = peer.run(peer.node.store(key, {**value, "owner": owner}, get_dht_time() + ttl,
                                      subkey=owned_subkey(name, owner)), 30)
    assert stored, f"the DHT refused the record under {key}"


def plant_expert(peer: DHTPeer, uid: str, endpoint: str, **fields) -> None:
    """An expert record of ``uid`` (under the uid and each grid prefix), with any fields as given."""
    value = {**ExpertRecord(uid=uid, endpoint="127.0.0.1:1", node_id=f"n-{uid}").model_dump(),
             "endpoint": endpoint, **fields}
    plant(peer, uid, "", value)
    for key, coord in prefix_entries(uid):
        plant(peer, key, coord, value)


def test_records_with_tiny_limits_or_odd_endpoints_cost_a_client_nothing(swarm):
    """Each expert of the planted swarm gets all 32 tokens from a real Dispatcher. ffn.0 is an honest
    record, ffn.1 one at the floors of the limits (16 tokens, 1 KiB messages); the others say the node
    takes 1 token or 1 byte per request, or name a unix socket (directly or as the relay of a node
    behind a NAT), or port 0. The attacks reach nobody; the honest records are called as they say."""
    unix_dir = tempfile.mkdtemp(prefix="dmoe-", dir="/tmp")  # short: a unix socket path has ~100 bytes
    unix_path = str(Path(unix_dir) / "s")
    server = CountingServer(unix_path=unix_path).start()
    try:
        peer = swarm.peer
        plant_expert(peer, "ffn.0", server.endpoint, max_batch_tokens=4096, max_message_bytes=4 << 20)
        plant_expert(peer, "ffn.1", server.endpoint, max_batch_tokens=16, max_message_bytes=1024)
        plant_expert(peer, "ffn.2", server.endpoint, max_batch_tokens=1)
        plant_expert(peer, "ffn.3", server.endpoint, max_message_bytes=1)
        plant_expert(peer, "ffn.4", f"unix:{unix_path}")
        plant_expert(peer, "ffn.5", "127.0.0.1:1", reachable=False, relay=f"unix:{unix_path}")
        plant_expert(peer, "ffn.6", "127.0.0.1:0")
        found = wait_for(lambda: swarm.live_replicas_under(["ffn."], refresh=True)["ffn."], 30, "the records")
        jobs = [ExpertJob(replicas[0].uid, replicas, torch.randn(TOKENS, HIDDEN), torch.arange(TOKENS))
                for _, replicas in sorted(found.items())]
        dispatcher = swarm.dispatcher(0)
        started = time.monotonic()
        answers = dispatcher.forward(jobs, num_tokens=TOKENS, k_min=1, forward_timeout=20.0,
                                     timeout_after_k_min=20.0, on_result=lambda call, error: None)
        took = time.monotonic() - started
        answered = sorted(jobs[index].uid for index, _, _, _ in answers.parts)
        counts = {uid: (server.calls[uid], server.chunks[uid]) for uid in sorted(server.calls)}
        print(f"forward of {len(jobs)} experts took {took:.2f}s; (calls, stream chunks) per uid: {counts}")
        assert sorted(found) == [0, 1], f"records kept: {sorted(found)}; (calls, chunks): {counts}"
        assert answered == ["ffn.0", "ffn.1"] and answers.num_failed == 0
        assert server.calls["ffn.0"] == 1 and server.chunks["ffn.0"] == 0  # one unary call
        # at the floors: cut into parts of 16 tokens, each streamed in chunks of 512 bytes
        assert server.calls["ffn.1"] == TOKENS // 16 and server.chunks["ffn.1"] >= 4 * TOKENS // 16
        for uid in ("ffn.2", "ffn.3", "ffn.4", "ffn.5", "ffn.6"):
            assert server.calls[uid] == 0 and server.chunks[uid] == 0, (uid, counts)
    finally:
        server.shutdown()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def test_one_absurd_node_record_does_not_break_the_dashboard(coordinator, swarm):
    """A node record whose latency is 1.7e308 ms over two calls used to overflow the coordinator's view
    to inf, and /api/swarm answered 500 to everyone from then on. Now the record is not read (it is
    not a node's), and the honest node next to it is shown as before."""
    base = NodeRecord(node_id="x", endpoint="127.0.0.1:7", started_at=time.time() - 60,
                      updated_at=time.time(), experts=["ffn.9"],
                      load={"ffn.9": ExpertLoad(forward_calls=1, backward_calls=1, tokens=8,
                                                latency_p50_ms=3.0, latency_p99_ms=4.0)}).model_dump()
    bad = json.loads(json.dumps(base))
    bad["node_id"] = "absurd"
    bad["load"]["ffn.9"]["latency_p50_ms"] = 1.7e308
    plant(swarm.peer, NODES_KEY, "absurd", bad)
    plant(swarm.peer, NODES_KEY, "honest", {**base, "node_id": "honest"})
    url = coordinator.dashboard + "api/swarm"

    def honest_shown() -> dict | None:
        try:
            view = get_json(url)
        except urllib.error.HTTPError as e:
            pytest.fail(f"/api/swarm answered {e.code}: {e.read()[:300]!r}")
        return view if "honest" in {n["node_id"] for n in view["nodes"]} else None

    view = wait_for(honest_shown, 30, "the honest node on the dashboard")
    assert "absurd" not in {n["node_id"] for n in view["nodes"]}
    [honest] = [n for n in view["nodes"] if n["node_id"] == "honest"]
    assert honest["latency_p50_ms"] == 3.0 and honest["calls"] == 2
    assert all(math.isfinite(n["latency_p50_ms"]) for n in view["nodes"])
    get_json(coordinator.dashboard + "api/history")  # answers too


def test_channels_stay_bounded_and_an_evicted_channel_finishes_its_call(swarm, monkeypatch):
    """Records that rotate endpoints (here 12 ports of one server) leave at most MAX_CHANNELS channels
    open in a Dispatcher; a slow call on a channel evicted while it runs still gets its answer, and
    that channel is closed once it has."""
    monkeypatch.setattr(dmoe.client.channels, "MAX_CHANNELS", 4)
    slow = CountingServer(delay=1.5).start()
    fast = CountingServer(num_ports=12).start()
    dispatcher = swarm.dispatcher(0)

    def forward(endpoint: str, uid: str):
        record = ExpertRecord(uid=uid, endpoint=endpoint, node_id=endpoint)
        job = ExpertJob(uid, [record], torch.randn(4, HIDDEN), torch.arange(4))
        return dispatcher.forward([job], num_tokens=4, k_min=1, forward_timeout=20.0,
                                  timeout_after_k_min=20.0, on_result=lambda call, error: None)

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(forward, slow.endpoint, "slow.0")
            assert slow.started.wait(20), "the slow call never arrived"
            for i, endpoint in enumerate(fast.endpoints):
                assert forward(endpoint, f"fast.{i}").num_failed == 0
                assert len(dispatcher._channels) <= 4
            assert (slow.endpoint, False) not in dispatcher._channels  # evicted while its call ran
            answers = in_flight.result(30)
        assert answers.num_failed == 0 and len(answers.parts) == 1 and slow.calls["slow.0"] == 1
        wait_for(lambda: dispatcher._channels.num_closing == 0, 10, "the evicted channel to close")
        assert sum(fast.calls.values()) == 12
    finally:
        slow.shutdown()
        fast.shutdown()


@pytest.mark.parametrize("coord", ["9" * 20, "9" * 5000], ids=["above-int64", "5000-digits"])
def test_grid_coordinates_no_grid_has_cost_a_client_nothing(coordinator, coord):
    """A prefix entry whose name is a coordinate above int64, or longer than Python parses into an int
    (anyone may file one): the first made every forward under the prefix raise (ValueError building the
    beam search's tensor), the second failed the whole read of the prefix, so a client saw none of its
    experts. Now such names are no coordinates: the honest experts are found and called as before."""
    prefix = f"xp{len(coord)}"  # a prefix of its own per case: the module's DHT keeps what was planted
    config = NodeConfig(experts=[f"{prefix}.[0:2]"], hidden_dim=HIDDEN, device="cpu", swarm=coordinator.swarm)
    with Node(config), Swarm(SwarmConfig(initial_peers=coordinator.swarm, cache_ttl=0.2)) as client:
        value = {**ExpertRecord(uid=f"{prefix}.1", endpoint="127.0.0.1:9", node_id="evil").model_dump(),
                 "uid": f"{prefix}.{coord}"}
        plant(client.peer, f"{prefix}.", coord, value)
        key = f"{prefix}."
        found = wait_for(lambda: sorted(client.live_replicas_under([key], refresh=True)[key]) == [0, 1],
                         30, "the honest experts")
        assert found
        moe = RemoteMoE(client, prefix=prefix, grid=(4,), in_features=HIDDEN, k=1)
        x = torch.randn(8, HIDDEN, requires_grad=True)
        moe(x).sum().backward()
        assert moe.last_num_failed == 0 and x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_a_record_that_calls_an_open_nodes_endpoint_tls_does_not_shadow_it(coordinator):
    """A record of anyone's naming an honest open node's endpoint with ``tls`` (a private swarm's node,
    which this client, without a key, cannot dial) and a later expiration: the client kept one record per
    endpoint, that one, failed it locally on every call and never backed off, so the expert was lost on
    every step. Now a client without a key leaves records it cannot dial out, and the honest one serves."""
    config = NodeConfig(experts=["xt.[0:2]"], hidden_dim=HIDDEN, device="cpu", swarm=coordinator.swarm)
    with Node(config) as node, Swarm(SwarmConfig(initial_peers=coordinator.swarm, cache_ttl=0.2)) as client:
        plant_records(client.peer, {"xt.0": node.endpoint}, node_id="evil", ttl=600.0, tls=True)
        wait_for(lambda: {r.node_id for r in replicas_of(find_experts(client.peer, ["xt.0"]).get("xt.0"))}
                 == {"evil", node.node_id}, 30, "both records of xt.0")
        wait_for(lambda: sorted(client.live_replicas_under(["xt."], refresh=True)["xt."]) == [0, 1], 30,
                 "the node's experts")
        [level] = client.live_levels(["xt."], exact=True)
        assert [[r.node_id for r in replicas] for replicas in level.replicas] == [[node.node_id]] * 2
        moe = RemoteMoE(client, prefix="xt", grid=(2,), in_features=HIDDEN, k=2, k_min=1)
        x = torch.randn(16, HIDDEN, requires_grad=True)
        failed = []
        for _ in range(3):
            moe(x).sum().backward()
            failed.append(moe.last_num_failed)
        assert failed == [0, 0, 0]
