"""Expert classes for the replica averaging tests, loaded by nodes as 'replica_experts:ReplicaExpert'."""

import os

import torch
from torch import nn


class ReplicaExpert(nn.Module):
    """y = W x + b. With $DMOE_TEST_POISON set in the node's environment ("nan", or a number such
    as 1e6), a hostile replica: the state it hands out (its state_dict: what GetState sends, what
    its own averaging reads) holds that value everywhere, whatever it computes with."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)
        self.poison = os.environ.get("DMOE_TEST_POISON")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.poison is None:
            return state
        value = float(self.poison)
        return type(state)((name, torch.full_like(tensor, value)) for name, tensor in state.items())
