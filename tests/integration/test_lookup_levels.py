"""The vectorised lookup against the loop it replaces, on records read from a real DHT: for the same
gate scores, MoELayer.beam_search over Swarm.live_levels finds the same candidates, each with the same
replicas in the same order, as RemoteMoE's loop over prefixes over Swarm.live_replicas_under, on grids
with missing experts, replicas, two records of one endpoint, an undiallable replica, replicas of
another schema, experts past the grid and deeper than it, and with endpoints backed off and experts
quarantined; and a cold lookup reads the DHT once per grid level, all of that level's keys at once.

Four DHT peers in this process announce the records, each as its own owner (a node's announcement,
without a node behind it: nothing here dials the endpoints)."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

import pytest
import torch
from hivemind.utils import get_dht_time
from swarm_fixtures import wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.dht import DHTPeer
from dmoe.core.modelspec import expert_schema
from dmoe.core.records import ExpertRecord, NodeRecord, store_announcement_async
from dmoe.moe.remote import RemoteMoE

pytestmark = pytest.mark.timeout(180)
OURS, OTHER = expert_schema("ffn", 16, 32), expert_schema("ffn", 8, 32)
GRID, DEEP = (16, 16), (4, 4, 4)
A, B, C = "127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"


def announcements() -> list[tuple[str, list[ExpertRecord]]]:
    """(node id, its expert records) of each of four owners."""
    rng = random.Random(0)
    grid = [(i, j) for i in range(GRID[0]) for j in range(GRID[1])]
    at_a = [c for c in grid if rng.random() < 0.7]
    at_b = [c for c in grid if c[0] < 8 and c != (3, 5) and rng.random() < 0.5]  # replicas, some only at b
    at_c = [c for c in grid if rng.random() < 0.15]  # another schema: some only there
    at_d = at_a[::5]  # a's endpoint again (a node restarted with a new identity) and a's uids

    def expert(node: str, endpoint: str, uid: str, schema: str = OURS, **fields) -> ExpertRecord:
        return ExpertRecord(uid=uid, endpoint=endpoint, node_id=node, expert_schema=schema, **fields)

    def uid(prefix: str, coords) -> str:
        return ".".join([prefix, *map(str, coords)])

    a = [expert("a", A, uid("ffn", c)) for c in at_a]
    a += [expert("a", A, uid("deep", (i, j, k))) for i in range(4) for j in range(4) for k in range(4)
          if rng.random() < 0.6]
    b = [expert("b", B, uid("ffn", c)) for c in at_b]
    # deeper than the grid (b's only record under ffn.3. / 5), and past it
    b += [expert("b", B, "ffn.3.5.1"), expert("b", B, "ffn.2.40")]
    c = [expert("c", C, uid("ffn", c), schema=OTHER) for c in at_c]
    c += [expert("c", C, "ffn.20.1", schema="")]  # past the grid, no schema said
    # d: a's endpoint under another identity, and replicas that cannot be dialled (behind a NAT, no relay)
    d = [expert("d", A, uid("ffn", c)) for c in at_d]
    d += [expert("d", "127.0.0.1:1004", uid("ffn", c), reachable=False) for c in at_b[::3]]
    return [("a", a), ("b", b), ("c", c), ("d", d)]


@pytest.fixture(scope="module")
def peers() -> Iterator[list[DHTPeer]]:
    started: list[DHTPeer] = []
    try:
        started.append(DHTPeer().start())
        for node_id, experts in announcements():
            peer = DHTPeer(initial_peers=started[0].visible_maddrs).start()
            started.append(peer)
            record = NodeRecord(node_id=node_id, endpoint=experts[0].endpoint)
            peer.run(store_announcement_async(peer.node, experts, record, get_dht_time() + 600), 60)
        yield started
    finally:
        for peer in started:
            peer.shutdown()


@pytest.fixture(scope="module")
def swarm(peers) -> Iterator[Swarm]:
    config = SwarmConfig(initial_peers=peers[0].visible_maddrs, cache_ttl=1e6, lookup_timeout=60,
                         ban_base=600, ban_max=600)
    with Swarm(config) as swarm:
        every = {"ffn.": 16, "deep.": 4}
        wait_for(lambda: all(len(swarm.live_replicas_under([key], refresh=True)[key]) >= n
                             for key, n in every.items()), 60, "the announced records")
        rows = [f"ffn.{i}." for i in range(GRID[0])] + [f"deep.{i}.{j}." for i in range(4) for j in range(4)]
        swarm.live_replicas_under(rows, refresh=True)  # everything in the cache, read once
        yield swarm


def prefix_loop(layer: RemoteMoE, scores: list[torch.Tensor]) -> list:
    """The beam search RemoteMoE ran before the vectorised one: a Python loop over the prefixes of each
    level, over live_replicas_under, then one over the candidates (their replicas, one per endpoint)."""
    root, schema = f"{layer.prefix}.", layer.expert_schema
    level = layer.swarm.live_replicas_under([root], schema=schema)[root]
    prefixes: list[tuple[int, ...]] = [(c,) for c in sorted(level) if c < layer.grid[0]]
    records = {(c,): level[c] for c, in prefixes}
    for depth in range(1, len(layer.grid)):
        if not prefixes:
            return []
        with torch.no_grad():
            partial_TP = sum(scores[d][:, [p[d] for p in prefixes]] for d in range(depth))
            beam = partial_TP.topk(min(layer.beam_size, len(prefixes)), dim=-1).indices.unique().tolist()
        chosen = [prefixes[i] for i in beam]
        keys = {p: layer.uid(p) + "." for p in chosen}
        found = layer.swarm.live_replicas_under(list(keys.values()), schema=schema)
        prefixes = [p + (c,) for p in chosen for c in sorted(found[keys[p]]) if c < layer.grid[depth]]
        records = {p + (c,): found[keys[p]][c]
                   for p in chosen for c in found[keys[p]] if c < layer.grid[depth]}
    chosen = []
    for p in prefixes:
        replicas = one_per_endpoint(r for r in records[p] if r.uid == layer.uid(p))
        if replicas:
            chosen.append((p, replicas))
    return chosen


def compare(layer: RemoteMoE, seed: int) -> list:
    """The loop's candidates and the vectorised ones for random scores: the same (and RemoteMoE's own);
    what they are."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_tokens = rng.choice([1, 16, 64])
    layer.beam_size = rng.choice([1, 2, 4])
    with torch.no_grad():
        scores = [gate(torch.randn(num_tokens, layer.in_features)) for gate in layer.gates]
    expected = prefix_loop(layer, scores)
    found = layer.beam_search(scores, layer.beam_size,
                              functools.partial(layer.swarm.live_levels, schema=layer.expert_schema))
    assert list(found) == expected
    assert list(layer.candidates(scores)) == expected
    return expected


