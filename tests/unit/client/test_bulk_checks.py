"""The client's checks of many tensors at once (dmoe.client.dispatch): the finiteness of a step's
inputs and gradients and the values of a batched reply's parts are checked in one torch op where
the tensors share a dtype; the answer is the one the checks one by one would give."""

from __future__ import annotations

import pytest
import torch

from dmoe.client.dispatch import _all_finite, _check_values, _token_counts, _within

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2])
def test_all_finite_at_once_is_each_one_finite(bad, where):
    tensors = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(5, 4)]
    if bad is not None:
        tensors[where][0, 1] = bad
    assert _all_finite(tensors) == all(bool(torch.isfinite(t).all()) for t in tensors) == (bad is None)


def test_all_finite_of_mixed_dtypes_and_of_nothing():
    assert _all_finite([]) and _all_finite([torch.zeros(0, 4)])
    assert _all_finite([torch.ones(2, dtype=torch.float16), torch.ones(2, dtype=torch.int64)])
    assert not _all_finite([torch.ones(2, dtype=torch.int64), torch.tensor([float("nan")])])


@pytest.mark.parametrize("value", [0.5, 9.0, 11.0, float("nan"), float("inf")])
def test_within_at_once_is_each_value_check_passing(value):
    tensors = [torch.full((2, 3), -1.0), torch.full((1, 3), value), torch.zeros(0, 3)]

    def passes(tensor: torch.Tensor) -> bool:
        try:
            _check_values(tensor, 10.0)
        except ValueError:
            return False
        return True

    assert _within(tensors, 10.0) == all(passes(t) for t in tensors) == (value <= 10.0)
    assert _within(tensors, float("inf")) == (value < float("inf"))


def test_token_counts_add_up_every_list_of_token_ids():
    ids = [torch.tensor([0, 3]), torch.tensor([3]), torch.tensor([4, 0, 1])]
    want = torch.zeros(6, dtype=torch.long)
    for token_ids in ids:
        want[token_ids] += 1
    assert _token_counts(ids, 6).tolist() == want.tolist() == [2, 1, 0, 2, 1, 0]
    assert _token_counts([], 3).tolist() == [0, 0, 0]
