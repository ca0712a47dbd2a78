"""Placement by demand: which experts of a model a node hosts, and when it moves one.

The picture a node plans with (:class:`Picture`) is the model's uids, the demand on each (routed
tokens/s, all trainers together: :func:`dmoe.core.demand.total_demand`) and the throughput of each
replica that *other* nodes host (routed tokens/s: :func:`dmoe.core.demand.replica_throughputs`). A
uid's ratio is its demand over its replicas' summed throughput (above 1 the replicas cannot keep up;
infinite for demand and no replica; 0 without demand), as in :func:`dmoe.core.demand.coverage`.

Choosing (:func:`choose`): a node joining with room for ``budget`` experts, each serving ``own``
tokens/s, fills its slots one at a time, each with the uid that most needs it: first the uids no node
hosts (the most demanded first), then the highest ratio, then the fewest replicas; ties are broken at
random, so nodes that join together spread out. With no demand recorded it covers the uids with the
fewest replicas.

Moving (:func:`plan_moves`): a node that hosts some uids may drop one (``drop``) for another
(``add``) when that (a) gives a replica to a uid that has none, or (b) moves throughput from where it is
needed least to where it is needed most: the added uid has the highest ratio of those the node does not
host, the dropped one the lowest ratio once dropped, and that one is at most ``threshold`` of the
other's (0.75: the worse of the two improves by a quarter at least, so that nodes do not move for small
gains; the worst ratio of the swarm never rises), or (c) evens out the replica counts (the dropped uid
has at least two replicas more than the added one) without raising the two uids' ratios (sorted from
the highest); each kind of move lowers a measure that the others do not raise (see :func:`_no_worse`),
so nodes planning on what they read settle instead of moving in circles. It never drops a uid no other
node hosts: no move leaves an expert without a replica. Comparing the pair, not the swarm's worst ratio
alone, lets one node act when several uids are equally overloaded (two hot experts: adding a replica to
one leaves the worst ratio where the other holds it).

:func:`balance` measures a placement: how far the ratios spread (the benchmark's balance quality).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence


def _rate(value: float) -> float:
    return float(value) if math.isfinite(value) and value > 0 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Picture:
    """What a node knows of the swarm when it plans: the model's uids (in order), demand per uid and
    the throughput of each replica on other nodes, per uid."""

    uids: tuple[str, ...]
    demand: Mapping[str, float]
    others: Mapping[str, Sequence[float]]
    # the hosted uids this node may drop (None: any that another node hosts too). Of the nodes that host
    # a uid, one alone may drop it in a round (read_picture names it), so that two never drop it together
    droppable: frozenset[str] | None = None

    def ratio(self, uid: str, throughput: float) -> float:
        wanted = _rate(self.demand.get(uid, 0.0))
        if throughput > 0:
            return wanted / throughput
        return math.inf if wanted > 0 else 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    drop: str
    add: str
    reason: str  # "uncovered", "demand" or "spread"


class _State:
    """Per uid: replicas and throughput with this node's hosted set counted in."""

    def __init__(self, picture: Picture, hosted: Iterable[str], own: float):
        self.picture, self.own = picture, own
        self.hosted = set(hosted)
        self.count = {uid: len(picture.others.get(uid, ())) for uid in picture.uids}
        self.throughput = {uid: sum(_rate(t) for t in picture.others.get(uid, ())) for uid in picture.uids}
        for uid in self.hosted:
            self._add(uid, +1)

    def _add(self, uid: str, sign: int) -> None:
        self.count[uid] = self.count.get(uid, 0) + sign
        self.throughput[uid] = max(0.0, self.throughput.get(uid, 0.0) + sign * self.own)

    def host(self, uid: str) -> None:
        self.hosted.add(uid)
        self._add(uid, +1)

    def unhost(self, uid: str) -> None:
        self.hosted.discard(uid)
        self._add(uid, -1)

    def ratio(self, uid: str) -> float:
        return self.picture.ratio(uid, self.throughput[uid])

    def worst(self) -> float:
        return max((self.ratio(uid) for uid in self.picture.uids), default=0.0)

    def demand(self, uid: str) -> float:
        return _rate(self.picture.demand.get(uid, 0.0))


def choose(picture: Picture, budget: int, own: float, rng: random.Random | None = None) -> list[str]:
    """The uids a joining node hosts: at most ``budget``, each serving ``own`` tokens/s (see the module
    docstring), in the order they were chosen. Ratios in one power of two count as equal (then the
    fewest replicas, then chance decide): measured throughputs are noisy, and a node that copies another's
    set exactly (every ratio a little higher there) may leave nothing that a move could fix."""
    rng = rng or random.Random()
    state = _State(picture, (), own)
    chosen: list[str] = []
    for _ in range(min(budget, len(picture.uids))):
        candidates = [uid for uid in picture.uids if uid not in state.hosted]
        tiebreak = {uid: rng.random() for uid in candidates}
        best = min(candidates, key=lambda uid: (
            state.count[uid] > 0,  # uncovered first
            -state.demand(uid) if state.count[uid] == 0 else -_bucket(state.ratio(uid)),
            state.count[uid], tiebreak[uid]))
        state.host(best)
        chosen.append(best)
    return chosen


