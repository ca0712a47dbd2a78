"""Demand records without a network (dmoe.core.demand): the rates' encoding and its round trip, what
readers refuse from a hostile trainer, the moving average, the coverage math, the gate's count of
routed tokens, and how ``dmoe swarm status --experts`` shows demand and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rich.console import Console

from dmoe.core import records
from dmoe.core.demand import (
    MAX_GRID_EXPERTS,
    MAX_TOKENS_PER_S,
    DemandMeter,
    DemandRecord,
    coverage,
    decode_rates,
    demand_key,
    encode_rates,
    grid_uids,
    replica_throughput,
    replica_throughputs,
    uid_of,
)
from dmoe.core.owner import OwnerKey
from dmoe.core.records import ExpertLoad, NodeRecord
from dmoe.moe.local import LocalMoE
from dmoe.view.status import heatmap, render
from dmoe.view.swarmview import json_safe, summarize

pytestmark = pytest.mark.timeout(60)
OWNER = OwnerKey.generate().owner_id


# ---- encoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [0.0, 0.01, 0.5, 1.0])
def test_rates_round_trip_dense_or_sparse_whichever_is_smaller(fill):
    rng = np.random.default_rng(0)
    rates = np.where(rng.random(4096) < fill, rng.random(4096) * 1e4, 0.0)
    indices, values = encode_rates(rates)
    assert len(indices) + len(values) <= 4096 * 4  # 16 KiB at most for a 64x64 grid
    assert (len(values) == 4096 * 4) == (np.count_nonzero(rates) * 6 >= 4096 * 4)  # dense, or sparse
    np.testing.assert_allclose(decode_rates(4096, indices, values), rates.astype(np.float32), rtol=0)


def test_encoding_clips_what_a_record_may_not_say():
    indices, values = encode_rates(np.array([-5.0, math.nan, math.inf, 2e12, 3.0]))
    assert decode_rates(5, indices, values).tolist() == [0.0, 0.0, MAX_TOKENS_PER_S, MAX_TOKENS_PER_S, 3.0]


def test_record_by_uid_names_grid_coordinates():
    record = DemandRecord.make("ffn", (4, 8), np.eye(1, 32, 8 * 2 + 5).ravel() * 7.5)
    assert record.by_uid() == {"ffn.2.5": 7.5}
    assert uid_of("ffn", (4, 8), 31) == "ffn.3.7"
    assert demand_key("ffn") == "_dmoe.demand.ffn"
    assert grid_uids([record])[:3] == ["ffn.0.0", "ffn.0.1", "ffn.0.2"] and len(grid_uids([record])) == 32


def _raw(**changes) -> dict:
    """A well-formed record's value as a trainer stores it, with ``changes``."""
    value = DemandRecord.make("ffn", (4, 4), np.arange(16.0)).model_dump()
    value["owner"] = OWNER
    return {**value, **changes}


def _f32(*values) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def _u16(*values) -> bytes:
    return np.array(values, dtype="<u2").tobytes()


HOSTILE = {
    "nan": {"indices": _u16(1), "rates": _f32(math.nan)},
    "infinity": {"indices": _u16(1), "rates": _f32(math.inf)},
    "negative": {"indices": _u16(1), "rates": _f32(-1.0)},
    "too many tokens/s": {"indices": _u16(1), "rates": _f32(1e10)},
    "index past the grid": {"indices": _u16(16), "rates": _f32(1.0)},
    "repeated index": {"indices": _u16(3, 3), "rates": _f32(1.0, 1.0)},
    "decreasing indices": {"indices": _u16(5, 3), "rates": _f32(1.0, 1.0)},
    "more indices than rates": {"indices": _u16(1, 2), "rates": _f32(1.0)},
    "dense, wrong length": {"indices": b"", "rates": _f32(*range(15))},
    "dense, too long": {"indices": b"", "rates": _f32(*range(17))},
    "torn float": {"rates": b"\x00" * 63},
    "torn index": {"indices": b"\x00", "rates": _f32(1.0)},
    "huge grid": {"grid": [MAX_GRID_EXPERTS, 2], "indices": _u16(0), "rates": _f32(1.0)},
    "empty grid": {"grid": [], "indices": b"", "rates": b""},
    "zero-size dimension": {"grid": [4, 0], "indices": b"", "rates": b""},
    "prefix is no prefix": {"prefix": "ffn.3"},
    "prefix with a newline": {"prefix": "ffn\n"},
    "rates not bytes": {"rates": [1.0] * 16},
    "updated_at not finite": {"updated_at": math.inf},
}


@pytest.mark.parametrize("changes", HOSTILE.values(), ids=HOSTILE.keys())
def test_readers_refuse_hostile_values(changes):
    assert records._parse(DemandRecord, _raw()) is not None  # the same record, unchanged, is read
    assert records._parse(DemandRecord, _raw(**changes)) is None


