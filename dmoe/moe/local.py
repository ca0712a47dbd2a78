"""LocalMoE: the same MoE layer as RemoteMoE, with its experts in this process.

For users without a swarm (``dmoe train --local``) and as the reference that benchmarks and tests
compare the swarm against: the gate, routing and losses are RemoteMoE's (:class:`dmoe.moe.gating.MoELayer`);
the experts are built by :func:`dmoe.core.experts.create_expert` with the same uid-seeded initial weights
that a node gives them, and they are ordinary parameters of this module, trained by the caller's
optimizer. Every expert of the grid is a candidate and every expert answers.
"""

from __future__ import annotations

import itertools
import math

from torch import nn

from dmoe.core.experts import create_expert
from dmoe.moe.gating import MoELayer, group_by_expert


class LocalMoE(MoELayer):
    def __init__(self, *, prefix: str, grid: tuple[int, ...], in_features: int, k: int = 2,
                 expert_cls: str = "ffn", inner_dim: int | None = None, seed: int = 0, routing: str = "topk",
                 capacity_factor: float = 1.25, noise_std: float = 0.0, hedge: int = 0):
        super().__init__(prefix=prefix, grid=grid, in_features=in_features, k=k, routing=routing,
                         capacity_factor=capacity_factor, noise_std=noise_std, hedge=hedge)
        if math.prod(grid) > 65536:
            raise ValueError(f"a local grid of {math.prod(grid)} experts is too large for one process")
        self.coords = list(itertools.product(*(range(size) for size in grid)))
        # ModuleDict keys may not contain '.', so experts are stored by position in the grid
        self.experts = nn.ModuleList(
            create_expert(expert_cls, uid=self.uid(c), hidden_dim=in_features, inner_dim=inner_dim,
                          seed=seed)[0]
            for c in self.coords
        )

    def candidates(self, scores):
        return [(c, expert) for c, expert in zip(self.coords, self.experts)]

    def run_experts(self, x_TD, experts_TK, handles):
        out_TKD = x_TD.new_zeros(*experts_TK.shape, x_TD.shape[-1])
        for e, token_ids, slot_ids in group_by_expert(experts_TK):
            out_TKD = out_TKD.index_put((token_ids, slot_ids), handles[e](x_TD[token_ids]))
        return out_TKD, experts_TK >= 0, 0  # every expert answers