def test_the_same_experts_and_replicas_as_the_loop_over_prefixes(swarm):
    torch.manual_seed(0)
    ffn = RemoteMoE(swarm, prefix="ffn", grid=GRID, in_features=8, k=1, expert_schema=OURS)
    any_schema = RemoteMoE(swarm, prefix="ffn", grid=GRID, in_features=8, k=1)
    deep = RemoteMoE(swarm, prefix="deep", grid=DEEP, in_features=8, k=1, expert_schema=OURS)
    found = {name: [compare(layer, seed) for seed in range(12)]
             for name, layer in (("ffn", ffn), ("any", any_schema), ("deep", deep))}
    assert all(found["ffn"]) and all(found["deep"])

    def endpoints(candidates: list) -> set[str]:
        return {r.endpoint for _, replicas in candidates for r in replicas}

    assert set.union(*map(endpoints, found["ffn"])) == {A, B}  # d's undiallable replicas left out
    assert set.union(*map(endpoints, found["any"])) == {A, B, C}  # c's, of another schema, with none
    assert set(swarm.skipped_nodes()) == {"c"}
    # the same with experts quarantined at their first replica (two in each of rows 0 to 3: the other rows
    # are read as prepared, these record by record), then also with a's endpoint backed off
    rows = swarm.live_levels([f"ffn.{i}." for i in range(4)], exact=True, schema=OURS)
    quarantined = [(first.dial_endpoint, first.uid) for level in rows for first, *_ in level.replicas[:2]]
    for endpoint, uid in quarantined:
        swarm.quarantine(endpoint, uid, "told to")
    after = [compare(ffn, seed) for seed in range(12)]
    assert not {(r.dial_endpoint, r.uid) for found in after for _, replicas in found for r in replicas} & set(
        quarantined)
    swarm.report_failure(A)
    for seed in range(12, 24):
        assert A not in endpoints(compare(ffn, seed))
        compare(deep, seed)