def test_readers_take_only_owned_records_under_their_prefix():
    class Entry:
        def __init__(self, value, expiration):
            self.value, self.expiration_time = value, expiration

    from hivemind.utils import get_dht_time

    now = get_dht_time()
    other = OwnerKey.generate().owner_id
    found = records._owned_records({
        f"@ed25519:{OWNER}": Entry(_raw(), now + 100),
        f"@ed25519:{other}": Entry(_raw(), now + 100),  # names OWNER in its value, filed under other
        "plain": Entry(_raw(), now + 100),
        f"@ed25519:{OWNER[:-1]}{'B' if OWNER.endswith('A') else 'A'}":  # another owner, not OWNER itself
            Entry(_raw(), now + 1e6),  # pinned far in the future
    }, DemandRecord, now)
    assert [(name, r.owner) for name, r, _ in found] == [("", OWNER)]


# ---- the moving average --------------------------------------------------------------------------
def test_meter_reads_a_steady_rate_from_the_first_update():
    meter = DemandMeter(3, time_constant=60.0, now=0.0)
    rates = meter.update(np.array([100, 0, 30]), now=10.0)
    np.testing.assert_allclose(rates, [10.0, 0.0, 3.0])
    np.testing.assert_allclose(meter.update(np.array([200, 0, 60]), now=20.0), [10.0, 0.0, 3.0])


def test_meter_follows_a_change_with_its_time_constant_whatever_the_update_rate():
    def run(step: float) -> float:
        meter = DemandMeter(1, time_constant=30.0, now=0.0)
        count, t = 0.0, 0.0
        while t < 600 - 1e-9:  # 10 minutes at 10 tokens/s: the average is settled
            t += step
            count += 10 * step
            meter.update(np.array([round(count)]), now=t)
        while t < 630 - 1e-9:  # then one time constant at 0 tokens/s
            t += step
            meter.update(np.array([round(count)]), now=t)
        return float(meter.rates()[0])

    for step in (1.0, 5.0, 15.0):
        assert run(step) == pytest.approx(10 * math.exp(-1), rel=1e-3)


def test_meter_ignores_counts_that_go_back_and_time_that_does_not_pass():
    meter = DemandMeter(2, now=0.0)
    meter.update(np.array([50, 50]), now=5.0)
    before = meter.rates().copy()
    np.testing.assert_array_equal(meter.update(np.array([60, 60]), now=5.0), before)
    assert (meter.update(np.array([0, 0]), now=10.0) >= 0).all()


