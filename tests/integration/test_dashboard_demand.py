"""The coordinator's dashboard shows the trainers' demand and its coverage per expert: a real coordinator
(in this process), a real node (``dmoe node start``) and two trainers' DHT peers publishing their demand
through DemandPublisher; ``/api/demand`` gives per expert of each grid its demand, throughput, replicas
and ratio (null, with ``uncovered``, for demand that no replica serves), and the page, rendered by
headless Chromium, draws the heatmap with the experts that have no replica marked."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from chromium import rendered_page
from swarm_fixtures import NodeProcess, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.coordinator.bootstrap import Coordinator
from dmoe.coordinator.config import CoordinatorConfig
from dmoe.core.demand import DemandPublisher, find_demand
from dmoe.core.dht import DHTPeer

pytestmark = pytest.mark.timeout(120)
# the node hosts the row ffn.0.* of the 2x4 grid ffn, lm0.0-3 of the 6 experts of lm0, and solo.0,
# which is in no trainer's grid; so ffn.1.* and lm0.4, lm0.5 have no replica
HOSTED = ("--experts", "ffn.0.[0:4]", "--experts", "lm0.[0:4]", "--experts", "solo.[0:1]")
NO_REPLICA = ["ffn.1.0", "ffn.1.1", "ffn.1.2", "ffn.1.3", "lm0.4", "lm0.5"]
# tokens routed per expert, flat row-major: ffn.0.1 is hot; ffn.1.2 and lm0.5 are wanted and hosted by nobody
FIRST_FFN = np.array([0, 900, 20, 0, 0, 0, 300, 0])
SECOND_FFN = np.array([0, 100, 0, 0, 0, 0, 0, 0])
FIRST_LM0 = np.array([50, 0, 0, 0, 0, 40])


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())  # json.loads would take NaN and Infinity: checked below


@pytest.fixture(scope="module")
def coordinator() -> Iterator[Coordinator]:
    config = CoordinatorConfig(swarm=SwarmConfig(host="127.0.0.1"), poll_interval=0.2, offer_relay=False)
    with Coordinator(config) as started:
        yield started


@pytest.fixture(scope="module")
def node(coordinator, tmp_path_factory) -> Iterator[NodeProcess]:
    args = ["--swarm", coordinator.swarm_addresses[0], *HOSTED, "--hidden-dim", "8"]
    process = NodeProcess(tmp_path_factory.mktemp("node"), args)
    try:
        yield process.start()
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def trainers(coordinator) -> Iterator[list[DHTPeer]]:
    peers = [DHTPeer(initial_peers=coordinator.swarm_addresses).start() for _ in range(2)]
    yield peers
    for peer in peers:
        peer.shutdown()


def cells_of(page: str) -> dict[str, dict[str, str]]:
    """The heatmap's cells in the rendered page: their attributes, by uid."""
    cells = {}
    for attributes in re.findall(r"<div ([^>]*\bdata-cell=[^>]*)>", page):
        found = dict(re.findall(r'([\w-]+)="([^"]*)"', attributes))
        cells[found["data-cell"]] = found
    return cells


def expected_level(expert: dict) -> str:
    """The colour level the page gives an expert (its LEVELS), from what the API says."""
    if expert["uncovered"]:
        return "none"
    if expert["demand"] <= 0:
        return "idle"
    ratio = expert["ratio"]
    return "low" if ratio <= 0.5 else "ok" if ratio <= 1 else "high" if ratio <= 2 else "over"


