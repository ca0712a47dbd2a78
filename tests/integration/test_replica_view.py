"""What a user sees of replicas, with real nodes: two nodes hosting overlapping uids, read by
``dmoe swarm status --experts --json`` (a subprocess), the coordinator's /api/swarm, /metrics and its
dashboard page: replicas per uid with each replica's version, the spread replica averaging measured,
and experts held by a single node flagged, also when a node leaves."""

from __future__ import annotations

import html.parser
import json
import subprocess
import sys
import urllib.request

import pytest
import torch
from chromium import rendered_page
from prometheus_client.parser import text_string_to_metric_families
from swarm_fixtures import stub, wait_for

from dmoe.core.wire import serialize
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(240)
HIDDEN = 8
BEATS = ("--heartbeat-interval", "1", "--record-ttl", "10")  # a beat may be late on a busy machine


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def get_json(url: str) -> dict:
    return json.loads(get_text(url))


class _ExpertRows(html.parser.HTMLParser):
    """The rows of the dashboard's experts table (one per uid): uid -> the row's attributes."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._in_experts = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._in_experts = attrs.get("id") == "experts"
        elif tag == "tr" and self._in_experts and "data-uid" in attrs:
            self.rows[attrs["data-uid"]] = attrs

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_experts = False


def expert_rows(page: str) -> dict[str, dict[str, str]]:
    parser = _ExpertRows()
    parser.feed(page)
    return parser.rows


def single_rows(rows: dict[str, dict[str, str]]) -> set[str]:
    """The uids whose row the page highlights as held by a single node."""
    return {uid for uid, row in rows.items() if "single" in row.get("class", "").split()}


def backward(service, uid: str, times: int) -> None:
    x = torch.randn(4, HIDDEN)
    for _ in range(times):
        service.Backward(pb.BackwardRequest(uid=uid, inputs=[serialize(x)], grad_outputs=[serialize(x)]),
                         timeout=30)


def replicas(view: dict) -> dict[str, dict]:
    return {group["uid"]: group for group in view["expert_replicas"]}


def versions(group: dict) -> dict[str, int]:
    return {r["node_id"]: r["version"] for r in group["replicas"]}


def test_replicas_versions_spread_and_single_node_experts(coordinator_factory, node_factory):
    coordinator = coordinator_factory("--poll-interval", "0.5")
    address, url = coordinator.ready["swarm"][0], coordinator.dashboard
    common = ("--swarm", address, "--hidden-dim", str(HIDDEN), "--average-interval", "1", *BEATS)
    a = node_factory("--experts", "ffn.[0:3]", *common, name="a")
    b = node_factory("--experts", "ffn.[1:4]", *common, name="b")  # joins ffn.1 and ffn.2 as a replica
    a_id, b_id = a.ready["node_id"], b.ready["node_id"]
    (channel_a, service_a), (channel_b, service_b) = stub(a.endpoint), stub(b.endpoint)
    try:
        backward(service_a, "ffn.1", 2)  # the replicas of ffn.1 and ffn.2 take different steps
        backward(service_b, "ffn.2", 1)
    finally:
        channel_a.close()
        channel_b.close()

    def settled():
        view = get_json(url + "api/swarm")
        groups = replicas(view)
        return (set(groups) == {"ffn.0", "ffn.1", "ffn.2", "ffn.3"}
                and versions(groups["ffn.1"]) == {a_id: 2, b_id: 0}
                and versions(groups["ffn.2"]) == {a_id: 0, b_id: 1}
                and groups["ffn.1"]["max_spread"] > 0 and view)  # averaging measured a's 2 steps apart

    view = wait_for(settled, 90, "both nodes' versions and a measured spread in /api/swarm", interval=0.5)
    assert view["single_replica"] == ["ffn.0", "ffn.3"] and view["num_single_replica"] == 2

    status = subprocess.run([sys.executable, "-m", "dmoe", "swarm", "status", "--swarm", address, "--experts",
                             "--json", "--wait-nodes", "2"], capture_output=True, text=True, timeout=90)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    groups = replicas(shown)
    assert {uid: g["num_replicas"] for uid, g in groups.items()} == {"ffn.0": 1, "ffn.1": 2, "ffn.2": 2,
                                                                    "ffn.3": 1}
    assert {uid: g["single"] for uid, g in groups.items()} == {"ffn.0": True, "ffn.1": False, "ffn.2": False,
                                                              "ffn.3": True}
    assert shown["single_replica"] == ["ffn.0", "ffn.3"] and shown["num_single_replica"] == 2
    assert (shown["num_experts"], shown["num_replicated"]) == (4, 2)
    assert [r["node_id"] for r in groups["ffn.0"]["replicas"]] == [a_id]
    assert [r["node_id"] for r in groups["ffn.3"]["replicas"]] == [b_id]
    assert versions(groups["ffn.1"]) == {a_id: 2, b_id: 0}
    assert (groups["ffn.1"]["min_version"], groups["ffn.1"]["max_version"]) == (0, 2)
    assert (groups["ffn.2"]["min_version"], groups["ffn.2"]["max_version"]) == (0, 1)
    endpoints = {r["node_id"]: r["endpoint"] for r in groups["ffn.1"]["replicas"]}
    assert endpoints == {a_id: a.endpoint, b_id: b.endpoint}
    for uid in ("ffn.1", "ffn.2"):  # replicas average: each measured a spread, finite and not absurd
        group = groups[uid]
        assert group["last_averaged_at"] > 0 and 0 <= group["max_spread"] < 4
        assert group["max_spread"] == max(r["spread"] for r in group["replicas"])
    for uid in ("ffn.0", "ffn.3"):  # nobody to average with
        assert groups[uid]["last_averaged_at"] == 0 and groups[uid]["max_spread"] == 0
    # the per-(uid, node) rows are still there, as before replicas
    assert {(e["uid"], e["node_id"]) for e in shown["experts"]} == {
        ("ffn.0", a_id), ("ffn.1", a_id), ("ffn.2", a_id), ("ffn.1", b_id), ("ffn.2", b_id), ("ffn.3", b_id)}

    families = {f.name: f for f in text_string_to_metric_families(get_text(url + "metrics"))}
    assert families["dmoe_experts_single_replica"].samples[0].value == 2
    assert {s.labels["uid"]: s.value for s in families["dmoe_expert_replicas"].samples} == {
        "ffn.0": 1, "ffn.1": 2, "ffn.2": 2, "ffn.3": 1}
    assert {s.labels["uid"]: s.value for s in families["dmoe_expert_version_lag"].samples}["ffn.1"] == 2

    rows = expert_rows(rendered_page(url))
    assert {uid: row["data-replicas"] for uid, row in rows.items()} == {
        "ffn.0": "1", "ffn.1": "2", "ffn.2": "2", "ffn.3": "1"}
    assert single_rows(rows) == {"ffn.0", "ffn.3"}

    b.kill()  # kill -9: b's records expire, and what it shared with a is now on a single node

    def b_gone():
        view = get_json(url + "api/swarm")
        return view["num_nodes"] == 1 and view

    view = wait_for(b_gone, 60, "the killed node to vanish from /api/swarm", interval=0.5)
    assert view["single_replica"] == ["ffn.0", "ffn.1", "ffn.2"] and view["num_replicated"] == 0
    assert {uid: versions(g) for uid, g in replicas(view).items()} == {
        "ffn.0": {a_id: 0}, "ffn.1": {a_id: 2}, "ffn.2": {a_id: 0}}
    families = {f.name: f for f in text_string_to_metric_families(get_text(url + "metrics"))}
    assert families["dmoe_experts_single_replica"].samples[0].value == 3
    rows = expert_rows(rendered_page(url))
    assert single_rows(rows) == {"ffn.0", "ffn.1", "ffn.2"}
