"""The node's device path on the CPU: autocast (bf16; fp16 and its gradient scale, which the backend allows
on the CPU although a node's config does not), the options' validation, batch sizing by memory, and the
host <-> device staging (no copies on the CPU). The same on CUDA: tests/unit/node/test_gpu.py.

Tolerances: a reduced-precision result must be within one step of its precision at the scale of the
float32 result, i.e. |a - b| <= eps * (|b| + max|b|), eps = 2**-7 for bf16 and 2**-10 for fp16 (the
spacing of numbers in [1, 2): 8 and 11 significand bits)."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
from torch import nn

from dmoe.core.experts import FeedForwardExpert, TensorSpec, create_expert
from dmoe.core.recordrules import MIN_BATCH_TOKENS
from dmoe.errors import ConfigError
from dmoe.node import devicepath
from dmoe.node.backend import INITIAL_GRAD_SCALE, ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import (
    MAX_SIZED_BATCH_TOKENS,
    activation_bytes_per_token,
    batch_tokens_for_memory,
    build_backend,
    sized_batch_config,
    wire_bytes_per_token,
    with_batch_tokens,
)
from dmoe.node.runtime import Runtime, Task

pytestmark = pytest.mark.timeout(60)
HIDDEN, INNER = 64, 256
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def backend(autocast: torch.dtype | None, optimizer: str = "adam",
            module: nn.Module | None = None) -> ExpertBackend:
    if module is None:
        module, schema = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN, inner_dim=INNER)
    else:
        schema = [TensorSpec((-1, HIDDEN))]
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    return ExpertBackend("ffn.0", module=module, input_schema=schema, device=torch.device("cpu"),
                         make_optimizer=lambda params: cls(params, lr=1e-3), expert_cls="ffn",
                         optimizer_name=optimizer, max_grad_norm=1.0, max_batch_tokens=4096,
                         autocast=autocast)


def assert_within_a_step(reduced: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert reduced.dtype == exact.dtype == torch.float32
    eps = EPS[dtype]
    torch.testing.assert_close(reduced, exact, rtol=eps, atol=eps * float(exact.abs().max()))


def inputs(rows: int = 32, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    return (torch.randn(rows, HIDDEN, generator=generator),
            scale * torch.randn(rows, HIDDEN, generator=generator))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_stays_within_a_step_of_float32_and_keeps_float32_state_and_wire_dtypes(dtype):
    reduced, exact = backend(dtype), backend(None)
    x, g = inputs(scale=1e-4)  # output gradients of a mean loss: small, as fp16's scale expects
    assert reduced.output_schema == exact.output_schema == [TensorSpec((-1, HIDDEN), "float32")]
    assert_within_a_step(reduced.forward([x])[0], exact.forward([x])[0], dtype)
    assert_within_a_step(reduced.backward([x], [g])[0], exact.backward([x], [g])[0], dtype)
    assert reduced.version == exact.version == 1 and reduced.overflows == 0
    assert reduced.grad_scale == INITIAL_GRAD_SCALE  # (fp16: no overflow; bf16: no scale used)
    assert {p.dtype for p in reduced.module.parameters()} == {torch.float32}
    # parameters and optimizer state: the same tensors and dtypes as without autocast (a replica with
    # another --autocast takes and gives the same state)
    assert reduced.state_schema() == exact.state_schema()
    tensors, _ = reduced.state_tensors()
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert len(tensors) == len(exact.state_tensors()[0]) > 4


def test_fp16_scales_small_gradients_that_float16_alone_would_lose():
    x, g = inputs(scale=1e-8)  # below float16's smallest subnormal (6e-8) once multiplied by a weight
    exact = backend(None, "sgd").backward([x], [g])[0]
    unscaled = backend(torch.float16, "sgd")
    unscaled.grad_scale = 1.0
    assert float(unscaled.backward([x], [g])[0].abs().max()) < float(exact.abs().max()) / 2
    scaled = backend(torch.float16, "sgd")
    assert_within_a_step(scaled.backward([x], [g])[0], exact, torch.float16)
    assert scaled.grad_scale == INITIAL_GRAD_SCALE and scaled.overflows == 0


def test_fp16_overflow_halves_the_scale_and_answers_the_float32_result():
    x, g = inputs(scale=1e3)  # times 2**16: far above float16's largest value (65504)
    exact, scaled = backend(None), backend(torch.float16)
    grads = scaled.backward([x], [g])[0]
    assert scaled.overflows == 1 and scaled.grad_scale == INITIAL_GRAD_SCALE / 2
    assert torch.equal(grads, exact.backward([x], [g])[0])  # recomputed in float32: the same numbers
    assert scaled.version == exact.version == 1
    for p, q in zip(scaled.module.parameters(), exact.module.parameters()):
        assert torch.equal(p, q)  # and the same step


def test_a_module_that_opts_out_computes_in_float32():
    class Exact(FeedForwardExpert):
        allows_autocast = False

    torch.manual_seed(3)
    module = Exact(HIDDEN, INNER)
    reference = Exact(HIDDEN, INNER)
    reference.load_state_dict(module.state_dict())
    opted_out = backend(torch.bfloat16, module=module)
    assert opted_out.autocast is None
    x, _ = inputs()
    with torch.no_grad():
        assert torch.equal(opted_out.forward([x])[0], reference(x))


def test_autocast_option_validation():
    assert NodeConfig().autocast == "off"
    with pytest.raises(ConfigError, match="autocast must be one of off, bf16, fp16"):
        NodeConfig(autocast="fp8")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        NodeConfig(autocast="fp16", device="cpu")
    # device auto on a machine without CUDA: refused when the expert is built on the CPU
    config = NodeConfig(autocast="fp16", hidden_dim=16)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        build_backend("ffn.0", config, torch.device("cpu"))
    assert build_backend("ffn.0", NodeConfig(autocast="bf16", hidden_dim=16),
                         torch.device("cpu")).autocast == torch.bfloat16
    assert build_backend("ffn.0", NodeConfig(hidden_dim=16), torch.device("cpu")).autocast is None


def test_batch_tokens_for_memory():
    KiB, GiB = 1 << 10, 1 << 30
    # half of 1 GiB over twice 24 KiB a token: 10922 tokens, rounded down to a multiple of 64
    assert batch_tokens_for_memory(GiB, 24 * KiB) == 10880
    assert batch_tokens_for_memory(GiB, 24 * KiB, fraction=1.0, headroom=1.0, multiple=1) == 43690
    assert batch_tokens_for_memory(80 * GiB, 24 * KiB) == MAX_SIZED_BATCH_TOKENS  # capped
    assert batch_tokens_for_memory(80 * GiB, 24 * KiB, ceiling=20000) == 20000
    assert batch_tokens_for_memory(1 << 20, 1 << 20) == MIN_BATCH_TOKENS  # nothing fits: the floor
    with pytest.raises(ValueError):
        batch_tokens_for_memory(GiB, 0)
    with pytest.raises(ValueError):
        batch_tokens_for_memory(GiB, 1024, headroom=0.5)


def test_activation_bytes_per_token_of_the_ffn_expert():
    # float32: kept for the backward x (D), up(x) (I), gelu(up(x)) (I); besides them the input
    # gradient (D), the output and its gradient (2 D): (4 D + 2 I) x 4 bytes
    assert activation_bytes_per_token(backend(None)) == (4 * HIDDEN + 2 * INNER) * 4
    # bf16: the same kept in bf16 (2 bytes; x's bf16 copy besides the float32 input), the wire in float32
    assert activation_bytes_per_token(backend(torch.bfloat16)) == (HIDDEN + 2 * INNER) * 2 + 4 * HIDDEN * 4
    assert wire_bytes_per_token(backend(None)) == 2 * HIDDEN * 4


def test_batches_are_sized_by_memory_only_on_cuda_and_the_queue_follows_unless_given():
    config = NodeConfig(hidden_dim=16)
    backends = {"ffn.0": build_backend("ffn.0", config, torch.device("cpu"))}
    assert sized_batch_config(config, frozenset(), backends) is config
    grown = with_batch_tokens(config, frozenset(), 65536)
    assert (grown.max_batch_tokens, grown.max_queued_tokens) == (65536, 131072)
    kept = with_batch_tokens(config, frozenset(), 1024)  # the queue never shrinks
    assert (kept.max_batch_tokens, kept.max_queued_tokens) == (1024, config.max_queued_tokens)
    given = NodeConfig(hidden_dim=16, max_queued_tokens=8192)
    capped = with_batch_tokens(given, frozenset({"max_queued_tokens"}), 65536)
    assert (capped.max_batch_tokens, capped.max_queued_tokens) == (8192, 8192)


def test_staging_on_the_cpu_concatenates_without_copies():
    parts = [[torch.randn(n, HIDDEN)] for n in (1, 3, 2)]
    staged = devicepath.stage(parts, None, torch.device("cpu"))
    assert staged.copied is None and staged.grad_outputs is None
    assert torch.equal(staged.inputs[0], torch.cat([p[0] for p in parts]))
    single = devicepath.stage(parts[:1], parts[:1], torch.device("cpu"))
    assert single.inputs[0] is parts[0][0] and single.grad_outputs is not None
    assert devicepath.to_host([parts[0][0]])[0] is parts[0][0]


def test_runtime_with_bf16_answers_merged_tasks_within_a_step_of_float32():
    reduced, exact = backend(torch.bfloat16), backend(None)
    runtime = Runtime({"ffn.0": reduced}, max_batch_tokens=1024, max_queued_tokens=4096, batching=True)
    rows = (3, 5, 8)
    xs = [inputs(n)[0] for n in rows]
    gs = [inputs(n, 1e-4)[1] for n in rows]
    forwards = [Task([x], None, x.shape[0], x.shape[0], concurrent.futures.Future()) for x in xs]
    backwards = [Task([x], [g], x.shape[0], x.shape[0], concurrent.futures.Future()) for x, g in zip(xs, gs)]
    for t in (*forwards, *backwards):
        runtime.submit("ffn.0", t)
    runtime.start()
    try:
        expected = exact.forward([torch.cat(xs)])[0].split(rows)
        for t, want in zip(forwards, expected):
            assert_within_a_step(t.future.result(30)[0], want, torch.bfloat16)
        expected = exact.backward([torch.cat(xs)], [torch.cat(gs)])[0].split(rows)
        for t, want in zip(backwards, expected):
            assert_within_a_step(t.future.result(30)[0], want, torch.bfloat16)
    finally:
        runtime.shutdown(10)
    assert runtime.num_batches == 2 and reduced.version == 1


def test_batches_staged_ahead_run_in_order_after_the_step_before_them():
    # staging ahead is what a CUDA runtime does (its copies overlap the compute); forced on here to check
    # its order on the CPU: each next batch is taken while one computes, and still runs after it, so
    # forward and backward of the same rows alternate exactly as sequential calls would
    reduced, exact = backend(None, "sgd"), backend(None, "sgd")
    runtime = Runtime({"ffn.0": reduced}, max_batch_tokens=1024, max_queued_tokens=4096, batching=False,
                      stage_ahead=True)
    pairs, expected = [], []
    for rows in (4, 7, 2, 5):
        x, g = inputs(rows)
        expected.append((exact.forward([x])[0], exact.backward([x], [g])[0]))
        pairs.append((Task([x], None, rows, rows, concurrent.futures.Future()),
                      Task([x], [g], rows, rows, concurrent.futures.Future())))
    for forward, backward in pairs:
        runtime.submit("ffn.0", forward)
        runtime.submit("ffn.0", backward)
    runtime.start()
    try:
        for (forward, backward), (output, grad) in zip(pairs, expected):
            assert torch.equal(forward.future.result(30)[0], output)
            assert torch.equal(backward.future.result(30)[0], grad)
    finally:
        runtime.shutdown(10)
    assert runtime.num_batches == 8 and runtime.num_staged_ahead == 7 and reduced.version == 4
    for p, q in zip(reduced.module.parameters(), exact.module.parameters()):
        assert torch.equal(p, q)
