"""centered_clip: a robust aggregate of peers' tensors (CenteredClip, as in BTARD: Gorbunov et al., "Secure
Distributed Training at Scale", 2022), used instead of the plain mean by the trainers' averaging
(:mod:`dmoe.lm.averaging`, per all-reduce part) and the nodes' replica averaging (``dmoe.node.averaging``).

From a starting point ``v`` (by default the coordinate-wise median of the points), repeat::

    v <- v + sum_i w_i * (x_i - v) * min(1, tau / |x_i - v|) / sum_i w_i

until a step is shorter than ``tolerance * tau`` or after ``iterations`` steps. A point within ``tau`` of
``v`` counts as in the mean; a farther one pulls by ``tau`` at most, whatever its norm. When every point
lies within ``tau`` of the result, the result is the (weighted) mean; one outlier of n points moves it by
about ``tau / (n - 1)`` at most, however far it is.

``tau``: a fixed value is fragile (the scale of the peers' differences changes with the learning rate, the
phase of training, and the size of the part), so by default it is relative: ``relative_tau`` times the
median distance of the points from the starting point, measured anew for every call (every part). With
fewer than half of the points hostile, the median distance is an honest one.

The configs name it ``centered-clip`` (:data:`dmoe.core.aggregates.AGGREGATES`, which imports no torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_RELATIVE_TAU = 1.0  # tau = this x the median distance of the points from the starting point
DEFAULT_ITERATIONS = 20
DEFAULT_TOLERANCE = 1e-4  # stop once a step is shorter than this x tau


def coordinate_median(points: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of ``points`` (stacked on dim 0); for an even count, the mean of the
    two middle values."""
    ordered = points.sort(dim=0).values
    n = points.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def centered_clip(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                  tau: float | None = None, relative_tau: float = DEFAULT_RELATIVE_TAU,
                  iterations: int = DEFAULT_ITERATIONS, tolerance: float = DEFAULT_TOLERANCE,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """The CenteredClip aggregate of ``tensors`` (same shape, floating point), see the module docstring.
    ``weights``: non-negative, not all zero (default: equal). ``tau``: the clipping radius; None:
    ``relative_tau`` x the median distance of the points from ``start``. ``start``: default the
    coordinate-wise median. Returns a new tensor of the tensors' shape and dtype."""
    if not tensors:
        raise ValueError("centered_clip needs at least one tensor")
    if iterations < 1 or relative_tau <= 0 or tolerance < 0 or (tau is not None and tau < 0):
        raise ValueError("need iterations >= 1, relative_tau > 0, tolerance >= 0 and tau >= 0")
    shape, dtype = tensors[0].shape, tensors[0].dtype
    if not dtype.is_floating_point or any(t.shape != shape or t.dtype != dtype for t in tensors):
        raise ValueError("centered_clip needs floating-point tensors of one shape and dtype")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    points = torch.stack([t.detach().reshape(-1).to(work) for t in tensors])  # [n, numel]
    if weights is None:
        w = torch.ones(len(tensors), dtype=work)
    else:
        w = torch.as_tensor(list(weights), dtype=work)
        if w.shape != (len(tensors),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) \
                or not float(w.sum()) > 0:
            raise ValueError("weights must be one finite non-negative number per tensor, not all zero")
    w = w / w.sum()
    v = coordinate_median(points) if start is None else start.detach().reshape(-1).to(work).clone()
    if tau is None:
        tau = relative_tau * float(torch.linalg.vector_norm(points - v, dim=1).median())
    for _ in range(iterations):
        diffs = points - v
        distances = torch.linalg.vector_norm(diffs, dim=1)
        scale = torch.where(distances > tau, tau / distances.clamp_min(torch.finfo(work).tiny),
                            torch.ones_like(distances))
        step = (w * scale) @ diffs
        v += step
        if float(torch.linalg.vector_norm(step)) <= tolerance * tau:
            break
    return v.to(dtype).reshape(shape)
