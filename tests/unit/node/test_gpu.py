"""The device path of a backend: the same results on CUDA as on the CPU (runs where a GPU is lent):
plain, under bf16 and fp16 autocast, through pinned memory and the copy stream, in the runtime that stages
the next batch while one computes, batches sized by the device's memory, and a pooled group."""

import concurrent.futures

import pytest
import torch

from dmoe.core.recordrules import MIN_BATCH_TOKENS
from dmoe.node import devicepath, grouped
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import (
    MAX_SIZED_BATCH_TOKENS,
    activation_bytes_per_token,
    build_backend,
    resolve_device,
    sized_batch_config,
)
from dmoe.node.runtime import Runtime, Task

pytestmark = [pytest.mark.timeout(120), pytest.mark.gpu]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def make(device: str) -> ExpertBackend:
    return build_backend("ffn.0", NodeConfig(expert_cls="ffn", hidden_dim=64, lr=1e-3), torch.device(device))


def test_auto_device_matches_what_torch_sees():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@needs_cuda
def test_cuda_backend_matches_cpu():
    cpu, gpu = make("cpu"), make("cuda")
    x, g = torch.randn(32, 64), torch.randn(32, 64)
    torch.testing.assert_close(gpu.forward([x])[0], cpu.forward([x])[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu.backward([x], [g])[0], cpu.backward([x], [g])[0], rtol=1e-3, atol=1e-4)
    assert gpu.version == cpu.version == 1
    torch.testing.assert_close(gpu.forward([x])[0], cpu.forward([x])[0], rtol=1e-3, atol=1e-4)


EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one step of the precision (see test_device_path)


def make_autocast(device: str, autocast: str, hidden: int = 64) -> ExpertBackend:
    config = NodeConfig(expert_cls="ffn", hidden_dim=hidden, lr=1e-3, autocast=autocast)
    return build_backend("ffn.0", config, torch.device(device))


@needs_cuda
@pytest.mark.parametrize("autocast,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_autocast_stays_within_a_step_of_float32_on_the_cpu(autocast, dtype):
    cpu, gpu = make("cpu"), make_autocast("cuda", autocast)
    assert gpu.autocast == dtype
    x, g = torch.randn(32, 64), 1e-4 * torch.randn(32, 64)
    eps, want = EPS[dtype], cpu.forward([x])[0]
    got = gpu.forward([x])[0]
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))
    want, got = cpu.backward([x], [g])[0], gpu.backward([x], [g])[0]
    assert got.dtype == torch.float32 and gpu.overflows == 0 and gpu.version == cpu.version == 1
    torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))
    assert {p.dtype for p in gpu.module.parameters()} == {torch.float32}
    assert gpu.state_schema() == cpu.state_schema()


@needs_cuda
def test_staged_batches_go_through_pinned_memory_on_the_copy_stream_and_match_the_cpu():
    cpu, gpu = make("cpu"), make("cuda")
    parts = [[torch.randn(n, 64)] for n in (5, 11, 16)]
    grads = [[torch.randn(n, 64)] for n in (5, 11, 16)]
    staged = devicepath.stage(parts, grads, gpu.device)
    assert staged.copied is not None and staged.inputs[0].device.type == "cuda"
    staged.wait()
    x, g = torch.cat([p[0] for p in parts]), torch.cat([p[0] for p in grads])
    outputs = gpu.forward(staged.inputs)
    assert outputs[0].is_pinned()
    torch.testing.assert_close(outputs[0], cpu.forward([x])[0], rtol=1e-3, atol=1e-4)
    assert staged.grad_outputs is not None
    torch.testing.assert_close(gpu.backward(staged.inputs, staged.grad_outputs)[0],
                               cpu.backward([x], [g])[0], rtol=1e-3, atol=1e-4)


