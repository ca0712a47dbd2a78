"""The node's checks of what a request declares and carries (dmoe.node.backend.ExpertBackend), each
refusal with its own message: the number of inputs, each one's dtype, rank, fixed dimensions and
positive sizes, a batch size all inputs share; (rows, tokens) counted as rows x every position but the
feature dim; grad_outputs of exactly the outputs' shapes and dtypes; values finite and within the
node's bound (its name in the message); and the decode bound of max_batch_tokens x the widest
tensor's width per token."""

from __future__ import annotations

import pytest
import torch

from dmoe.core.experts import FREE, TensorSpec, create_expert
from dmoe.node.backend import ExpertBackend, OutOfBounds

pytestmark = pytest.mark.timeout(60)
HIDDEN = 4


class Scale(torch.nn.Module):
    """x times a learned scalar: an output of the input's shape whatever it is."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.w


class TwoInputs(torch.nn.Module):
    """x [B, S, HIDDEN] float32 and a mask [B, 3] int64; one output like x."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x, mask):
        return x * self.scale


def _backend(module: torch.nn.Module, schema, max_batch_tokens: int = 10) -> ExpertBackend:
    return ExpertBackend("e.0", module=module, input_schema=schema, device=torch.device("cpu"),
                         make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1), expert_cls="x",
                         optimizer_name="sgd", max_grad_norm=0.0, max_batch_tokens=max_batch_tokens)


@pytest.fixture(scope="module")
def two() -> ExpertBackend:
    schema = [TensorSpec((FREE, FREE, HIDDEN), "float32"), TensorSpec((FREE, 3), "int64")]
    return _backend(TwoInputs(), schema)


@pytest.fixture(scope="module")
def ffn() -> ExpertBackend:
    module, schema = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN)
    return _backend(module, schema)


def test_the_declared_inputs_are_checked_one_rule_at_a_time(two):
    f, i = "float32", "int64"
    assert two.check_input_shapes([(2, 5, HIDDEN), (2, 3)], [f, i]) == (2, 10)
    assert two.check_input_shapes([(1, 1, HIDDEN), (1, 3)], [f, i]) == (1, 1)
    cases = [
        ([(2, 5, HIDDEN)], [f], r"^e\.0 takes 2 inputs, got 1$"),
        ([(2, 5, HIDDEN), (2, 3)], [f, f], r"^inputs\[1\] of e\.0 must be int64, got float32$"),
        ([(2, 5, HIDDEN), (2, 3)], ["float16", i], r"^inputs\[0\] of e\.0 must be float32, got float16$"),
        ([(2, HIDDEN), (2, 3)], [f, i], r"^inputs\[0\] of e\.0 must have rank 3, got 2$"),
        ([(2, 5, HIDDEN + 1), (2, 3)], [f, i], r"^inputs\[0\] of e\.0: dim 2 must be 4, got 5$"),
        ([(2, 5, HIDDEN), (2, 4)], [f, i], r"^inputs\[1\] of e\.0: dim 1 must be 3, got 4$"),
        ([(2, 0, HIDDEN), (2, 3)], [f, i], r"^inputs\[0\] of e\.0 has an empty or negative dimension: "
                                           r"\[2, 0, 4\]$"),
        ([(0, 5, HIDDEN), (0, 3)], [f, i], r"empty or negative dimension: \[0, 5, 4\]"),
        ([(2, 5, HIDDEN), (3, 3)], [f, i], r"^inputs of e\.0 disagree on the batch size$"),
        ([(3, 5, HIDDEN), (2, 3)], [f, i], r"^inputs of e\.0 disagree on the batch size$"),
        ([(2, 5, HIDDEN), (2, 3), (2, 3)], [f, i, i], r"^e\.0 takes 2 inputs, got 3$"),
        ([(2, 5, HIDDEN), (2, 3)], ["float64", i], r"^inputs\[0\] of e\.0 must be float32, got float64$"),
        ([(2, 5, HIDDEN, 1), (2, 3)], [f, i], r"^inputs\[0\] of e\.0 must have rank 3, got 4$"),
        ([(2, 5, HIDDEN - 1), (2, 3)], [f, i], r"^inputs\[0\] of e\.0: dim 2 must be 4, got 3$"),
    ]
    for shapes, dtypes, message in cases:
        with pytest.raises(ValueError, match=message):
            two.check_input_shapes(shapes, dtypes)


