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
                        max_grad_norm=0.0, max_batch_tokens=64, max_queued_tokens=64)
    built = build_backend("tf.2", config, CPU)
    local, schema = create_expert("transformer", uid="tf.2", hidden_dim=8, inner_dim=12, seed=3)
    assert built.input_schema == schema
    for (name, got), want in zip(built.module.state_dict().items(), local.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert type(built.optimizer) is torch.optim.SGD and built.optimizer.param_groups[0]["lr"] == 0.5
    assert built.max_grad_norm == 0.0 and built.max_numel == 64 * 8
    _, metadata = built.state_tensors()
    assert metadata == {"uid": "tf.2", "expert_cls": "transformer", "optimizer": "sgd", "version": "0"}
    assert type(build_backend("ffn.0", NodeConfig(hidden_dim=8), CPU).optimizer) is torch.optim.Adam


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_the_backend_clips_each_step_to_the_norm_it_was_given(max_grad_norm):
    """With SGD at lr 1, a step moves the parameters by their clipped gradient: at most
    max_grad_norm in norm, or the whole gradient when clipping is off (0)."""
    module, schema = create_expert("ffn", uid="ffn.0", hidden_dim=4)
    backend = ExpertBackend("ffn.0", module=module, input_schema=schema, device=CPU,
                            make_optimizer=lambda params: torch.optim.SGD(params, lr=1.0), expert_cls="ffn",
                            optimizer_name="sgd", max_grad_norm=max_grad_norm, max_batch_tokens=16)
    before = torch.cat([p.detach().flatten().clone() for p in backend.module.parameters()])
    backend.backward([torch.randn(8, 4)], [torch.full((8, 4), 100.0)])
    moved = torch.cat([p.detach().flatten() for p in backend.module.parameters()]) - before
    assert backend.version == 1
    if max_grad_norm:
        assert float(moved.norm()) == pytest.approx(max_grad_norm, rel=1e-4)
    else:
        assert float(moved.norm()) > 10
