"""Replicas in the swarm view: per uid its replicas, versions and spread; experts held by one node
flagged in the view, its JSON, ``dmoe swarm status`` tables and the coordinator's metrics."""

from __future__ import annotations

import io
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from rich.console import Console

from dmoe.coordinator.metrics import replica_metrics
from dmoe.core.records import ExpertLoad, NodeRecord
from dmoe.view.status import render
from dmoe.view.swarmview import SwarmView, summarize

pytestmark = pytest.mark.timeout(30)


def node(node_id: str, loads: dict[str, ExpertLoad], experts: list[str] | None = None) -> NodeRecord:
    return NodeRecord(node_id=node_id, endpoint=f"10.0.0.{len(node_id)}:31337", started_at=50.0,
                      updated_at=99.0, experts=list(loads) if experts is None else experts, load=loads)


def swarm() -> dict[str, NodeRecord]:
    """Two nodes share ffn.0 and ffn.1 (versions and spreads differ); ffn.2 is only on "a", ffn.3 only
    on "b"."""
    return {
        "a": node("a", {"ffn.0": ExpertLoad(version=12, spread=0.04, averaged_at=90.0, forward_calls=3,
                                            tokens=30, queued_tokens=2),
                        "ffn.1": ExpertLoad(version=5),
                        "ffn.2": ExpertLoad(version=9, forward_calls=1, tokens=4)}),
        "b": node("b", {"ffn.0": ExpertLoad(version=10, spread=0.25, averaged_at=80.0, backward_calls=2,
                                            tokens=16, errors=1, rejected=1),
                        "ffn.1": ExpertLoad(version=5, spread=0.0, averaged_at=95.0),
                        "ffn.3": ExpertLoad(version=1)}),
    }


def test_replicas_per_uid_with_versions_spread_and_single_node_experts():
    view = summarize(swarm(), now=100.0)
    assert (view.num_experts, view.num_replicated, view.num_single_replica) == (4, 2, 2)
    assert view.single_replica == ["ffn.2", "ffn.3"]
    groups = {g.uid: g for g in view.expert_replicas}
    assert list(groups) == ["ffn.0", "ffn.1", "ffn.2", "ffn.3"]

    shared = groups["ffn.0"]
    assert (shared.num_replicas, shared.single) == (2, False)
    assert [(r.node_id, r.version, r.spread, r.averaged_at) for r in shared.replicas] == [
        ("a", 12, 0.04, 90.0), ("b", 10, 0.25, 80.0)]
    assert (shared.min_version, shared.max_version) == (10, 12)
    assert shared.max_spread == 0.25 and shared.last_averaged_at == 90.0
    a, b = shared.replicas
    assert (a.calls, a.tokens, a.queued_tokens, a.endpoint) == (3, 30, 2, "10.0.0.1:31337")
    assert (b.calls, b.tokens, b.errors) == (2, 16, 2)  # errors: failed + shed

    same = groups["ffn.1"]
    assert (same.min_version, same.max_version, same.max_spread, same.last_averaged_at) == (5, 5, 0.0, 95.0)
    for uid, holder in (("ffn.2", "a"), ("ffn.3", "b")):
        assert groups[uid].single and groups[uid].num_replicas == 1
        assert [r.node_id for r in groups[uid].replicas] == [holder]
    assert view.max_spread == 0.25

    # the per-(uid, node) rows stay, and carry the spread too
    assert [(e.uid, e.node_id, e.version, e.spread) for e in view.experts if e.uid == "ffn.0"] == [
        ("ffn.0", "a", 12, 0.04), ("ffn.0", "b", 10, 0.25)]


def test_the_json_carries_replicas_and_keeps_the_old_keys():
    data = json.loads(summarize(swarm(), now=100.0).model_dump_json())
    old_keys = {"at", "num_nodes", "num_experts", "num_replicated", "calls", "tokens", "errors", "rejected",
                "nodes", "experts"}
    replica_keys = {"num_single_replica", "single_replica", "max_spread", "expert_replicas"}
    demand_keys = {"num_trainers", "grids", "coverage", "no_replica"}  # dmoe.core.demand
    assert old_keys | replica_keys | demand_keys == set(data)
    group = data["expert_replicas"][0]
    assert set(group) == {"uid", "num_replicas", "replicas", "min_version", "max_version", "max_spread",
                          "last_averaged_at", "single"}
    assert set(group["replicas"][0]) == {"node_id", "endpoint", "version", "spread", "averaged_at", "calls",
                                         "tokens", "errors", "queued_tokens", "latency_p50_ms"}
    assert {"spread", "averaged_at", "version"} <= set(data["experts"][0])
    assert data["single_replica"] == ["ffn.2", "ffn.3"] and data["num_single_replica"] == 2
    # a view read back from its JSON is the same view; one from before replicas reads with defaults
    assert SwarmView.model_validate(data) == summarize(swarm(), now=100.0)
    old = SwarmView.model_validate({key: data[key] for key in old_keys})
    assert (old.num_single_replica, old.single_replica, old.expert_replicas) == (0, [], [])