def test_dashboard_shows_demand_and_coverage_per_expert(coordinator, node, trainers):
    url = coordinator.dashboard_url
    wait_for(lambda: get_json(url + "api/swarm")["num_experts"] == 9, 30, "the node's experts in the view",
             interval=0.1)
    nothing = get_json(url + "api/demand")  # no trainer published yet: no grid, nothing to cover
    assert (nothing["grids"], nothing["no_replica"], nothing["outside"], nothing["num_trainers"]) == (
        [], [], [], 0)

    first, second = (DemandPublisher(peer, interval=1.0) for peer in trainers)
    first.add("ffn", (2, 4), lambda: FIRST_FFN)
    first.add("lm0", (6,), lambda: FIRST_LM0)
    second.add("ffn", (2, 4), lambda: SECOND_FFN)
    assert first.publish() == 2 and second.publish() == 1
    # what the trainers' records say, as any peer reads them back (float32 rates over the time measured)
    owners = [peer.validator.owner.owner_id for peer in trainers]

    def both_read():
        found = find_demand(trainers[0], ["ffn", "lm0"], 30)
        return set(found["ffn"]) == set(owners) and owners[0] in found["lm0"] and found

    records = wait_for(both_read, 30, "both trainers' records, read back", interval=0.1)
    ffn = [records["ffn"][owner].flat_rates() for owner in owners]
    lm0 = records["lm0"][owners[0]].flat_rates()
    assert ffn[0][1] > 0 and ffn[1][1] > 0 and lm0[5] > 0

    demand = wait_for(lambda: (d := get_json(url + "api/demand"))["num_trainers"] == 2 and d, 30,
                      "both trainers' demand on the dashboard", interval=0.1)
    assert [(g["prefix"], g["shape"], g["num_experts"], g["truncated"]) for g in demand["grids"]] == [
        ("ffn", [2, 4], 8, False), ("lm0", [6], 6, False)]
    grid = {g["prefix"]: {e["uid"]: e for e in g["experts"]} for g in demand["grids"]}
    assert list(grid["ffn"]) == [f"ffn.{i}.{j}" for i in range(2) for j in range(4)]  # flat, row-major
    assert list(grid["lm0"]) == [f"lm0.{i}" for i in range(6)]

    hot = grid["ffn"]["ffn.0.1"]  # both trainers' rates, summed
    assert hot["demand"] == ffn[0][1] + ffn[1][1]
    assert hot["replicas"] == 1 and not hot["uncovered"] and hot["throughput"] > 0
    assert hot["ratio"] == pytest.approx(hot["demand"] / hot["throughput"])
    assert max(e["demand"] for e in grid["ffn"].values()) == hot["demand"]
    assert grid["ffn"]["ffn.0.2"]["demand"] == ffn[0][2] and grid["ffn"]["ffn.0.0"]["demand"] == 0
    assert grid["ffn"]["ffn.0.0"]["ratio"] == 0 and not grid["ffn"]["ffn.0.0"]["uncovered"]
    # demand that no replica serves: an infinite ratio, sent as null and flagged
    unserved = grid["ffn"]["ffn.1.2"]
    assert (unserved["demand"], unserved["replicas"], unserved["throughput"]) == (ffn[0][6], 0, 0)
    assert unserved["ratio"] is None and unserved["uncovered"]
    assert grid["lm0"]["lm0.5"]["ratio"] is None and grid["lm0"]["lm0.5"]["demand"] == lm0[5]
    idle = grid["ffn"]["ffn.1.0"]  # no replica and no demand
    assert (idle["ratio"], idle["uncovered"], idle["demand"]) == (0, True, 0)
    assert demand["no_replica"] == NO_REPLICA
    assert [g["no_replica"] for g in demand["grids"]] == [NO_REPLICA[:4], NO_REPLICA[4:]]
    assert [g["num_unserved"] for g in demand["grids"]] == [1, 1]
    assert demand["grids"][0]["demand"] == pytest.approx(sum(ffn[0]) + sum(ffn[1]), rel=1e-12)
    assert [e["uid"] for e in demand["outside"]] == ["solo.0"] and demand["outside"][0]["replicas"] == 1

    # /api/swarm carries the same coverage (the view's), in strict JSON like /api/demand
    for path in ("api/swarm", "api/demand"):
        with urllib.request.urlopen(url + path, timeout=10) as reply:
            json.loads(reply.read(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))
    view = get_json(url + "api/swarm")
    assert view["grids"] == {"ffn": [2, 4], "lm0": [6]} and view["no_replica"] == NO_REPLICA

    page = rendered_page(url, 2000)
    cells = cells_of(page)
    assert list(cells) == [*grid["ffn"], *grid["lm0"]]  # every expert of both grids, in order
    for uid, expert in {**grid["ffn"], **grid["lm0"]}.items():
        assert cells[uid]["data-level"] == expected_level(expert), uid
        assert cells[uid]["data-replicas"] == str(expert["replicas"])
    assert cells["ffn.1.2"]["class"] == "cell none wanted" and cells["ffn.1.2"]["data-ratio"] == "inf"
    assert cells["ffn.1.0"]["class"] == "cell none" and cells["lm0.5"]["class"] == "cell none wanted"
    assert "background" in cells["ffn.0.1"]["style"] and cells["ffn.0.1"]["class"] == "cell"
    assert "6 experts of the trainers' grids have no replica: " + ", ".join(NO_REPLICA) in page
    assert 'data-grid="ffn"' in page and "grid-template-columns:auto repeat(4, 18px)" in page
    # the table of the most loaded experts: those with demand, the highest ratio first (infinite: first),
    # then the highest demand
    wanted = [e for e in [*grid["ffn"].values(), *grid["lm0"].values()] if e["demand"] > 0]
    by_load = sorted(wanted, key=lambda e: (-np.inf if e["ratio"] is None else -e["ratio"], -e["demand"]))
    assert re.findall(r'data-hot="([^"]+)"', page) == [e["uid"] for e in by_load]
    assert {e["uid"] for e in by_load[:2]} == {"ffn.1.2", "lm0.5"}
