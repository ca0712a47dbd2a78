"""MoELayer.beam_search (one read per grid level, on tensors) chooses what RemoteMoE's beam search chose
before it: the same candidates, in the same order, from the same reads, for the same gate scores.

The grids here are sets of live experts (coordinate tuples), some missing, some past the grid's sizes
and some deeper than the grid (a longer uid under the same prefix); a level is read from them as
:meth:`dmoe.client.swarm.Swarm.live_levels` lays it out. The reference is the beam search RemoteMoE ran
per prefix, written against the same reads. What a Swarm reads from the DHT (replicas, health, schema)
is compared in tests/integration/test_lookup_levels.py.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dmoe.moe.gating import Candidates, MoELayer
from dmoe.moe.local import LocalMoE

pytestmark = pytest.mark.timeout(60)


class Grid:
    """Live experts (coordinate tuples) under ``prefix``, read a level at a time; ``reads`` records the
    keys of each read."""

    def __init__(self, prefix: str, live: set[tuple[int, ...]]):
        self.prefix, self.live = prefix, live
        self.reads: list[list[str]] = []

    def key(self, coords: tuple[int, ...]) -> str:
        return ".".join([self.prefix, *map(str, coords), ""])

    def under(self, key: str) -> dict[int, list[tuple[int, ...]]]:
        """Every live expert under ``key``, by its next coordinate (any depth below)."""
        depth = key.count(".") - 1
        found: dict[int, list[tuple[int, ...]]] = {}
        for expert in sorted(self.live):
            if len(expert) > depth and self.key(expert[:depth]) == key:
                found.setdefault(expert[depth], []).append(expert)
        return found

    def read(self, keys: list[str], *, exact: bool) -> list[tuple[list[int], list[str]]]:
        """As Swarm.live_levels: per key, the sorted coordinates and a handle for each (here, the uid of
        the expert; with ``exact``, only coordinates that are experts themselves)."""
        self.reads.append(list(keys))
        levels = []
        for key in keys:
            found = self.under(key)
            coords = sorted(c for c, experts in found.items()
                            if not exact or any(self.key(e)[:-1] == f"{key}{c}" for e in experts))
            levels.append((coords, [f"{key}{c}" for c in coords]))
        return levels


def reference(layer: MoELayer, grid: Grid, scores: list[torch.Tensor], beam_size: int) -> list:
    """RemoteMoE.candidates as it was: a Python loop over prefixes, a dict per level."""
    def live_under(keys: list[str]) -> dict[str, dict[int, list[tuple[int, ...]]]]:
        grid.reads.append(list(keys))
        return {key: grid.under(key) for key in keys}

    root = f"{layer.prefix}."
    level = live_under([root])[root]
    prefixes: list[tuple[int, ...]] = [(c,) for c in sorted(level) if c < layer.grid[0]]
    records = {(c,): level[c] for c, in prefixes}
    for depth in range(1, len(layer.grid)):
        if not prefixes:
            return []
        with torch.no_grad():
            partial_TP = sum(scores[d][:, [p[d] for p in prefixes]] for d in range(depth))
            beam = partial_TP.topk(min(beam_size, len(prefixes)), dim=-1).indices.unique().tolist()
        chosen = [prefixes[i] for i in beam]
        keys = {p: layer.uid(p) + "." for p in chosen}
        found = live_under(list(keys.values()))
        prefixes = [p + (c,) for p in chosen for c in sorted(found[keys[p]]) if c < layer.grid[depth]]
        records = {p + (c,): found[keys[p]][c]
                   for p in chosen for c in found[keys[p]] if c < layer.grid[depth]}
    return [(p, layer.uid(p)) for p in prefixes if any(e == p for e in records[p])]


def random_grid(rng: random.Random, prefix: str, sizes: tuple[int, ...], alive: float) -> Grid:
    live = {c for c in itertools.product(*(range(s) for s in sizes)) if rng.random() < alive}
    for _ in range(3):  # experts past the grid's sizes, and deeper ones under the same prefix
        c = [rng.randrange(s) for s in sizes]
        c[rng.randrange(len(sizes))] += max(sizes)
        live.add(tuple(c))
        live.add((*[rng.randrange(s) for s in sizes], rng.randrange(4)))
    return Grid(prefix, live)


def layer_for(sizes: tuple[int, ...], k: int = 2) -> MoELayer:
    return MoELayer(prefix="ffn", grid=sizes, in_features=8, k=k)


def compare(sizes: tuple[int, ...], grid: Grid, scores: list[torch.Tensor], beam_size: int) -> Candidates:
    layer = layer_for(sizes)
    expected = reference(layer, grid, scores, beam_size)
    expected_reads, grid.reads = grid.reads, []
    found = layer.beam_search(scores, beam_size, grid.read)
    assert list(found) == expected
    # the same keys, one read per level, in the same order (the loop also asked for no key at all when
    # no token had a beam, which reads nothing)
    assert grid.reads == [keys for keys in expected_reads if keys]
    assert found.handles == [handle for _, handle in expected]
    assert found.coords_CL.tolist() == [list(coords) for coords, _ in expected]
    assert list(found.uids) == [layer.uid(coords) for coords, _ in expected]
    return found


@pytest.mark.parametrize("sizes", [(16,), (8, 8), (16, 4), (4, 5, 6), (3, 3, 3, 3)])
def test_the_same_candidates_as_the_loop_over_prefixes_on_random_scores(sizes):
    rng = random.Random(sum(sizes))
    for trial in range(20):
        grid = random_grid(rng, "ffn", sizes, alive=rng.choice([1.0, 0.8, 0.3]))
        torch.manual_seed(trial)
        num_tokens = rng.choice([1, 7, 64])
        scores = [torch.randn(num_tokens, size) for size in sizes]
        compare(sizes, grid, scores, beam_size=rng.choice([1, 2, 4, 8]))


@pytest.mark.parametrize("sizes", [(8, 8), (4, 4, 4)])
def test_ties_break_alike(sizes):
    """Scores of a few integer values: many prefixes tie for a token's beam, and topk picks among them
    from the same sums, in the same order."""
    rng = random.Random(7)
    for trial in range(10):
        grid = random_grid(rng, "ffn", sizes, alive=0.7)
        torch.manual_seed(trial)
        scores = [torch.randint(0, 3, (32, size)).float() for size in sizes]
        compare(sizes, grid, scores, beam_size=2)


def test_an_empty_grid_a_lone_expert_and_no_tokens():
    sizes = (8, 8)
    scores = [torch.randn(5, 8), torch.randn(5, 8)]
    assert len(compare(sizes, Grid("ffn", set()), scores, beam_size=4)) == 0
    assert len(compare(sizes, Grid("ffn", {(9, 1), (1, 9)}), scores, beam_size=4)) == 0  # all past the grid
    assert list(compare(sizes, Grid("ffn", {(3, 5)}), scores, beam_size=4)) == [((3, 5), "ffn.3.5")]
    assert len(compare(sizes, Grid("ffn", {(3, 5, 1)}), scores, beam_size=4)) == 0  # deeper: not an expert
    no_tokens = [torch.randn(0, 8), torch.randn(0, 8)]
    assert len(compare(sizes, Grid("ffn", {(3, 5), (4, 1)}), no_tokens, beam_size=4)) == 0


def test_a_full_grid_expands_every_token_s_beam():
    """On a full 64 x 64 grid, 256 tokens with beams of 4 expand every row they prefer: the candidates
    are exactly the rows in some token's top 4, each whole."""
    sizes = (64, 64)
    grid = Grid("ffn", set(itertools.product(range(64), range(64))))
    torch.manual_seed(0)
    scores = [torch.randn(256, 64), torch.randn(256, 64)]
    found = compare(sizes, grid, scores, beam_size=4)
    rows = set(scores[0].topk(4, dim=-1).indices.flatten().tolist())
    assert len(found) == 64 * len(rows)
    assert set(found.coords_CL[:, 0].tolist()) == rows


