"""check_contribution: the guard on tensors a peer offers to average with or to replace ours: the
trainers' averaging (:mod:`dmoe.lm.averaging`) and the nodes' replica averaging (``dmoe.node.averaging``)
use the same rules.

A contribution is refused whole unless every tensor has the same name (or position), shape and dtype as
ours, holds only finite values, and, for floating-point tensors, lies within ``max_distance`` x
max(|ours|, s * sqrt(numel)) of ours in L2, where s is the root-mean-square of all our floating-point
tensors together (a floor, so that a tensor that is zero at initialisation does not refuse every change).
Honest averages land 0.7-1 of that scale apart, another initialisation about 1.4; the default bound 4
refuses NaN, Inf and absurd values while bounding what a peer can do unseen. It does not detect
plausible wrong values inside the bound, and it sees a result, not the contributions: one peer of four
moves a plain mean by up to the bound unseen (its update times -1000 passes whenever updates are under
~1.6% of the parameters' norm, as they are late in training). The robust aggregate
(:func:`dmoe.core.robust.centered_clip`, ``--average-aggregate centered-clip``) bounds that pull.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

MAX_RELATIVE_DISTANCE = 4.0  # the guard's default bound (see the module docstring)
MIN_SCALE = 1e-3  # the smallest root-mean-square scale a tensor's distance is measured on


class Refused(ValueError):
    """A peer's contribution that the guard refuses: not finite, of the wrong shape or dtype, or
    absurdly far from the local state. Nothing of it was applied."""


Tensors = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def check_contribution(ours: Tensors, theirs: Tensors, *, max_distance: float = MAX_RELATIVE_DISTANCE
                       ) -> float:
    """Raise :class:`Refused` unless ``theirs`` (a peer's tensors, or a result computed with them)
    may replace or be averaged into ``ours``: the same names (mappings) or count (sequences), and
    for each tensor the same shape and dtype, finite values, and for floating-point tensors a
    relative L2 distance of at most ``max_distance`` (see the module docstring). Returns the
    spread: ``|theirs - ours| / |ours|`` over all the floating-point tensors together."""
    if not max_distance > 0:
        raise ValueError(f"max_distance must be positive, got {max_distance}")
    pairs = _pairs(ours, theirs)
    floating = [(name, a, b) for name, a, b in pairs if a.is_floating_point()]
    total_sq = sum(float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2 for _, a, _ in floating)
    total_numel = sum(a.numel() for _, a, _ in floating)
    scale = max(math.sqrt(total_sq / total_numel) if total_numel else 0.0, MIN_SCALE)
    distance_sq = 0.0
    for name, a, b in floating:
        if not bool(torch.isfinite(b).all()):
            raise Refused(f"{name} holds NaN or Inf")
        distance = float(torch.linalg.vector_norm(b.to(a.device) - a, dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(a, dtype=torch.float64))
        reference = max(norm, scale * math.sqrt(a.numel()))
        if not distance <= max_distance * reference:
            raise Refused(f"{name} is {distance / reference:.3g} times its norm away from ours "
                          f"(the bound is {max_distance:g})")
        distance_sq += distance * distance
    return math.sqrt(distance_sq) / max(math.sqrt(total_sq), MIN_SCALE)


def _pairs(ours: Tensors, theirs: Tensors) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, ours, theirs) for each tensor, once their names or count, shapes and dtypes agree."""
    if isinstance(ours, Mapping):
        if not isinstance(theirs, Mapping):
            raise Refused("expected named tensors")
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise Refused(f"other tensors: missing {missing[:3]}, unexpected {extra[:3]}")
        pairs = [(name, ours[name], theirs[name]) for name in ours]
    else:
        if isinstance(theirs, Mapping):
            raise Refused("expected a sequence of tensors")
        theirs = list(theirs)
        if len(theirs) != len(ours):
            raise Refused(f"{len(theirs)} tensors instead of {len(ours)}")
        pairs = [(f"tensor {i}", a, b) for i, (a, b) in enumerate(zip(ours, theirs))]
    for name, a, b in pairs:
        if not isinstance(b, torch.Tensor):
            raise Refused(f"{name} is not a tensor")
        if b.shape != a.shape or b.dtype != a.dtype:
            raise Refused(f"{name} is {b.dtype} {list(b.shape)}, ours {a.dtype} {list(a.shape)}")
    return pairs