def test_a_rank_two_or_one_input_counts_its_rows_as_tokens(ffn):
    assert ffn.check_input_shapes([(7, HIDDEN)], ["float32"]) == (7, 7)
    assert ffn.check_input_shapes([(1, HIDDEN)], ["float32"]) == (1, 1)
    vector = _backend(Scale(), [TensorSpec((FREE,), "float32")])
    assert vector.check_input_shapes([(5,)], ["float32"]) == (5, 5)


def test_grad_outputs_are_exactly_the_outputs(two):
    shapes = [(2, 5, HIDDEN), (2, 3)]
    two.check_grad_output_shapes(shapes, [(2, 5, HIDDEN)], ["float32"])
    with pytest.raises(ValueError, match=r"^e\.0 has 1 outputs, got 2 grad_outputs$"):
        two.check_grad_output_shapes(shapes, [(2, 5, HIDDEN)] * 2, ["float32"] * 2)
    with pytest.raises(ValueError, match=r"^e\.0 has 1 outputs, got 0 grad_outputs$"):
        two.check_grad_output_shapes(shapes, [], [])
    with pytest.raises(ValueError, match=r"^grad_outputs\[0\] of e\.0 must have shape \[2, 5, 4\], "
                                         r"got \[2, 6, 4\]$"):
        two.check_grad_output_shapes(shapes, [(2, 6, HIDDEN)], ["float32"])
    with pytest.raises(ValueError, match=r"^grad_outputs\[0\] of e\.0 must be float32, got float16$"):
        two.check_grad_output_shapes(shapes, [(2, 5, HIDDEN)], ["float16"])
    with pytest.raises(ValueError, match=r"^grad_outputs\[0\] of e\.0 must be float32, got float64$"):
        two.check_grad_output_shapes(shapes, [(2, 5, HIDDEN)], ["float64"])


def test_values_are_finite_and_within_the_bound_named_in_the_message(ffn):
    ok = [torch.tensor([[-2.0, 2.0]]), torch.zeros(0, 2), torch.tensor([10**9])]  # ints are not checked
    ffn.check_values(ok, "inputs", max_abs=2.0)
    ffn.check_values([torch.tensor([1e30])], "inputs")  # no bound by default
    for skipped in (torch.tensor([3]), torch.zeros(0)):  # nothing to check there, and the next is checked
        with pytest.raises(ValueError, match=r"^inputs\[1\] of e\.0 holds NaN or Inf$"):
            ffn.check_values([skipped, torch.tensor([float("nan")])], "inputs")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"^inputs\[1\] of e\.0 holds NaN or Inf$"):
            ffn.check_values([torch.ones(2), torch.tensor([0.0, bad])], "inputs", max_abs=5.0)
    with pytest.raises(OutOfBounds, match=r"^grad_outputs\[0\] of e\.0 holds 2\.5, above this node's "
                                          r"bound of 2 \(max_grad_abs\)$"):
        ffn.check_values([torch.tensor([1.0, -2.5])], "grad_outputs", max_abs=2.0)
    with pytest.raises(OutOfBounds, match=r"\(max_input_abs\)$"):
        ffn.check_values([torch.tensor([2.001])], "inputs", max_abs=2.0)


def test_the_decode_bound_is_the_batch_tokens_times_the_widest_width(two, ffn):
    assert ffn.max_numel == 10 * HIDDEN
    assert two.max_numel == 10 * HIDDEN  # the widest of HIDDEN, 3 (the mask) and the output's HIDDEN
    ffn.set_max_batch_tokens(3)
    assert ffn.max_numel == 3 * HIDDEN
    free_width = _backend(Scale(), [TensorSpec((FREE, FREE), "float32")], max_batch_tokens=2)
    assert free_width.max_numel == 2 * (1 << 16)  # a free last dimension counts as 65536 wide
    vector = _backend(Scale(), [TensorSpec((FREE,), "float32")], max_batch_tokens=5)
    assert vector.max_numel == 5  # no feature dimension: a token is one element
