"""A user-defined expert class, loaded by nodes in tests as 'experts_for_tests:LinearExpert'."""

import torch
from torch import nn


class LinearExpert(nn.Module):
    """y = W x + b: its parameter gradients do not depend on its parameters, so SGD updates add up
    the same however concurrent backward calls are batched."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
