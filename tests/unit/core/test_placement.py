"""dmoe.core.placement: which uids a joining node picks, which moves a node makes, and that a swarm of
nodes planning on their own converges (every uid hosted, counts within one of even, hot uids with
more replicas) without a move ever leaving a uid with no replica."""

from __future__ import annotations

import math
import random

import pytest

from dmoe.core.placement import Move, Picture, balance, choose, plan_moves

UIDS = tuple(f"ffn.{i}" for i in range(16))


def picture(others: dict[str, list[float]] | None = None, demand: dict[str, float] | None = None,
            uids: tuple[str, ...] = UIDS) -> Picture:
    return Picture(uids=uids, demand=demand or {}, others=others or {})


def swarm_picture(hosting: dict[str, list[str]], own: float, demand: dict[str, float],
                  exclude: str | None = None) -> Picture:
    others: dict[str, list[float]] = {}
    for node, uids in hosting.items():
        if node != exclude:
            for uid in uids:
                others.setdefault(uid, []).append(own)
    return picture(others, demand)


# ---- choosing ---------------------------------------------------------------------------------------
def test_a_node_in_an_empty_swarm_takes_its_budget_of_distinct_uids():
    chosen = choose(picture(), budget=6, own=100.0, rng=random.Random(1))
    assert len(chosen) == 6 and len(set(chosen)) == 6 and set(chosen) <= set(UIDS)


def test_the_budget_is_capped_by_the_model():
    assert sorted(choose(picture(), budget=40, own=100.0)) == sorted(UIDS)


def test_without_demand_it_covers_the_uids_with_fewest_replicas():
    others = {uid: [100.0] for uid in UIDS[:10]}  # 6 uids uncovered, 10 with one replica
    others["ffn.0"] = [100.0, 100.0]
    assert sorted(choose(picture(others), budget=6, own=100.0)) == sorted(UIDS[10:])
    # then the ones with one replica, never ffn.0 (two) before them
    assert "ffn.0" not in choose(picture(others), budget=15, own=100.0)
    assert "ffn.0" in choose(picture(others), budget=16, own=100.0)


def test_with_demand_it_takes_the_uncovered_then_the_worst_covered():
    others = {uid: [100.0] for uid in UIDS}
    del others["ffn.5"]
    demand = {uid: 10.0 for uid in UIDS} | {"ffn.3": 400.0, "ffn.9": 150.0}
    chosen = choose(picture(others, demand), budget=3, own=100.0)
    # ffn.5 has no replica; then ffn.3 (ratio 4), then ffn.9 (1.5): a node hosts a uid once
    assert chosen == ["ffn.5", "ffn.3", "ffn.9"]


def test_a_hot_uid_gets_replicas_in_proportion():
    demand = {uid: 1.0 for uid in UIDS} | {"ffn.0": 1000.0}
    others = {uid: [100.0] for uid in UIDS}
    chosen = choose(picture(others, demand), budget=1, own=100.0)
    assert chosen == ["ffn.0"]


def test_nodes_joining_together_spread_out():
    """Nodes that see the same empty swarm pick at random among equals: they do not all pick the same."""
    picks = [tuple(sorted(choose(picture(), budget=4, own=100.0, rng=random.Random(seed))))
             for seed in range(8)]
    assert len(set(picks)) > 1


# ---- moving -----------------------------------------------------------------------------------------
def test_a_uid_no_node_hosts_is_taken_from_a_replicated_one():
    others = {uid: [100.0] for uid in UIDS if uid not in ("ffn.7", "ffn.1")}
    # this node hosts ffn.0 (also hosted elsewhere) and ffn.1 (only here); ffn.7 has no replica
    moves = plan_moves(picture(others), ["ffn.0", "ffn.1"], own=100.0)
    assert moves == [Move(drop="ffn.0", add="ffn.7", reason="uncovered")]


def test_the_only_replica_is_never_dropped():
    others = {uid: [100.0] for uid in UIDS if uid not in ("ffn.0", "ffn.1", "ffn.7")}
    assert plan_moves(picture(others), ["ffn.0", "ffn.1"], own=100.0, max_moves=4) == []


def test_a_move_for_demand_must_pay_past_the_threshold():
    others = {uid: [100.0] for uid in UIDS}
    demand = {uid: 10.0 for uid in UIDS}
    # this node hosts ffn.0 (cold, replicated: ratio 10/100 once dropped); ffn.4 with demand D has D/100
    for hot, moved in ((100.0, True), (13.4, True), (13.3, False), (12.0, False)):
        plan = plan_moves(picture(others, demand | {"ffn.4": hot}), ["ffn.0"], own=100.0, threshold=0.75)
        assert (10.0 / 100 <= 0.75 * hot / 100) == moved
        assert plan == ([Move(drop="ffn.0", add="ffn.4", reason="demand")] if moved else [])