def test_publisher_and_train_config_refuse_intervals_records_do_not_outlive():
    from dmoe.client.config import SwarmConfig
    from dmoe.core.demand import MAX_INTERVAL, DemandPublisher
    from dmoe.errors import ConfigError
    from dmoe.lm.config import TrainConfig

    peer = object()  # never used: the checks come first
    for interval, ttl in ((0.0, 150.0), (MAX_INTERVAL * 2, 590.0), (130.0, 150.0), (30.0, 700.0)):
        with pytest.raises(ValueError, match="interval"):
            DemandPublisher(peer, interval=interval, ttl=ttl)  # type: ignore[arg-type]
    assert DemandPublisher(peer, interval=MAX_INTERVAL).ttl == 150.0  # type: ignore[arg-type]
    swarm = SwarmConfig(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmX"])
    with pytest.raises(ConfigError, match="demand_interval"):
        TrainConfig(swarm=swarm, demand_interval=121.0)
    assert TrainConfig(swarm=swarm).publish_demand and TrainConfig(swarm=swarm).demand_interval == 30.0


# ---- coverage ------------------------------------------------------------------------------------
def test_coverage_ratio_of_demand_to_replica_throughput():
    found = coverage({"a.0": 100.0, "a.1": 50.0, "a.2": 10.0, "a.4": 0.0},
                     {"a.0": [40.0, 60.0], "a.1": [200.0], "a.3": [10.0]}, uids=["a.4", "a.5"])
    assert list(found) == ["a.0", "a.1", "a.2", "a.3", "a.4", "a.5"]
    assert (found["a.0"].throughput, found["a.0"].num_replicas, found["a.0"].ratio) == (100.0, 2, 1.0)
    assert found["a.1"].ratio == 0.25
    assert found["a.2"].ratio == math.inf and found["a.2"].uncovered  # demand, no replica
    assert found["a.3"].ratio == 0.0 and not found["a.3"].uncovered  # a replica, no demand
    assert found["a.5"].uncovered and found["a.5"].ratio == 0.0


def test_coverage_counts_hostile_numbers_as_zero():
    found = coverage({"a.0": math.nan, "a.1": -5.0}, {"a.0": [math.inf, 10.0], "a.1": [-3.0]})
    assert (found["a.0"].demand, found["a.0"].throughput) == (0.0, 10.0)
    assert (found["a.1"].throughput, found["a.1"].ratio, found["a.1"].num_replicas) == (0.0, 0.0, 1)


def test_replica_throughput_from_published_load():
    # 100 forward and 100 backward calls of 32 tokens each, 20 ms each: 1600 tokens/s served, and a
    # routed token costs a forward and a backward
    assert replica_throughput(100, 100, 6400, 20.0) == pytest.approx(800.0)
    assert replica_throughput(100, 0, 3200, 20.0) == pytest.approx(1600.0)  # inference only
    assert replica_throughput(0, 0, 0, 0.0) is None


def test_replica_throughputs_count_unmeasured_replicas_as_the_median():
    def node(node_id, experts, load):
        return NodeRecord(node_id=node_id, endpoint="127.0.0.1:1", experts=experts, load=load)

    measured = ExpertLoad(forward_calls=10, backward_calls=0, tokens=100, latency_p50_ms=10.0)  # 1000 tok/s
    nodes = {"n1": node("n1", ["a.0", "a.1"], {"a.0": measured}), "n2": node("n2", ["a.0"], {})}
    assert replica_throughputs(nodes) == {"a.0": [1000.0, 1000.0], "a.1": [1000.0]}
    assert replica_throughputs(nodes, default=5.0)["a.1"] == [5.0]


# ---- the gate's count ----------------------------------------------------------------------------
def test_gate_counts_tokens_routed_per_grid_expert():
    torch.manual_seed(0)
    layer = LocalMoE(prefix="ffn", grid=(3, 4), in_features=8, k=2, inner_dim=8, hedge=1)
    x = torch.randn(50, 8)
    layer(x)
    uids, experts_TK = layer.last_routing
    expected = np.zeros(12, dtype=np.int64)
    for e in experts_TK[:, :2].flatten().tolist():  # the top-k, not the hedged spare
        expected[[uid_of("ffn", (3, 4), i) for i in range(12)].index(uids[e])] += 1
    np.testing.assert_array_equal(layer.routed_counts(), expected)
    assert layer.routed_counts().sum() == 100
    layer(x)
    np.testing.assert_array_equal(layer.routed_counts(), 2 * expected)


def test_switch_routing_does_not_count_dropped_tokens():
    layer = LocalMoE(prefix="ffn", grid=(4,), in_features=8, k=1, inner_dim=8, routing="switch",
                     capacity_factor=0.5)
    layer(torch.randn(40, 8))
    assert layer.routed_counts().sum() == int((layer.last_routing[1] >= 0).sum()) <= 20


# ---- the view ------------------------------------------------------------------------------------
def _node(node_id: str, experts: list[str]) -> NodeRecord:
    load = ExpertLoad(forward_calls=10, backward_calls=10, tokens=200, latency_p50_ms=10.0)  # 500 tok/s
    return NodeRecord(node_id=node_id, endpoint="127.0.0.1:1", experts=experts,
                      load={uid: load for uid in experts})


def _demand_view():
    rates = np.zeros(8)
    rates[[0, 1, 5]] = [250.0, 2000.0, 100.0]  # ffn.0.0 half covered, ffn.0.1 overloaded, ffn.1.1 none
    trainers = {"ffn": {"t1": DemandRecord.make("ffn", (2, 4), rates).model_copy(update={"owner": "t1"}),
                        "t2": DemandRecord.make("ffn", (2, 4), rates).model_copy(update={"owner": "t2"})}}
    nodes = {"n1": _node("n1", ["ffn.0.0", "ffn.0.1", "ffn.0.2"]), "n2": _node("n2", ["ffn.0.0"])}
    return summarize(nodes, now=1000.0, demand=trainers)


def test_view_sums_trainers_and_lists_experts_without_replica():
    view = _demand_view()
    assert view.num_trainers == 2 and view.grids == {"ffn": [2, 4]}
    by_uid = {c.uid: c for c in view.coverage}
    assert len(by_uid) == 8
    first = by_uid["ffn.0.0"]
    assert (first.demand, first.throughput, first.ratio) == (500, 1000, 0.5)
    assert by_uid["ffn.0.1"].ratio == 8.0
    assert by_uid["ffn.1.1"].ratio is None  # demand, no replica
    assert view.no_replica == ["ffn.0.3", "ffn.1.0", "ffn.1.1", "ffn.1.2", "ffn.1.3"]
    assert json_safe(view.model_dump()) == view.model_dump()  # finite: JSON as it is
    assert summarize({"n1": _node("n1", ["ffn.0.0"])}).coverage == []  # no demand read: nothing said


def test_status_shows_demand_coverage_and_a_heatmap():
    view = _demand_view()
    assert heatmap(view, "ffn").plain == "░█·X\nXXXX\n"
    console = Console(record=True, width=200)
    render(view, console, experts=True)
    text = console.export_text()
    assert "demand tok/s" in text and "ratio" in text
    row = next(line for line in text.splitlines() if "ffn.1.1" in line and "NONE" in line)
    assert "200" in row and "inf" in row
    assert "ffn 2x4: demand / throughput per expert" in text and "\nXXXX\n" in text
    assert "5 expert(s) of the trainers' grids have no replica: ffn.0.3, ffn.1.0" in text


def test_status_without_demand_says_so():
    console = Console(record=True, width=200)
    render(summarize({"n1": _node("n1", ["ffn.0.0"])}, demand={}), console, experts=True)
    text = console.export_text()
    assert "demand tok/s" not in text and "no trainer publishes its demand" in text