class BeamLocalMoE(LocalMoE):
    """A LocalMoE whose candidates come from the beam search over its own (full) grid."""

    def candidates(self, scores):
        experts = dict(zip(self.coords, self.experts))

        def read(keys, *, exact):
            levels = []
            for key in keys:
                p = tuple(int(c) for c in key.split(".")[1:-1])
                coords = sorted({c[len(p)] for c in experts if c[:len(p)] == p})
                levels.append((coords, [experts.get((*p, c)) for c in coords]))
            return levels

        return self.beam_search(scores, beam_size=self.grid[-1] * 4, read=read)


def test_a_forward_through_beam_candidates_is_the_forward_through_a_list():
    """MoELayer.forward reads a beam search's coordinates and uids from its tensors: the same output,
    routing, losses and routed counts as from the list of pairs (with a beam that keeps every expert)."""
    torch.manual_seed(0)
    plain = LocalMoE(prefix="ffn", grid=(4, 4), in_features=8, k=2, inner_dim=16)
    beam = BeamLocalMoE(prefix="ffn", grid=(4, 4), in_features=8, k=2, inner_dim=16)
    beam.load_state_dict(plain.state_dict())
    x = torch.randn(20, 8)
    torch.testing.assert_close(beam(x), plain(x))
    torch.testing.assert_close(beam.aux_loss, plain.aux_loss)
    torch.testing.assert_close(beam.z_loss, plain.z_loss)
    assert list(beam.last_routing[0]) == plain.last_routing[0]
    assert torch.equal(beam.last_routing[1], plain.last_routing[1])
    assert torch.equal(beam.routed_tokens, plain.routed_tokens)