def _bucket(ratio: float) -> float:
    """Ratios in one bucket are within a factor of two of each other."""
    if ratio <= 0 or math.isinf(ratio):
        return ratio
    return math.floor(math.log2(ratio))


def plan_moves(picture: Picture, hosted: Iterable[str], own: float, *, threshold: float = 0.75,
               max_moves: int = 1, rng: random.Random | None = None) -> list[Move]:
    """The moves (at most ``max_moves``, each planned on the picture the ones before it leave) that
    this node, hosting ``hosted`` at ``own`` tokens/s each, should make; see the module docstring."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    rng = rng or random.Random()
    state = _State(picture, [uid for uid in hosted if uid in set(picture.uids)], own)
    moves: list[Move] = []
    while len(moves) < max_moves:
        move = _next_move(state, threshold, rng)
        if move is None:
            break
        state.unhost(move.drop)
        state.host(move.add)
        moves.append(move)
    return moves


def _next_move(state: _State, threshold: float, rng: random.Random) -> Move | None:
    # a uid may be dropped only while another node hosts it too (and this node is the one that may)
    allowed = state.picture.droppable
    droppable = [uid for uid in sorted(state.hosted)
                 if state.count[uid] >= 2 and (allowed is None or uid in allowed)]
    addable = [uid for uid in state.picture.uids if uid not in state.hosted]
    if not droppable or not addable:
        return None
    tiebreak = {uid: rng.random() for uid in (*droppable, *addable)}

    def after_drop(uid: str) -> float:
        """The ratio ``uid`` would have once this node dropped it."""
        return state.picture.ratio(uid, max(0.0, state.throughput[uid] - state.own))

    # the replica that hurts least to give up: the lowest ratio after it goes, then the most replicas
    drop = min(droppable, key=lambda uid: (after_drop(uid), -state.count[uid], tiebreak[uid]))
    uncovered = [uid for uid in addable if state.count[uid] == 0]
    if uncovered:
        add = min(uncovered, key=lambda uid: (-state.demand(uid), tiebreak[uid]))
        return Move(drop=drop, add=add, reason="uncovered")
    add = min(addable, key=lambda uid: (-state.ratio(uid), state.count[uid], tiebreak[uid]))
    if state.ratio(add) > 0 and after_drop(drop) <= threshold * state.ratio(add):
        return Move(drop=drop, add=add, reason="demand")
    # evening out the counts: a more replicated uid for a less replicated one (two replicas apart at
    # least), the most replicated first, if the two ratios do not get worse (see _no_worse)
    for drop in sorted(droppable, key=lambda uid: (-state.count[uid], tiebreak[uid])):
        for add in sorted(addable, key=lambda uid: (state.count[uid], tiebreak[uid])):
            if state.count[drop] < state.count[add] + 2:
                break
            added = state.picture.ratio(add, state.throughput[add] + state.own)
            if _no_worse((state.ratio(drop), state.ratio(add)), (after_drop(drop), added)):
                return Move(drop=drop, add=add, reason="spread")
    return None


def _no_worse(before: tuple[float, float], after: tuple[float, float]) -> bool:
    """Whether a move that changes two uids' ratios from ``before`` to ``after`` leaves the swarm's
    ratios, sorted from the highest, no higher (lexicographically). Every move this module makes lowers
    (uncovered experts, sorted ratios, sum of squared replica counts) in that order: a demand move
    lowers the highest of its two ratios, a spread move keeps the ratios no higher and lowers the sum of
    squared counts; so a swarm of nodes planning on what they read never moves in circles."""
    return sorted(after, reverse=True) <= sorted(before, reverse=True)


# ---- measuring a placement -------------------------------------------------------------------------
def balance(picture: Picture) -> dict[str, float]:
    """How well a placement (the picture's ``others``: every replica of the swarm) covers the demand:
    ``uncovered`` (uids with no replica), ``worst`` (the highest ratio), ``mean`` (of the ratios of uids
    with demand), ``worst_over_mean`` (1: perfectly even), ``cv`` (their coefficient of variation: 0 is
    perfectly even), and ``replicas_min``/``replicas_max``. Ratios over uids with demand and a replica."""
    counts = [len(picture.others.get(uid, ())) for uid in picture.uids]
    ratios = [picture.ratio(uid, sum(_rate(t) for t in picture.others.get(uid, ())))
              for uid in picture.uids if _rate(picture.demand.get(uid, 0.0)) > 0]
    finite = [r for r in ratios if math.isfinite(r)]
    mean = statistics.fmean(finite) if finite else 0.0
    return {
        "uncovered": float(sum(1 for c in counts if c == 0)),
        "worst": max(finite, default=0.0),
        "mean": mean,
        "worst_over_mean": max(finite) / mean if finite and mean > 0 else 1.0,
        "cv": statistics.pstdev(finite) / mean if len(finite) > 1 and mean > 0 else 0.0,
        "replicas_min": float(min(counts, default=0)),
        "replicas_max": float(max(counts, default=0)),
    }
