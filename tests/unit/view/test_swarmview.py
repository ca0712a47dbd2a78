"""SwarmView from node records, and throughput history across views, restarts and departures."""

from __future__ import annotations

import json
import math
import sys

import pydantic
import pytest

from dmoe.core.records import ExpertLoad, Hardware, NodeRecord
from dmoe.view.swarmview import ThroughputHistory, json_safe, summarize

pytestmark = pytest.mark.timeout(30)


def node(node_id: str, experts: dict[str, ExpertLoad], started_at: float = 100.0,
         at: float = 0.0) -> NodeRecord:
    return NodeRecord(node_id=node_id, endpoint=f"127.0.0.1:{len(node_id)}", started_at=started_at,
                      updated_at=at,
                      hardware=Hardware(device="cuda:0", device_name="RTX 4090", num_cpus=8,
                                        ram_bytes=1 << 34),
                      experts=list(experts), load=experts)


def load(calls: int, tokens: int, p50: float = 1.0, p99: float = 2.0, errors: int = 0,
         version: int = 0) -> ExpertLoad:
    return ExpertLoad(forward_calls=calls, backward_calls=calls, tokens=tokens, errors=errors,
                      latency_p50_ms=p50, latency_p99_ms=p99, version=version, queued_tokens=3)


def test_summary_sums_per_node_and_counts_replicas():
    records = {
        "b": node("b", {"lm1.0": load(1, 10, p50=10.0, p99=50.0),
                        "lm0.1": load(3, 30, p50=2.0, p99=5.0, errors=1)}),
        "a": node("a", {"lm0.0": load(0, 0), "lm0.1": load(2, 20, version=7)}),
    }
    view = summarize(records, now=160.0)
    assert [n.node_id for n in view.nodes] == ["a", "b"]
    b = view.nodes[1]
    assert (b.forward_calls, b.backward_calls, b.calls, b.tokens, b.errors) == (4, 4, 8, 40, 1)
    assert b.latency_p50_ms == pytest.approx((2 * 10.0 + 6 * 2.0) / 8)  # call-weighted
    assert b.latency_p99_ms == 50.0 and b.queued_tokens == 6 and b.uptime_s == 60.0
    assert b.expert_prefixes == ["lm0", "lm1"] and b.device_name == "RTX 4090" and b.num_experts == 2
    assert view.nodes[0].latency_p50_ms == 1.0 and view.nodes[0].optimizer_steps == 7
    assert (view.num_nodes, view.num_experts, view.num_replicated) == (2, 3, 1)
    assert (view.calls, view.tokens, view.errors) == (12, 60, 1)
    assert [(e.uid, e.node_id) for e in view.experts] == [("lm0.0", "a"), ("lm0.1", "a"), ("lm0.1", "b"),
                                                         ("lm1.0", "b")]


def test_an_empty_swarm():
    view = summarize({}, now=1.0)
    assert (view.num_nodes, view.num_experts, view.nodes, view.experts) == (0, 0, [], [])


def test_throughput_is_the_growth_of_counters_between_records():
    history = ThroughputHistory(maxlen=4)
    history.add(summarize({"a": node("a", {"x.0": load(1, 100)}, at=10.0)}, now=10.5))
    assert history.nodes == {} and history.swarm[-1].tokens_per_s == 0.0  # one record: no rate yet
    history.add(summarize({"a": node("a", {"x.0": load(3, 300)}, at=12.0),
                           "b": node("b", {"x.1": load(1, 50)}, at=12.0)}, now=12.5))
    assert history.nodes["a"][-1].tokens_per_s == 100.0 and history.nodes["a"][-1].calls_per_s == 2.0
    assert "b" not in history.nodes  # first seen now
    # polled again before the next heartbeat: the same records add no point, the rates stand
    history.add(summarize({"a": node("a", {"x.0": load(3, 300)}, at=12.0),
                           "b": node("b", {"x.1": load(1, 50)}, at=12.0)}, now=13.0))
    assert len(history.nodes["a"]) == 1 and history.swarm[-1].tokens_per_s == 100.0
    history.add(summarize({"a": node("a", {"x.0": load(3, 300)}, at=14.0),
                           "b": node("b", {"x.1": load(2, 90, errors=2)}, at=14.0)}, now=14.5))
    assert history.nodes["a"][-1].tokens_per_s == 0.0
    assert history.nodes["b"][-1].tokens_per_s == 20.0 and history.nodes["b"][-1].errors_per_s == 1.0
    assert history.swarm[-1].tokens_per_s == 20.0
    # a restarted node counts from zero again; a departed one is forgotten
    history.add(summarize({"a": node("a", {"x.0": load(1, 40)}, started_at=13.0, at=16.0)}, now=16.5))
    assert history.nodes["a"][-1].tokens_per_s == 20.0 and "b" not in history.nodes
    assert len(history.swarm) == 4  # maxlen
    assert set(history.to_json()) == {"swarm", "nodes"}


def test_records_with_nan_or_a_wild_clock_cannot_break_the_view():
    with pytest.raises(pydantic.ValidationError):
        NodeRecord.model_validate({"node_id": "a", "endpoint": "x:1", "updated_at": float("nan")})
    with pytest.raises(pydantic.ValidationError):
        ExpertLoad.model_validate({"latency_p50_ms": float("inf")})
    twice = NodeRecord(node_id="a", endpoint="x:1", experts=["x.0", "x.0"], load={"x.0": load(1, 10)})
    view = summarize({"a": twice}, now=5.0)
    assert (view.num_experts, view.num_replicated, view.nodes[0].num_experts,
            len(view.experts)) == (1, 0, 1, 1)
    history = ThroughputHistory()
    history.add(summarize({"a": node("a", {"x.0": load(1, 100)}, at=1e-300)}, now=10.0))  # clock far off
    history.add(summarize({"a": node("a", {"x.0": load(2, 1e6)}, at=2e-300)}, now=10.05))
    rate = history.nodes["a"][-1].tokens_per_s
    assert rate == pytest.approx((1e6 - 100) / 0.1)  # the view's time, over at least 0.1 s: finite


def test_an_overflowing_latency_stays_finite_in_the_view_and_its_json():
    """1.7e308 ms over two calls overflowed the call-weighted p50 to inf, and the dashboard's strict JSON
    then failed for everyone. Records read from the DHT no longer carry such numbers
    (dmoe.core.recordrules); the view stays finite even when made from one that does, and json_safe
    keeps anything else from reaching JSON as NaN or Infinity."""
    absurd = node("a", {"x.0": load(1, 10, p50=1.7e308, p99=1.7e308)})
    view = summarize({"a": absurd, "b": node("b", {"x.1": load(1, 10, p50=2.0)})}, now=160.0)
    assert all(math.isfinite(n.latency_p50_ms) for n in view.nodes)
    assert view.nodes[1].latency_p50_ms == 2.0  # the other node as before
    body = json_safe({**view.model_dump(), "x": [float("inf"), -float("inf"), float("nan"), (1.5, "s")]})
    text = json.dumps(body, allow_nan=False)  # what the dashboard sends: strict JSON
    assert json.loads(text)["x"] == [sys.float_info.max, -sys.float_info.max, 0.0, [1.5, "s"]]
    assert json_safe({"n": 3, "s": "inf", "b": True, "none": None}) == {"n": 3, "s": "inf", "b": True,
                                                                         "none": None}
