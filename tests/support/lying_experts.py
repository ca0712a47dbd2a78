"""An expert that lies on a fraction of its forwards, loaded by nodes as 'lying_experts:LyingExpert'.

Honest nodes load the same class without the environment below, so a liar is a replica of the same
uid, with the same uid-seeded state, the same class name in its record, and averaging with the
others: a member holding the swarm key whose outputs are finite, well-shaped, in range, and wrong.
"""

import os
import random

import torch
from torch import nn


class LyingExpert(nn.Module):
    """hidden -> 2 x hidden -> hidden with a GELU. In a node started with $DMOE_TEST_LIE_FRACTION = p,
    each forward (one device call) is a lie with probability p: every output row gets a random
    perturbation of $DMOE_TEST_LIE_SCALE (default 1) times its norm. Each lie appends a line to the
    file named by $DMOE_TEST_LIE_LOG, if set, so a test can count them."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.up = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.down = nn.Linear(2 * hidden_dim, hidden_dim)
        self.lie_fraction = float(os.environ.get("DMOE_TEST_LIE_FRACTION", "0"))
        self.lie_scale = float(os.environ.get("DMOE_TEST_LIE_SCALE", "1"))
        self.lie_log = os.environ.get("DMOE_TEST_LIE_LOG")
        self._rng = random.Random(os.getpid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(nn.functional.gelu(self.up(x)))
        if torch.is_grad_enabled() or self.lie_fraction <= 0 or self._rng.random() >= self.lie_fraction:
            return y  # Backward's recomputation (with autograd) is honest: it lies in Forward calls only
        with torch.no_grad():
            noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(self._rng.getrandbits(62)))
            noise *= self.lie_scale * y.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
        if self.lie_log:
            with open(self.lie_log, "a") as log:
                log.write(f"{x.shape[0]}\n")
        return y + noise