@needs_cuda
def test_cuda_runtime_staging_the_next_batch_during_the_compute_matches_the_cpu():
    # every task queued before the runtime starts, one per batch (so in the order of the CPU's calls):
    # forward and backward alternate, each next one staged (its copy on the copy stream) while the one
    # before computes. SGD: parameters move by their gradients (Adam's first steps move a parameter by
    # the learning rate whatever its gradient's size, so a gradient near zero may move it either way)
    config = NodeConfig(expert_cls="ffn", hidden_dim=64, optimizer="sgd", lr=1e-2)
    cpu, gpu = (build_backend("ffn.0", config, torch.device(device)) for device in ("cpu", "cuda"))
    runtime = Runtime({"ffn.0": gpu}, max_batch_tokens=64, max_queued_tokens=4096, batching=False)
    tasks, expected = [], []
    for rows in (40, 40, 24, 64, 8, 8):
        x, g = torch.randn(rows, 64), torch.randn(rows, 64)
        expected.append((cpu.forward([x])[0], cpu.backward([x], [g])[0]))
        pair = (Task([x], None, rows, rows, concurrent.futures.Future()),
                Task([x], [g], rows, rows, concurrent.futures.Future()))
        tasks.append(pair)
    for forward, backward in tasks:
        runtime.submit("ffn.0", forward)
        runtime.submit("ffn.0", backward)
    runtime.start()
    try:
        for (forward, backward), (want_out, want_grad) in zip(tasks, expected):
            torch.testing.assert_close(forward.future.result(60)[0], want_out, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(backward.future.result(60)[0], want_grad, rtol=1e-3, atol=1e-4)
    finally:
        runtime.shutdown(30)
    assert gpu.version == cpu.version == len(tasks)
    for p, q in zip(gpu.module.parameters(), cpu.module.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-3, atol=1e-4)


@needs_cuda
def test_batches_are_sized_by_free_cuda_memory():
    config = NodeConfig(expert_cls="ffn", hidden_dim=64, inner_dim=256)
    backends = {"ffn.0": build_backend("ffn.0", config, torch.device("cuda"))}
    # on the GPU the ffn keeps what it keeps on the CPU (test_device_path): (4 D + 2 I) x 4 bytes a token
    assert activation_bytes_per_token(backends["ffn.0"]) == (4 * 64 + 2 * 256) * 4
    sized = sized_batch_config(config, frozenset(), backends)
    assert MIN_BATCH_TOKENS <= sized.max_batch_tokens <= MAX_SIZED_BATCH_TOKENS
    assert sized.max_batch_tokens % 64 == 0 and sized.max_queued_tokens >= 2 * sized.max_batch_tokens
    assert backends["ffn.0"].max_numel == sized.max_batch_tokens * 64
    # given, the option is kept
    assert sized_batch_config(config, frozenset({"max_batch_tokens"}), backends) is config


@needs_cuda
def test_a_pooled_group_on_cuda_matches_each_expert_alone_on_the_cpu():
    config = NodeConfig(expert_cls="ffn", hidden_dim=64, lr=1e-3)
    uids = [f"ffn.{i}" for i in range(5)]
    gpu = [build_backend(uid, config, torch.device("cuda")) for uid in uids]
    cpu = [build_backend(uid, config, torch.device("cpu")) for uid in uids]
    for _ in range(2):
        xs = [[torch.randn(1 + i, 64)] for i in range(len(uids))]
        gs = [[torch.randn(1 + i, 64)] for i in range(len(uids))]
        for out, b, x in zip(grouped.forward(gpu, xs), cpu, xs):
            torch.testing.assert_close(out[0], b.forward(x)[0], rtol=1e-3, atol=1e-4)
        replies = []
        assert grouped.backward(gpu, xs, gs, reply=replies.append) == [True] * len(uids)
        for reply, b, x, g in zip(replies[0], cpu, xs, gs):
            torch.testing.assert_close(reply[0], b.backward(x, g)[0], rtol=1e-3, atol=1e-4)
    assert gpu[0].pooled is not None and gpu[0].pooled.chunk.params.is_cuda
    for a, b in zip(gpu, cpu):
        assert a.version == b.version == 2
        for p, q in zip(a.module.parameters(), b.module.parameters()):
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-3, atol=1e-4)
