"""Replica averaging with centered-clip: a hostile replica within the distance bound pulls the blend of
two halfway, and the CenteredClip of four hardly at all; refused replicas are left out."""

from __future__ import annotations

import math

import pytest
import torch

from dmoe.core.robust import centered_clip
from dmoe.node.averaging import blend, blend_robust
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")


def backend():
    return build_backend("ffn.0", NodeConfig(hidden_dim=8, inner_dim=16, optimizer="sgd", lr=0.5), CPU)


def state(b) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in b.module.state_dict().items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).square().sum()) for k in a))


def replicas(ours: dict[str, torch.Tensor]) -> tuple[list[dict], dict]:
    """Two honest replicas (ours plus 2% noise), an in-bound hostile one (3 norms off; the bound is 4)."""
    generator = torch.Generator().manual_seed(0)
    honest = [{k: v + 0.02 * v.norm() / math.sqrt(v.numel()) * torch.randn(v.shape, generator=generator)
               for k, v in ours.items()} for _ in range(2)]
    hostile = {k: v + 3 * v.norm() * torch.ones_like(v) / math.sqrt(v.numel()) for k, v in ours.items()}
    return honest, hostile


def test_a_hostile_replica_pulls_the_blend_halfway_and_the_centered_clip_hardly():
    ours = backend()
    before = state(ours)
    norm = math.sqrt(sum(float(v.square().sum()) for v in before.values()))
    honest, hostile = replicas(before)
    honest_mean = {k: (before[k] + honest[0][k] + honest[1][k]) / 3 for k in before}
    spread = max(distance(h, honest_mean) for h in [before, *honest])

    blend(ours, hostile, max_distance=4.0)  # the mean: half of its offset
    assert distance(state(ours), honest_mean) > 1.4 * norm

    ours = backend()
    assert distance(state(ours), before) == 0  # the same seed: the same start
    median_spread, refused = blend_robust(ours, {"h0": honest[0], "h1": honest[1], "x": hostile}, 4.0)
    assert not refused and 0 < median_spread < 0.1
    after = state(ours)
    assert distance(after, honest_mean) < spread, (distance(after, honest_mean), spread)
    for name, value in after.items():  # each tensor: the CenteredClip of the four
        expected = centered_clip([before[name], honest[0][name], honest[1][name], hostile[name]])
        torch.testing.assert_close(value, expected, msg=name)


def test_refused_replicas_are_left_out():
    ours = backend()
    before = state(ours)
    honest, _ = replicas(before)
    nan = {k: torch.full_like(v, float("nan")) for k, v in before.items()}
    absurd = {k: torch.full_like(v, 1e6) for k, v in before.items()}
    median_spread, refused = blend_robust(ours, {"nan": nan, "absurd": absurd, "h0": honest[0]}, 4.0)
    assert sorted(refused) == ["absurd", "nan"] and "NaN" in str(refused["nan"])
    halfway = {k: (before[k] + honest[0][k]) / 2 for k in before}
    for name, value in state(ours).items():  # one accepted: halfway, as the blend
        torch.testing.assert_close(value, halfway[name], msg=name)
    assert median_spread > 0
    assert blend_robust(ours, {"nan": nan}, 4.0)[0] is None  # none accepted: nothing moves
    for name, value in state(ours).items():
        torch.testing.assert_close(value, halfway[name], rtol=0, atol=0, msg=name)
