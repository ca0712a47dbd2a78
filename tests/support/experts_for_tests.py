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


class SlowExpert(nn.Module):
    """Identity that takes a second per call ($DMOE_TEST_SLEEP seconds, if set) and touches the file
    named by $DMOE_TEST_STARTED when a call begins, so a test knows a call is in flight."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import time

        marker = os.environ.get("DMOE_TEST_STARTED")
        if marker and x.shape[0] > 1:  # the node's one-row shape probe at start-up does not count
            open(marker, "a").close()
            time.sleep(float(os.environ.get("DMOE_TEST_SLEEP", "1.0")))
        return x * self.scale


class NaNExpert(nn.Module):
    """A hostile expert: answers NaN for every input but the node's one-row start-up probe."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y if x.shape[0] == 1 else y * float("nan")


class SleepyExpert(nn.Module):
    """Identity that takes half a second per call (the node's one-row start-up probe excepted), so
    that calls stay in flight long enough for a test to count them."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        if x.shape[0] > 1:
            time.sleep(0.5)
        return x * self.scale