def test_a_uid_hosted_without_published_numbers_is_still_a_replica():
    records = {"a": node("a", {"x.0": ExpertLoad(version=3)}),
               "b": node("b", {}, experts=["x.0", "x.0"])}  # listed (twice), no load entry
    view = summarize(records, now=100.0)
    (group,) = view.expert_replicas
    assert (group.num_replicas, group.min_version, group.max_version, group.single) == (2, 0, 3, False)
    assert view.num_single_replica == 0 and [e.node_id for e in view.experts] == ["a"]


def printed(view: SwarmView, experts: bool) -> str:
    out = io.StringIO()
    render(view, Console(file=out, width=220, color_system=None), experts=experts)
    return out.getvalue()


def test_status_marks_single_node_experts():
    view = summarize(swarm(), now=100.0)
    summary = printed(view, experts=False)
    assert "2 nodes, 4 experts (2 on more than one node, 2 on a single node)" in summary
    assert "2 experts are held by a single node" in summary and "ffn.0" not in summary

    table = printed(view, experts=True)
    rows = {line.split()[1]: line for line in table.splitlines() if line.startswith("│ ffn.")}
    assert set(rows) == {"ffn.0", "ffn.1", "ffn.2", "ffn.3"}  # one row per uid
    assert "SINGLE" in rows["ffn.2"] and "SINGLE" in rows["ffn.3"]
    assert "SINGLE" not in rows["ffn.0"] and "SINGLE" not in rows["ffn.1"]
    assert "a v12, b v10" in rows["ffn.0"] and "10..12" in rows["ffn.0"] and "25.00%" in rows["ffn.0"]
    assert "10 s ago" in rows["ffn.0"]  # the latest averaging of a replica, at 90.0, seen at 100.0
    assert "0.00%" in rows["ffn.1"] and "5 s ago" in rows["ffn.1"]  # measured, and zero
    assert " - " in rows["ffn.2"] and "never" in rows["ffn.2"]  # never averaged: no spread
    assert "2 experts are held by a single node" in table

    one = summarize({"a": node("a", {"ffn.0": ExpertLoad()}), "b": node("b", {"ffn.0": ExpertLoad(),
                                                                                "ffn.1": ExpertLoad()})})
    assert "1 expert is held by a single node" in printed(one, experts=False)
    replicated = summarize({"a": node("a", {"ffn.0": ExpertLoad()}), "b": node("b", {"ffn.0": ExpertLoad()})})
    shown = printed(replicated, experts=True)
    assert "0 on a single node" in shown and "SINGLE" not in shown and "held by a single node" not in shown


def test_status_names_at_most_four_replicas_per_row():
    records = {f"n{i}": node(f"n{i}", {"ffn.0": ExpertLoad(version=i)}) for i in range(6)}
    table = printed(summarize(records, now=100.0), experts=True)
    (row,) = [line for line in table.splitlines() if line.startswith("│ ffn.0")]
    assert "n0 v0, n1 v1, n2 v2, n3 v3, +2 more" in row and "0..5" in row and " 6 " in row


class _Families(Collector):
    def __init__(self, view: SwarmView, limit: int):
        self.view, self.limit = view, limit

    def collect(self):
        return replica_metrics(self.view, self.limit)


def scrape(view: SwarmView, limit: int) -> dict:
    registry = CollectorRegistry()
    registry.register(_Families(view, limit))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_count_single_node_experts_and_label_uids_only_in_small_swarms():
    view = summarize(swarm(), now=100.0)
    families = scrape(view, limit=4)
    assert families["dmoe_experts_single_replica"].samples[0].value == 2
    assert {s.labels["replicas"]: s.value for s in families["dmoe_experts_by_replicas"].samples} == {
        "1": 2, "2": 2, "3": 0, "4+": 0}
    assert families["dmoe_experts_max_spread"].samples[0].value == 0.25
    assert families["dmoe_experts_max_version_lag"].samples[0].value == 2
    assert {s.labels["uid"]: s.value for s in families["dmoe_expert_replicas"].samples} == {
        "ffn.0": 2, "ffn.1": 2, "ffn.2": 1, "ffn.3": 1}
    assert {s.labels["uid"]: s.value for s in families["dmoe_expert_spread"].samples}["ffn.0"] == 0.25
    assert {s.labels["uid"]: s.value for s in families["dmoe_expert_version_lag"].samples}["ffn.0"] == 2

    big = scrape(view, limit=3)  # more experts than per-uid series allowed: only the swarm-wide gauges
    assert big["dmoe_experts_single_replica"].samples[0].value == 2
    assert all(not big[name].samples
               for name in ("dmoe_expert_replicas", "dmoe_expert_spread", "dmoe_expert_version_lag"))

    many = {f"n{i}": node(f"n{i}", {"ffn.0": ExpertLoad()}) for i in range(5)}
    buckets = scrape(summarize(many), limit=4)["dmoe_experts_by_replicas"].samples
    assert {s.labels["replicas"]: s.value for s in buckets}["4+"] == 1
