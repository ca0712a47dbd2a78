"""The averaging guard: what a peer sends is refused unless finite, of our shapes, and within the bound."""

import math

import pytest
import torch

from dmoe.core.contribution import MAX_RELATIVE_DISTANCE, Refused, check_contribution

pytestmark = pytest.mark.timeout(60)


def params(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(64, 32)
    torch.nn.init.zeros_(layer.bias)
    return {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone(),
            "norm": torch.ones(32), "steps": torch.tensor(7)}


def test_an_honest_average_is_accepted_and_its_spread_measured():
    ours, other = params(0), params(1)
    assert check_contribution(ours, ours) == 0.0
    average = {k: (v + other[k]) / 2 if v.is_floating_point() else v for k, v in ours.items()}
    # two independent inits are about sqrt(2) apart in relative distance; their average half that
    floating = ("weight", "bias", "norm")
    expected = math.sqrt(sum(float((average[k] - ours[k]).square().sum()) for k in floating))
    expected /= math.sqrt(sum(float(ours[k].square().sum()) for k in floating))
    spread = check_contribution(ours, average)
    assert spread == pytest.approx(expected, rel=1e-6) and 0.05 < spread < 1
    # the whole of another init (a trainer catching up with a run that started elsewhere) passes too
    assert check_contribution(ours, other) > spread


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_a_single_non_finite_value_refuses_the_whole_contribution(poison):
    ours = params(0)
    theirs = {k: v.clone() for k, v in ours.items()}
    theirs["weight"][3, 5] = poison
    with pytest.raises(Refused, match="weight holds NaN or Inf"):
        check_contribution(ours, theirs)


def test_wrong_shapes_dtypes_names_and_counts_are_refused():
    ours = params(0)
    for name, value, match in [("weight", torch.zeros(32, 65), "weight is torch.float32 \\[32, 65\\]"),
                               ("bias", torch.zeros(32, dtype=torch.float64), "bias is torch.float64"),
                               ("steps", torch.tensor([7]), "steps is")]:
        with pytest.raises(Refused, match=match):
            check_contribution(ours, {**ours, name: value})
    with pytest.raises(Refused, match="missing \\['norm'\\]"):
        check_contribution(ours, {k: v for k, v in ours.items() if k != "norm"})
    with pytest.raises(Refused, match="unexpected \\['extra'\\]"):
        check_contribution(ours, {**ours, "extra": torch.zeros(1)})
    with pytest.raises(Refused, match="not a tensor"):
        check_contribution(ours, {**ours, "bias": [0.0] * 32})
    as_list = list(ours.values())
    with pytest.raises(Refused, match="3 tensors instead of 4"):
        check_contribution(as_list, as_list[:3])
    with pytest.raises(Refused, match="sequence"):
        check_contribution(as_list, ours)
    with pytest.raises(Refused, match="named"):
        check_contribution(ours, as_list)


def test_the_bound_is_relative_to_each_tensors_norm():
    ours = params(0)
    norm = ours["norm"]  # ones: above the parameters' common scale, so measured on its own norm
    just_inside = {**ours, "norm": norm * (1 + 0.99 * MAX_RELATIVE_DISTANCE)}
    just_outside = {**ours, "norm": norm * (1 + 1.01 * MAX_RELATIVE_DISTANCE)}
    check_contribution(ours, just_inside)
    with pytest.raises(Refused, match="norm is 4.04 times its norm away"):
        check_contribution(ours, just_outside)
    check_contribution(ours, just_outside, max_distance=5.0)  # the bound is the caller's
    with pytest.raises(Refused, match="weight"):
        check_contribution(ours, {**ours, "weight": torch.full_like(ours["weight"], 1e6)})
    with pytest.raises(ValueError, match="positive"):
        check_contribution(ours, ours, max_distance=0)


def test_a_zero_tensor_is_measured_on_the_parameters_common_scale():
    """The bias is zero here: a peer's trained bias of a similar scale as the other parameters is
    accepted, an absurd one is not."""
    ours = params(0)
    scale = math.sqrt(sum(float(ours[k].square().sum()) for k in ("weight", "bias", "norm"))
                      / sum(ours[k].numel() for k in ("weight", "bias", "norm")))
    trained = {**ours, "bias": torch.full((32,), 2.0 * scale)}
    check_contribution(ours, trained)
    with pytest.raises(Refused, match="bias"):
        check_contribution(ours, {**ours, "bias": torch.full((32,), 5.0 * scale)})
    zeros = {k: torch.zeros_like(v) for k, v in ours.items()}  # all zero: a tiny absolute scale remains
    check_contribution(zeros, zeros)
    with pytest.raises(Refused, match="weight"):
        check_contribution(zeros, ours)


def test_tensors_on_the_list_form_are_named_by_position():
    ours = [torch.randn(4, 4), torch.randn(4)]
    theirs = [ours[0].clone(), torch.tensor([0.0, float("nan"), 0.0, 0.0])]
    with pytest.raises(Refused, match="tensor 1 holds NaN"):
        check_contribution(ours, theirs)
