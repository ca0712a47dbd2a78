"""An expert backend built from a node's config, and the limits it is given."""

from __future__ import annotations

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
