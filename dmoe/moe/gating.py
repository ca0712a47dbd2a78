"""MoELayer: what every dmoe MoE layer does on the client, wherever its experts run.

Legend for tensor names: T tokens, D model dim (in_features), C candidate (live) experts, K experts
per token, L grid dimensions.
One gate per grid dimension scores the tokens (expert ``prefix.i.j`` scores ``g0(x)[i] + g1(x)[j]``);
each token goes to its top-k candidates (or, with Switch routing, its top-1 within a capacity);
the outputs of the experts that answered are combined with the gate weights renormalised over them.
With ``hedge=h``, each token is also sent to its next h candidates, and of those that answer, its
best k by gate score are kept: a slow or dead expert costs the token nothing when a spare answers.
A subclass says which experts are candidates (:meth:`MoELayer.candidates`) and runs them
(:meth:`MoELayer.run_experts`): :class:`dmoe.moe.remote.RemoteMoE` on other machines,
:class:`dmoe.moe.local.LocalMoE` in this process.

On a grid of many experts the candidates come from a beam search over grid prefixes
(:meth:`MoELayer.beam_search`): at each level, the union of every token's best ``beam_size`` live
prefixes is expanded, every key of the level in one read. It runs on tensors, one level at a time: no
Python loop per token, and none per candidate beyond what the read of a level costs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

# A beam search's read of one level: for each prefix key (``ffn.``, ``ffn.3.``), in order, the live next
# coordinates (sorted) and a handle for each; ``exact``: the last level, each coordinate an expert to call
LevelReader = Callable[..., Sequence[tuple[Sequence[int], Sequence[Any]]]]  # (keys, *, exact: bool)


class Candidates(Sequence[tuple[tuple[int, ...], Any]]):
    """What a beam search finds (:meth:`MoELayer.beam_search`): a sequence of (grid coordinates,
    handle) pairs, as :meth:`MoELayer.candidates` returns, kept as ``coords_CL`` (a tensor [C, L]) and
    ``handles``; the pairs, and the experts' ``uids``, are spelled out when first read (thousands of
    tuples and strings that a forward does not need)."""

    def __init__(self, prefix: str, coords_CL: torch.Tensor, handles: list[Any]):
        self.coords_CL, self.handles = coords_CL, handles
        self.uids = _Uids(prefix, coords_CL)
        self._pairs: list[tuple[tuple[int, ...], Any]] | None = None

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, index):
        return self._spelled()[index]

    def __iter__(self):
        return iter(self._spelled())

    def _spelled(self) -> list[tuple[tuple[int, ...], Any]]:
        if self._pairs is None:
            self._pairs = list(zip(map(tuple, self.coords_CL.tolist()), self.handles))
        return self._pairs

    def __repr__(self) -> str:
        return f"Candidates({len(self)} experts)"


class _Uids(Sequence[str]):
    """The uids of the experts at ``coords_CL``, spelled when first read."""

    def __init__(self, prefix: str, coords_CL: torch.Tensor):
        self._prefix, self._coords_CL = prefix, coords_CL
        self._uids: list[str] | None = None

    def __len__(self) -> int:
        return self._coords_CL.shape[0]

    def __getitem__(self, index):
        return self._spelled()[index]

    def __iter__(self):
        return iter(self._spelled())

    def _spelled(self) -> list[str]:
        if self._uids is None:
            self._uids = [".".join([self._prefix, *map(str, coords)]) for coords in self._coords_CL.tolist()]
        return self._uids


class MoELayer(nn.Module):
    """The gate and the combine of an MoE layer; a subclass finds and runs the experts.

    Statistics of the last forward, set by :meth:`forward` (read them after a call; they are not
    parameters and not saved in the state dict):

    - ``aux_loss``: the load-balancing loss (Switch) of the primary routing, to add to the loss;
    - ``z_loss``: the router z-loss (mean squared logsumexp of the logits);
    - ``last_num_failed``: expert calls that failed or missed the deadline, i.e. chosen experts that
      lost tokens (for a remote expert with replicas: no replica answered for some of its tokens; a
      failover that answered does not count, nor do hedged calls cancelled because they were not
      needed); ``num_failed_calls`` sums it over every forward;
    - ``last_routing``: (candidate uids, experts_TK), and ``last_answered_TK``: which of those slots
      gave an output that was used.

    ``routed_tokens`` counts, per expert of the grid (flat, row-major), the tokens the gate has routed to
    it since the layer was made (each token's top-k, not its hedged spares; a Switch token dropped for
    capacity is not counted): the demand a trainer publishes (:mod:`dmoe.core.demand`) is its rate.
    """

    def __init__(self, *, prefix: str, grid: tuple[int, ...], in_features: int, k: int = 2,
                 routing: str = "topk", capacity_factor: float = 1.25, noise_std: float = 0.0,
                 hedge: int = 0):
        super().__init__()
        if not grid or any(size < 1 for size in grid):
            raise ValueError(f"grid must be a tuple of positive sizes, e.g. (8,) or (4, 16); got {grid!r}")
        if not 1 <= k <= math.prod(grid):
            raise ValueError(f"need 1 <= k <= number of experts ({math.prod(grid)}), got k={k}")
        if routing not in ("topk", "switch"):
            raise ValueError(f"routing must be 'topk' or 'switch', got {routing!r}")
        if routing == "switch" and k != 1:
            raise ValueError("switch routing sends each token to one expert: use k=1")
        if capacity_factor <= 0 or noise_std < 0:
            raise ValueError("need capacity_factor > 0 and noise_std >= 0")
        if hedge < 0 or (hedge and routing != "topk"):
            raise ValueError(f"hedge must be >= 0, and is for topk routing only; got hedge={hedge}, "
                             f"routing={routing!r}")
        self.prefix, self.grid, self.in_features, self.k = prefix, tuple(grid), in_features, k
        self.routing, self.capacity_factor, self.noise_std = routing, capacity_factor, noise_std
        self.hedge = hedge  # spare experts asked per token; the best k that answer are kept
        self.gates = nn.ModuleList(nn.Linear(in_features, size) for size in grid)
        self.aux_loss = torch.zeros(())  # load balancing (Switch), set by each forward
        self.z_loss = torch.zeros(())  # router z-loss, set by each forward
        self.last_num_failed = 0  # expert calls dropped in the last forward
        self.num_failed_calls = 0  # expert calls dropped by forwards since this layer was made
        self.last_routing: tuple[Sequence[str], torch.Tensor] | None = None  # (candidate uids, experts_TK)
        self.last_answered_TK: torch.Tensor | None = None  # which slots of last_routing gave an output
        self.routed_tokens = torch.zeros(math.prod(self.grid), dtype=torch.int64)  # see the class docstring
        self._strides = torch.tensor([math.prod(self.grid[d + 1:]) for d in range(len(self.grid))])

    # ---- what a subclass provides ----------------------------------------------------------------
    def candidates(self, scores: list[torch.Tensor]) -> list[tuple[tuple[int, ...], Any]]:
        """Experts worth scoring for these tokens: (grid coordinates, handle) for each."""
        raise NotImplementedError

    def run_experts(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, handles: list[Any]
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(out_TKD, answered_TK, num_failed) for tokens routed to candidates (index -1: routed
        nowhere): the outputs, which slots gave one, and how many expert calls failed."""
        raise NotImplementedError

    def no_candidates(self) -> None:
        """Called when no expert is available at all (the output is then zero)."""

    def uid(self, coords: tuple[int, ...]) -> str:
        return ".".join([self.prefix, *map(str, coords)])

    def beam_search(self, scores: list[torch.Tensor], beam_size: int, read: LevelReader) -> Candidates:
        """The live experts worth scoring for these tokens, in the order of their coordinates: at each
        grid level, the union of every token's best ``beam_size`` live prefixes (by the sum of their
        coordinates' scores) is expanded, all its keys in one ``read(keys, exact=...)``; coordinates
        past the grid's size are left out. For a 1-D grid this is one read of every live expert."""
        parents_PL = torch.zeros(1, 0, dtype=torch.long)  # the prefixes to expand: the grid's root
        keys = [f"{self.prefix}."]
        with torch.no_grad():
            for depth, size in enumerate(self.grid):
                last = depth == len(self.grid) - 1
                levels = read(keys, exact=last)
                counts_P = torch.tensor([len(coords) for coords, _ in levels], dtype=torch.long)
                children_C = torch.tensor(list(itertools.chain.from_iterable(coords for coords, _ in levels)),
                                          dtype=torch.long)
                prefixes_CL = torch.cat([parents_PL.repeat_interleave(counts_P, dim=0), children_C[:, None]],
                                        dim=1)
                inside_C = children_C < size
                inside = bool(inside_C.all())
                if not inside:
                    prefixes_CL = prefixes_CL[inside_C]
                if last:
                    handles = list(itertools.chain.from_iterable(handles for _, handles in levels))
                    if not inside:
                        handles = list(itertools.compress(handles, inside_C.tolist()))
                    return Candidates(self.prefix, prefixes_CL, handles)
                if prefixes_CL.shape[0] == 0:
                    break
                # the same sum, in the same order, as scoring the experts: ties break alike
                partial_TC = candidate_logits(scores[:depth + 1], prefixes_CL)
                beam_B = partial_TC.topk(min(beam_size, prefixes_CL.shape[0]), dim=-1).indices.unique().cpu()
                parents_PL = prefixes_CL[beam_B]
                if parents_PL.shape[0] == 0:
                    break
                keys = [".".join([self.prefix, *map(str, p), ""]) for p in parents_PL.tolist()]
        return Candidates(self.prefix, torch.zeros(0, len(self.grid), dtype=torch.long), [])

    # ---- the gate --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {list(x.shape)}")
        x_TD = x.reshape(-1, self.in_features)
        scores = [gate(x_TD) for gate in self.gates]  # one [T, grid[d]] per grid dimension
        found = self.candidates(scores)
        if not found:
            self.no_candidates()
            self.last_num_failed, self.last_routing = 0, None
            # no routing, no routing losses: those of the last step belong to a graph already freed
            self.aux_loss = self.z_loss = x.new_zeros(())
            return x * 0  # zero, and still a function of x for autograd
        if isinstance(found, Candidates):
            coords_CL, handles = found.coords_CL, found.handles
        else:
            coords_CL = torch.tensor([coords for coords, _ in found])
            handles = [handle for _, handle in found]
        logits_TC = candidate_logits(scores, coords_CL)
        if self.training and self.noise_std > 0:
            logits_TC = logits_TC + self.noise_std * torch.randn_like(logits_TC)
        if self.routing == "switch":
            experts_TK, gate_TK = self._switch_route(logits_TC)
        else:
            # K = k + hedge slots, best first; with hedging, the spares are the last slots
            top_logits_TK, experts_TK = logits_TC.topk(min(self.k + self.hedge, len(found)), dim=-1)
        uids = found.uids if isinstance(found, Candidates) else [self.uid(coords) for coords, _ in found]
        self.last_routing = (uids, experts_TK)
        self._count_routed(coords_CL, experts_TK[:, : self.k])
        out_TKD, answered_TK, self.last_num_failed = self.run_experts(x_TD, experts_TK, handles)
        self.num_failed_calls += self.last_num_failed
        if self.hedge:  # keep each token's best k answers (slots are sorted by gate score)
            answered_TK = answered_TK & (answered_TK.cumsum(-1) <= self.k)
        self.last_answered_TK = answered_TK
        if self.routing == "switch":  # p(expert) x its output, as Switch Transformers do; 0 if dropped
            weights_TK = gate_TK * answered_TK
        else:  # softmax over the top-k that answered
            max_T1 = top_logits_TK.max(-1, keepdim=True).values.detach()
            scores_TK = torch.exp(top_logits_TK - max_T1) * answered_TK
            tiny = torch.finfo(scores_TK.dtype).tiny
            weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True).clamp_min(tiny)
        y_TD = (weights_TK.unsqueeze(-1) * out_TKD).sum(1)
        self._set_losses(logits_TC, experts_TK[:, : self.k])  # balance the primary routing, not the spares
        return y_TD.reshape(x.shape)

    def _count_routed(self, coords_CL: torch.Tensor, experts_TK: torch.Tensor) -> None:
        """Add the tokens routed to each candidate to ``routed_tokens`` (one bincount per forward)."""
        with torch.no_grad():
            routed = experts_TK.flatten()
            counts_C = torch.bincount(routed[routed >= 0], minlength=coords_CL.shape[0]).cpu()
            self.routed_tokens.index_add_(0, (coords_CL * self._strides).sum(-1), counts_C)

    def routed_counts(self) -> np.ndarray:
        """A copy of ``routed_tokens`` (cumulative tokens routed per expert, flat over the grid)."""
        return self.routed_tokens.numpy().copy()

    def _switch_route(self, logits_TC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 with a capacity: each expert takes at most ceil(capacity_factor x T / C) tokens, in
        token order; the rest are dropped (expert index -1) and carried by the residual path."""
        num_tokens, num_candidates = logits_TC.shape
        probs_TC = logits_TC.softmax(-1)
        gate_T1, experts_T1 = probs_TC.max(-1, keepdim=True)
        capacity = math.ceil(self.capacity_factor * num_tokens / num_candidates)
        onehot_TC = torch.nn.functional.one_hot(experts_T1[:, 0], num_candidates)
        position_T = (onehot_TC.cumsum(0) * onehot_TC).sum(-1) - 1
        return experts_T1.masked_fill((position_T >= capacity)[:, None], -1), gate_T1

    def _set_losses(self, logits_TC: torch.Tensor, experts_TK: torch.Tensor) -> None:
        num_candidates = logits_TC.shape[-1]
        routed = experts_TK.flatten()
        routed_C = torch.bincount(routed[routed >= 0], minlength=num_candidates).float()
        fraction_C = routed_C / routed_C.sum().clamp_min(1)
        self.aux_loss = num_candidates * (fraction_C * logits_TC.softmax(-1).mean(0)).sum()
        self.z_loss = torch.logsumexp(logits_TC, dim=-1).square().mean()

    def extra_repr(self) -> str:
        return (f"prefix={self.prefix!r}, grid={self.grid}, in_features={self.in_features}, k={self.k}"
                + (f", hedge={self.hedge}" if self.hedge else ""))


def candidate_logits(scores: Sequence[torch.Tensor], coords_CL: torch.Tensor) -> torch.Tensor:
    """[T, C]: each token's score of each candidate, the sum over grid dimensions d < len(scores) of
    ``scores[d][:, coords_CL[:, d]]`` (index_select gives the same values a few times faster on [T,
    thousands]; the sum is taken in place, in dimension order, with no [T, C] temporary besides each
    dimension's scores: on 256 tokens and 4,032 candidates, 3.6 ms instead of 5.3)."""
    logits_TC = scores[0].index_select(1, coords_CL[:, 0].to(scores[0].device))
    for d in range(1, len(scores)):
        logits_TC = logits_TC.add_(scores[d].index_select(1, coords_CL[:, d].to(scores[d].device)))
    return logits_TC


def group_by_expert(experts_TK: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert index, token ids, slot ids) for each expert that got tokens, with one stable sort
    instead of one scan per expert; index -1 (routed nowhere) is left out."""
    flat = experts_TK.flatten()
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    sizes = counts.tolist()
    tokens, slots = order.div(experts_TK.shape[1], rounding_mode="floor"), order % experts_TK.shape[1]
    return [(e, token_ids, slot_ids) for e, token_ids, slot_ids
            in zip(experts.tolist(), tokens.split(sizes), slots.split(sizes)) if e >= 0]
