"""Small Adam experts for the tests of the node's pooled storage (dmoe.node.pool), and pooling one."""

from __future__ import annotations

import torch

from dmoe.core.experts import create_expert
from dmoe.node.backend import ExpertBackend
from dmoe.node.pool import Member, Pool

HIDDEN = 8


def backend(uid: str, lr: float = 1e-2) -> ExpertBackend:
    """An ffn expert with Adam (pooled when grouped); ``lr`` sets its group key apart from other tests'."""
    module, schema = create_expert("ffn", uid=uid, hidden_dim=HIDDEN, inner_dim=2 * HIDDEN)
    return ExpertBackend(uid, module=module, input_schema=schema, device=torch.device("cpu"),
                         make_optimizer=lambda params: torch.optim.Adam(params, lr=lr), expert_cls="ffn",
                         optimizer_name="adam", max_grad_norm=1.0, max_batch_tokens=4096)


def adopted(pool: Pool, expert: ExpertBackend) -> Member:
    """``expert`` pooled in ``pool`` (as a group's first step does)."""
    return pool.adopt(expert, list(expert.module.parameters()))
