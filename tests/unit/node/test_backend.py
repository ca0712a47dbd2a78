"""An expert backend built from a node's config, and the limits it is given."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dmoe.core.experts import create_expert
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")


def test_build_backend_takes_the_expert_and_its_optimizer_from_the_config():
    config = NodeConfig(expert_cls="transformer", hidden_dim=8, inner_dim=12, seed=3, optimizer="sgd", lr=0.5,
                        max_grad_norm=0.25, max_batch_tokens=64, max_queued_tokens=64)
    built = build_backend("tf.2", config, CPU)
    local, schema = create_expert("transformer", uid="tf.2", hidden_dim=8, inner_dim=12, seed=3)
    assert built.input_schema == schema
    for (name, got), want in zip(built.module.state_dict().items(), local.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert type(built.optimizer) is torch.optim.SGD and built.optimizer.param_groups[0]["lr"] == 0.5
    assert built.max_grad_norm == 0.25 and built.max_numel == 64 * 8
    _, metadata = built.state_tensors()
    assert metadata == {"uid": "tf.2", "expert_cls": "transformer", "optimizer": "sgd", "version": "0"}
    assert type(build_backend("ffn.0", NodeConfig(hidden_dim=8), CPU).optimizer) is torch.optim.Adam


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_the_backend_clips_each_step_to_the_norm_it_was_given(max_grad_norm):
    """With SGD at lr 1, a step moves the parameters by minus their gradient: the gradient clipped to
    max_grad_norm (far below its own norm here), or the whole gradient when clipping is off (0).
    The reference is the same expert's gradient, taken and clipped here."""
    module, schema = create_expert("ffn", uid="ffn.0", hidden_dim=4)
    local, _ = create_expert("ffn", uid="ffn.0", hidden_dim=4)
    backend = ExpertBackend("ffn.0", module=module, input_schema=schema, device=CPU,
                            make_optimizer=lambda params: torch.optim.SGD(params, lr=1.0), expert_cls="ffn",
                            optimizer_name="sgd", max_grad_norm=max_grad_norm, max_batch_tokens=16)
    x, grad_out = torch.randn(8, 4), torch.full((8, 4), 100.0)
    local(x).backward(grad_out)
    grads = [p.grad.clone() for p in local.parameters()]
    full_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert full_norm > 100 * 0.5  # clipping at 0.5 changes this gradient
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(local.parameters()), max_grad_norm)
        grads = [p.grad.clone() for p in local.parameters()]
    before = [p.detach().clone() for p in backend.module.parameters()]
    backend.backward([x], [grad_out])
    assert backend.version == 1
    for old, new, grad in zip(before, backend.module.parameters(), grads, strict=True):
        torch.testing.assert_close(new.detach() - old, -grad, rtol=1e-5, atol=1e-6)


def test_non_finite_parameter_gradients_skip_the_step_and_the_caller_still_gets_its_gradients(caplog):
    """Output gradients whose products overflow float32 in the parameter gradients (not in the input
    gradients, which go back to the caller as they are): the step is skipped, counted and logged, and
    the parameters and optimizer state are untouched; a finite batch after it steps as usual."""
    expert = build_backend("ffn.0", NodeConfig(hidden_dim=8, inner_dim=8, max_grad_norm=0.0), CPU)
    before = {k: v.clone() for k, v in expert.module.state_dict().items()}
    x = torch.full((2, 8), 1e30)  # inputs x grads overflow in the first layer's weight gradient
    g = torch.full((2, 8), 1e30)
    with caplog.at_level("WARNING", logger="dmoe.node.backend"):
        expert.backward([x], [g])
    assert (expert.version, expert.skipped_steps) == (0, 1)
    assert "ffn.0: non-finite parameter gradients; optimizer step skipped" in caplog.text
    for name, value in expert.module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert expert.optimizer.state_dict()["state"] == {}  # Adam never stepped
    assert all(p.grad is None for p in expert.module.parameters())
    expert.backward([torch.randn(2, 8)], [torch.randn(2, 8)])
    assert (expert.version, expert.skipped_steps) == (1, 1)
    assert any(not torch.equal(v, before[k]) for k, v in expert.module.state_dict().items())


def test_a_backward_leaves_the_callers_tensors_as_they_were():
    """The backward's autograd leaves are its own: the caller's inputs neither start requiring
    gradients nor get a .grad (a caller that passes one tensor to two experts is not raced through it)."""
    backend = build_backend("ffn.0", NodeConfig(hidden_dim=4), CPU)
    x, grad_out = torch.randn(3, 4), torch.ones(3, 4)
    (grad_x,) = backend.backward([x], [grad_out])
    assert not x.requires_grad and x.grad is None and not grad_out.requires_grad
    assert grad_x.shape == x.shape and not grad_x.requires_grad and backend.version == 1


# Threads run the backwards of their own experts on one shared input tensor. When the backward made the
# caller's tensor its autograd leaf, the threads raced on that tensor's .grad and the process died with
# a segmentation fault within a second or two; hence a process of its own, and its exit status checked.
_SHARED_INPUT_SCRIPT = """
import threading, time, torch
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend
x = torch.linspace(-2, 2, 5 * 16).reshape(5, 16)
backends = [build_backend(f"ffn.{i}", NodeConfig(hidden_dim=16), torch.device("cpu")) for i in range(4)]
deadline = time.monotonic() + SECONDS
def run(backend):
    while time.monotonic() < deadline:
        backend.backward([x], [torch.ones_like(x)])
threads = [threading.Thread(target=run, args=(b,)) for b in backends]
for t in threads: t.start()
for t in threads: t.join()
print("steps", sum(b.version for b in backends))
"""


def test_backwards_of_several_experts_on_threads_given_one_input_tensor_all_complete():
    script = _SHARED_INPUT_SCRIPT.replace("SECONDS", "4")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = int(done.stdout.split()[-1])
    assert steps >= 4 and "steps" in done.stdout