def test_two_equally_hot_uids_each_get_a_replica_though_the_worst_ratio_stays():
    """Adding a replica to one of two hot uids leaves the swarm's worst ratio where the other holds it:
    the move is still made (and the next one, for the other uid)."""
    others = {uid: [100.0] for uid in UIDS} | {"ffn.0": [100.0, 100.0]}
    demand = {uid: 10.0 for uid in UIDS} | {"ffn.3": 5000.0, "ffn.12": 5000.0}
    plan = plan_moves(picture(others, demand), ["ffn.0", "ffn.1"], own=100.0, max_moves=2,
                      rng=random.Random(0))
    # ffn.0 first (10/200 once dropped, against ffn.1's 10/100), then ffn.1; one hot uid each
    assert [m.drop for m in plan] == ["ffn.0", "ffn.1"], plan
    assert sorted(m.add for m in plan) == ["ffn.12", "ffn.3"], plan
    assert all(m.reason == "demand" for m in plan)


def test_counts_are_evened_out_without_demand():
    others = {uid: [100.0] for uid in UIDS}
    others["ffn.0"] = [100.0, 100.0]  # with this node's: three replicas of ffn.0, one of the rest
    moves = plan_moves(picture(others), ["ffn.0"], own=100.0, rng=random.Random(3))
    assert len(moves) == 1 and moves[0].drop == "ffn.0" and moves[0].reason == "spread"
    # two replicas against one: within one of even, nothing to do
    assert plan_moves(picture({uid: [100.0] for uid in UIDS}), ["ffn.0"], own=100.0) == []


def test_a_spread_move_never_raises_the_worst_ratio():
    others = {uid: [100.0] for uid in UIDS}
    others["ffn.0"] = [100.0, 100.0]
    demand = {"ffn.0": 1000.0}  # ffn.0's three replicas are all needed
    assert plan_moves(picture(others, demand), ["ffn.0"], own=100.0) == []


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        plan_moves(picture(), [], own=1.0, threshold=0.0)