def test_live_levels_lay_out_what_live_replicas_under_finds(swarm):
    keys = ["ffn."] + [f"ffn.{i}." for i in range(GRID[0])] + ["deep.", "deep.1.", "deep.1.2.", "none."]
    for schema in (OURS, None):
        found = swarm.live_replicas_under(keys, schema=schema)
        levels = swarm.live_levels(keys, schema=schema)
        assert [level.coords for level in levels] == [sorted(found[key]) for key in keys]
        assert [level.replicas for level in levels] == [[found[key][c] for c in sorted(found[key])]
                                                       for key in keys]
        # the last level: only the expert itself (not one deeper), the first record of each endpoint
        exact = swarm.live_levels(keys, exact=True, schema=schema)
        for key, level in zip(keys, exact):
            experts = {c: one_per_endpoint(r for r in replicas if r.uid == f"{key}{c}")
                       for c, replicas in found[key].items()}
            assert level.coords == sorted(c for c, replicas in experts.items() if replicas)
            assert level.replicas == [experts[c] for c in level.coords]
    non_exact, exact = (swarm.live_levels(["ffn.3."], exact=e)[0] for e in (False, True))
    assert "ffn.3.5.1" in {r.uid for r in non_exact.replicas[non_exact.coords.index(5)]}
    assert 5 not in exact.coords or "ffn.3.5.1" not in {r.uid for r in exact.replicas[exact.coords.index(5)]}


def one_per_endpoint(records) -> list[ExpertRecord]:
    seen, replicas = set(), []
    for record in records:
        if record.dial_endpoint not in seen:
            seen.add(record.dial_endpoint)
            replicas.append(record)
    return replicas


def test_a_cold_lookup_reads_the_dht_once_per_grid_level(peers):
    config = SwarmConfig(initial_peers=peers[0].visible_maddrs, cache_ttl=0, lookup_timeout=60)
    with Swarm(config) as cold:
        layer = RemoteMoE(cold, prefix="deep", grid=DEEP, in_features=8, k=2, expert_schema=OURS)
        read = functools.partial(cold.live_levels, schema=OURS)
        wait_for(lambda: len(layer.beam_search([torch.zeros(1, 4)] * 3, 4, read)) > 0, 60, "the deep grid")
        node = cold.peer.node
        requests: list[list[str]] = []
        get_many = node.get_many

        async def counted(keys, *args, **kwargs):
            requests.append(list(keys))
            return await get_many(keys, *args, **kwargs)

        node.get_many = counted  # this node only: an instance attribute over the method
        with torch.no_grad():
            scores = [gate(torch.randn(64, 8)) for gate in layer.gates]
        found = layer.beam_search(scores, layer.beam_size, read)
        assert len(found) > 0
        # one request per level: the root, then the expanded prefixes of each level, each of them once
        assert len(requests) == len(DEEP) and requests[0] == ["deep."]
        assert all(len(keys) == len(set(keys)) for keys in requests)
        assert [{key.count(".") for key in keys} for keys in requests] == [{1}, {2}, {3}]
        assert len(requests[2]) > 1  # several prefixes, in one request
