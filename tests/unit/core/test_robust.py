"""centered_clip: the mean when every point is within tau, a bounded pull from a far outlier, convergence."""

import pytest
import torch

from dmoe.core.robust import centered_clip, coordinate_median

pytestmark = pytest.mark.timeout(60)


def honest(n: int = 3, dim: int = 1000, spread: float = 0.1, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(dim, generator=generator)
    return [center + spread * torch.randn(dim, generator=generator) for _ in range(n)]


def test_it_is_the_mean_when_all_points_are_within_tau():
    points = honest(4)
    mean = torch.stack(points).mean(0)
    radius = max(float((p - mean).norm()) for p in points)
    torch.testing.assert_close(centered_clip(points, tau=2 * radius), mean)
    # the default tau (the median distance from the coordinate-wise median) lands on the mean too here
    torch.testing.assert_close(centered_clip(points), mean, rtol=0, atol=1e-3 * radius)
    # weights weigh as in a weighted mean
    weighted = (points[0] * 3 + points[1] + points[2] + points[3]) / 6
    torch.testing.assert_close(centered_clip(points, [3, 1, 1, 1], tau=4 * radius), weighted)
    one = points[0].reshape(10, 100)
    assert centered_clip([one]).shape == (10, 100) and torch.equal(centered_clip([one]), one)


@pytest.mark.parametrize("attack", ["scaled", "random"])
def test_one_outlier_of_norm_x1000_has_bounded_influence(attack):
    points = honest(3)
    mean = torch.stack(points).mean(0)
    spread = max(float((p - mean).norm()) for p in points)
    update = points[0] - points[1]
    if attack == "scaled":  # an update sent times -1000
        outlier = points[1] - 1000 * update
    else:  # a random direction of 1000 times an honest update's norm
        direction = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        outlier = mean + 1000 * float(update.norm()) * direction / direction.norm()
    pulled = float((torch.stack([*points, outlier]).mean(0) - mean).norm())
    robust = float((centered_clip([*points, outlier]) - mean).norm())
    assert pulled > 200 * spread  # the plain mean follows the outlier
    assert robust < 0.5 * spread, (robust, spread)  # tau / (n - 1) with tau about the honest spread
    # and a thousand times farther does not pull more
    farther = mean + 1000 * (outlier - mean)
    assert float((centered_clip([*points, farther]) - mean).norm()) < 0.5 * spread


def test_it_converges_to_a_fixed_point_of_the_iteration():
    points = [*honest(5, seed=1), torch.full((1000,), 50.0)]
    tau = 2.0
    v = centered_clip(points, tau=tau, iterations=500, tolerance=0)
    stacked = torch.stack(points)
    distances = (stacked - v).norm(dim=1)
    step = ((stacked - v) * torch.clamp(tau / distances, max=1).unsqueeze(1)).mean(0)
    assert float(step.norm()) < 1e-4 * tau  # v + step == v: converged
    # a few iterations already get close to it, and more never get farther
    errors = [float((centered_clip(points, tau=tau, iterations=k, tolerance=0) - v).norm())
              for k in (1, 5, 20)]
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < 1e-2 * tau, errors


def test_the_start_and_the_median():
    points = [torch.tensor([0.0, 10.0]), torch.tensor([1.0, 0.0]), torch.tensor([5.0, 2.0]),
              torch.tensor([100.0, -3.0])]
    torch.testing.assert_close(coordinate_median(torch.stack(points)), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(coordinate_median(torch.stack(points[:3])), torch.tensor([1.0, 2.0]))
    # tau 0 stays where it started
    torch.testing.assert_close(centered_clip(points, tau=0.0, start=torch.tensor([7.0, 7.0])),
                               torch.tensor([7.0, 7.0]))


def test_bad_arguments_are_refused():
    points = honest(2, dim=4)
    for kwargs, match in [(dict(iterations=0), "iterations"), (dict(relative_tau=0), "relative_tau"),
                          (dict(tau=-1.0), "tau"), (dict(weights=[1.0]), "weights"),
                          (dict(weights=[0.0, 0.0]), "weights"), (dict(weights=[1.0, -1.0]), "weights")]:
        with pytest.raises(ValueError, match=match):
            centered_clip(points, **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        centered_clip([])
    with pytest.raises(ValueError, match="one shape"):
        centered_clip([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="floating"):
        centered_clip([torch.zeros(3, dtype=torch.int64)])