# ---- a swarm of planners ----------------------------------------------------------------------------
def simulate(num_nodes: int, budget: int, demand: dict[str, float], rounds: int, seed: int,
             hosting: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Nodes that all join seeing the same empty swarm (the worst case: none sees another's choice),
    then take turns in random order planning one move each on what the others host; checks after every
    move that no uid lost its last replica."""
    rng = random.Random(seed)
    own = 100.0
    hosting = hosting if hosting is not None else {
        f"n{i}": choose(picture(demand=demand), budget, own, random.Random(seed * 100 + i))
        for i in range(num_nodes)}
    for _ in range(rounds):
        for node in rng.sample(sorted(hosting), len(hosting)):
            hosted_before = {uid for uids in hosting.values() for uid in uids}
            for move in plan_moves(swarm_picture(hosting, own, demand, exclude=node), hosting[node], own,
                                   rng=rng):
                hosting[node] = [move.add if uid == move.drop else uid for uid in hosting[node]]
            assert hosted_before <= {uid for uids in hosting.values() for uid in uids}
    return hosting


def counts(hosting: dict[str, list[str]]) -> dict[str, int]:
    found = dict.fromkeys(UIDS, 0)
    for uids in hosting.values():
        for uid in uids:
            found[uid] += 1
    return found


@pytest.mark.parametrize("seed", range(5))
def test_three_nodes_joining_together_cover_every_uid_within_one_of_even(seed):
    hosting = simulate(num_nodes=3, budget=8, demand={}, rounds=12, seed=seed)
    assert all(len(uids) == 8 == len(set(uids)) for uids in hosting.values())
    found = counts(hosting)
    assert min(found.values()) >= 1 and max(found.values()) - min(found.values()) <= 1, found


@pytest.mark.parametrize("seed", range(5))
def test_skewed_demand_gives_the_hot_uids_more_replicas(seed):
    hot = {"ffn.2": 2000.0, "ffn.11": 2000.0}
    demand = {uid: 5.0 for uid in UIDS} | hot
    hosting = simulate(num_nodes=3, budget=7, demand=demand, rounds=12, seed=seed)
    found = counts(hosting)
    assert min(found.values()) >= 1, found
    cold = [found[uid] for uid in UIDS if uid not in hot]
    assert min(found[uid] for uid in hot) > max(cold), found
    # the hot uids' ratios came down: the worst is a hot one's, at most half of what one replica gives
    quality = balance(swarm_picture(hosting, 100.0, demand))
    assert quality["uncovered"] == 0 and quality["worst"] <= 2000.0 / 200.0


def test_after_a_node_dies_the_survivors_cover_what_it_held():
    hosting = simulate(num_nodes=3, budget=8, demand={}, rounds=12, seed=7)
    del hosting["n0"]
    hosting = simulate(num_nodes=2, budget=8, demand={}, rounds=10, seed=8, hosting=hosting)
    assert counts(hosting) == dict.fromkeys(UIDS, 1)


def test_balance_measures_the_spread_of_ratios():
    even = balance(picture({uid: [100.0] for uid in UIDS}, {uid: 50.0 for uid in UIDS}))
    assert even["worst"] == 0.5 and even["worst_over_mean"] == 1.0 and even["cv"] == 0.0
    skewed = balance(picture({uid: [100.0] for uid in UIDS}, {uid: 50.0 for uid in UIDS} | {"ffn.0": 850.0}))
    assert skewed["worst"] == 8.5 and math.isclose(skewed["mean"], (850 + 15 * 50) / 100 / 16)
    assert balance(picture({}, {"ffn.0": 1.0}))["uncovered"] == 16.0


def test_a_spread_move_never_undoes_a_demand_move():
    """A node hosting w and d, with h hot and replicated twice elsewhere: moving d -> h for demand must not
    be followed by h -> d for spread (then d -> h again, for ever)."""
    state = Picture(uids=("w", "h", "c", "d"), demand={"w": 1000.0, "h": 300.0, "c": 1.0, "d": 1.0},
                    others={"d": [100.0], "h": [100.0, 100.0], "c": [100.0]})
    hosted = {"w", "d"}
    seen = []
    for _ in range(6):
        moves = plan_moves(state, hosted, own=100.0, rng=random.Random(len(seen)))
        if not moves:
            break
        (move,) = moves
        seen.append((move.drop, move.add))
        hosted = (hosted - {move.drop}) | {move.add}
    assert len(seen) <= 1 and all((add, drop) not in seen for drop, add in seen), seen


def test_only_the_designated_node_drops_a_shared_uid():
    others = {uid: [100.0] for uid in UIDS if uid != "ffn.7"}
    assert plan_moves(picture(others), ["ffn.0"], own=100.0) == [Move("ffn.0", "ffn.7", "uncovered")]
    kept = Picture(uids=UIDS, demand={}, others=others, droppable=frozenset())
    assert plan_moves(kept, ["ffn.0"], own=100.0) == []


@pytest.mark.parametrize("seed", range(40))
def test_swarms_of_unequal_nodes_settle(seed):
    """Random swarms (2 to 6 nodes of unequal throughput, uniform, Zipf or hot-spot demand): the nodes,
    moving in turn on what they read, stop moving within a bounded number of rounds."""
    rng = random.Random(seed)
    uids = tuple(f"e.{i}" for i in range(rng.choice([6, 10, 16])))
    kind = rng.choice(["uniform", "zipf", "hot"])
    demand = {uid: (100.0 if kind == "uniform" else 1000.0 / (i + 1) if kind == "zipf"
                    else (5000.0 if i < 2 else 10.0)) for i, uid in enumerate(uids)}
    nodes = [f"n{i}" for i in range(rng.randint(2, 6))]
    budget = {n: rng.randint(2, max(2, len(uids) // 2)) for n in nodes}
    own = {n: rng.choice([50.0, 100.0, 200.0, 400.0]) for n in nodes}
    hosting: dict[str, list[str]] = {}

    def seen_by(node: str) -> Picture:
        others: dict[str, list[float]] = {}
        for other, hosted in hosting.items():
            if other != node:
                for uid in hosted:
                    others.setdefault(uid, []).append(own[other])
        return Picture(uids=uids, demand=demand, others=others)

    for node in nodes:  # joining one after another
        hosting[node] = choose(seen_by(node), budget[node], own[node], random.Random(rng.random()))
    quiet_rounds = 0
    for _ in range(200):
        moved = False
        for node in rng.sample(nodes, len(nodes)):
            for move in plan_moves(seen_by(node), hosting[node], own[node], rng=rng):
                hosting[node] = [move.add if uid == move.drop else uid for uid in hosting[node]]
                moved = True
        quiet_rounds = 0 if moved else quiet_rounds + 1
        if quiet_rounds == 2:
            break
    assert quiet_rounds == 2, f"still moving after 200 rounds: {hosting}"
