"""RemoteMoE: a drop-in nn.Module whose experts live on other machines.

Legend for tensor names: T tokens, D model dim (in_features), C candidate (live) experts, K experts
per token, L grid dimensions, P grid prefixes.
The gate runs here and scores every uid of the grid (``prefix.i.j``); each token goes to its
top-k live experts; each chosen expert gets its whole
sub-batch in one call, all calls in flight at once (see :mod:`dmoe.dispatch`). Experts that fail
or miss the deadline are dropped and the gate weights renormalised over those that answered; a
token with no answer contributes zero (its residual path carries it). Backward goes only to the
experts that answered, and a failed backward drops that expert's gradient, never the step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from dmoe.dispatch import ExpertCall
from dmoe.records import ExpertRecord
from dmoe.swarm import Swarm
from dmoe.wire import compression_from_name

logger = logging.getLogger(__name__)


class RemoteMoE(nn.Module):
    def __init__(
        self, swarm: Swarm, *, prefix: str, grid: tuple[int, ...], in_features: int, k: int = 2, k_min: int = 1,
        forward_timeout: float = 10.0, timeout_after_k_min: float = 1.0, backward_timeout: float = 10.0,
        compression: str = "none", beam_size: int | None = None, routing: str = "topk",
        capacity_factor: float = 1.25, noise_std: float = 0.0,
    ):
        super().__init__()
        if not grid or any(size < 1 for size in grid):
            raise ValueError(f"grid must be a tuple of positive sizes, e.g. (8,) or (4, 16); got {grid!r}")
        num_experts = math.prod(grid)
        if not 1 <= k_min <= k <= num_experts:
            raise ValueError(f"need 1 <= k_min <= k <= num_experts, got k_min={k_min}, k={k}, num_experts={num_experts}")
        if min(forward_timeout, backward_timeout) <= 0 or timeout_after_k_min < 0:
            raise ValueError("timeouts must be positive")
        self.swarm, self.prefix, self.in_features = swarm, prefix, in_features
        self.k, self.k_min = k, k_min
        self.forward_timeout, self.timeout_after_k_min = forward_timeout, timeout_after_k_min
        self.backward_timeout = backward_timeout
        if routing not in ("topk", "switch"):
            raise ValueError(f"routing must be 'topk' or 'switch', got {routing!r}")
        if routing == "switch" and k != 1:
            raise ValueError("switch routing sends each token to one expert: use k=1")
        if capacity_factor <= 0 or noise_std < 0:
            raise ValueError("need capacity_factor > 0 and noise_std >= 0")
        self.routing, self.capacity_factor, self.noise_std = routing, capacity_factor, noise_std
        self.grid = tuple(grid)
        self.beam_size = beam_size if beam_size is not None else 2 * k
        if self.beam_size < k:
            raise ValueError(f"beam_size ({self.beam_size}) must be at least k ({k})")
        # one gate per grid dimension: expert (i, j) scores gates[0](x)[i] + gates[1](x)[j]
        self.gates = nn.ModuleList(nn.Linear(in_features, size) for size in grid)
        self.dispatcher = swarm.dispatcher(compression_from_name(compression))
        self.aux_loss = torch.zeros(())  # load balancing (Switch), set by each forward
        self.z_loss = torch.zeros(())  # router z-loss, set by each forward
        self.last_num_failed = 0  # expert calls dropped in the last forward
        self.last_routing: tuple[list[str], torch.Tensor] | None = None  # (candidate uids, experts_TK) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {list(x.shape)}")
        x_TD = x.reshape(-1, self.in_features)
        scores = [gate(x_TD) for gate in self.gates]  # one [T, grid[d]] per grid dimension
        candidates = self._find_candidates(scores)
        if not candidates:
            logger.warning("no live expert under prefix %r: is a node running with --experts '%s.[...]'?",
                           self.prefix, self.prefix)
            return torch.zeros_like(x)
        coords_CL = torch.tensor([coords for coords, _ in candidates])
        records = [record for _, record in candidates]
        logits_TC = sum(score[:, coords_CL[:, d]] for d, score in enumerate(scores))
        if self.training and self.noise_std > 0:
            logits_TC = logits_TC + self.noise_std * torch.randn_like(logits_TC)
        if self.routing == "switch":
            experts_TK, gate_TK = self._switch_route(logits_TC)
        else:
            top_logits_TK, experts_TK = logits_TC.topk(min(self.k, len(candidates)), dim=-1)
        self.last_routing = ([r.uid for r in records], experts_TK)
        out_TKD, answered_TK = _Dispatch.apply(x_TD, experts_TK, records, self)
        if self.routing == "switch":  # p(expert) x its output, as Switch Transformers do; 0 if dropped
            weights_TK = gate_TK * answered_TK
        else:  # softmax over the top-k that answered
            scores_TK = torch.exp(top_logits_TK - top_logits_TK.max(-1, keepdim=True).values.detach()) * answered_TK
            weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_TK.dtype).tiny)
        y_TD = (weights_TK.unsqueeze(-1) * out_TKD).sum(1)
        self._set_losses(logits_TC, experts_TK)
        return y_TD.reshape(x.shape)

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

    def _find_candidates(self, scores: list[torch.Tensor]) -> list[tuple[tuple[int, ...], ExpertRecord]]:
        """Live experts worth scoring, found by a beam search over grid prefixes for the whole batch:
        at each level, the union of every token's best ``beam_size`` live prefixes is expanded, all
        of them in one (cached) DHT read. For a 1-D grid this is one read of every live expert."""
        root = f"{self.prefix}."
        level = self.swarm.live_under([root])[root]
        prefixes: list[tuple[int, ...]] = [(c,) for c in sorted(level) if c < self.grid[0]]
        records = {(c,): level[c] for c, in prefixes}
        for depth in range(1, len(self.grid)):
            if not prefixes:
                return []
            with torch.no_grad():
                partial_TP = sum(scores[d][:, [p[d] for p in prefixes]] for d in range(depth))
                beam = partial_TP.topk(min(self.beam_size, len(prefixes)), dim=-1).indices.unique().tolist()
            chosen = [prefixes[i] for i in beam]
            keys = {p: ".".join([self.prefix, *map(str, p)]) + "." for p in chosen}
            found = self.swarm.live_under(list(keys.values()))
            prefixes = [p + (c,) for p in chosen for c in sorted(found[keys[p]]) if c < self.grid[depth]]
            records = {p + (c,): found[keys[p]][c] for p in chosen for c in found[keys[p]] if c < self.grid[depth]}
        expected = {p: ".".join([self.prefix, *map(str, p)]) for p in prefixes}
        return [(p, records[p]) for p in prefixes if records[p].uid == expected[p]]

    def _set_losses(self, logits_TC: torch.Tensor, experts_TK: torch.Tensor) -> None:
        num_candidates = logits_TC.shape[-1]
        routed = experts_TK.flatten()
        routed_C = torch.bincount(routed[routed >= 0], minlength=num_candidates).float().clamp_min(0)
        fraction_C = routed_C / routed_C.sum().clamp_min(1)
        self.aux_loss = num_candidates * (fraction_C * logits_TC.softmax(-1).mean(0)).sum()
        self.z_loss = torch.logsumexp(logits_TC, dim=-1).square().mean()

    def extra_repr(self) -> str:
        return f"prefix={self.prefix!r}, grid={self.grid}, in_features={self.in_features}, k={self.k}"


class _Dispatch(torch.autograd.Function):
    """(x_TD, experts_TK into records) -> (outputs out_TKD, answered_TK mask), differentiable in x_TD."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, experts_TK: torch.Tensor, records: list[ExpertRecord],
                layer: RemoteMoE):
        x_TD = x_TD.detach()
        # group the (token, slot) pairs by expert with one stable sort, not one scan per expert
        flat = experts_TK.flatten()
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        calls, slots = [], []
        for e, pairs in zip(experts.tolist(), order.split(counts.tolist())):
            if e < 0:  # dropped by switch routing's capacity
                continue
            token_ids, slot_ids = pairs // experts_TK.shape[1], pairs % experts_TK.shape[1]
            calls.append(ExpertCall.to(records[e], x_TD[token_ids], token_ids))
            slots.append(slot_ids)
        results = layer.dispatcher.forward(
            calls, num_tokens=x_TD.shape[0], k_min=layer.k_min, forward_timeout=layer.forward_timeout,
            timeout_after_k_min=layer.timeout_after_k_min, on_result=_reporter(layer.swarm),
        )
        out_TKD = x_TD.new_zeros(*experts_TK.shape, x_TD.shape[-1])
        answered_TK = torch.zeros(experts_TK.shape, dtype=torch.bool)
        for index, output in results.items():
            out_TKD[calls[index].token_ids, slots[index]] = output
            answered_TK[calls[index].token_ids, slots[index]] = True
        layer.last_num_failed = len(calls) - len(results)
        ctx.layer = layer
        ctx.answered = [(calls[i], slots[i]) for i in results]
        ctx.num_tokens = x_TD.shape[0]
        ctx.mark_non_differentiable(answered_TK)
        return out_TKD, answered_TK

    @staticmethod
    def backward(ctx: Any, grad_out_TKD: torch.Tensor, _grad_answered: Any):
        calls = []
        for call, slot_ids in ctx.answered:
            grad = grad_out_TKD[call.token_ids, slot_ids]
            if bool(grad.any()):
                calls.append(dataclasses.replace(call, grad_outputs=grad.contiguous()))
        grad_x_TD = grad_out_TKD.new_zeros(ctx.num_tokens, grad_out_TKD.shape[-1])
        if calls:
            results = ctx.layer.dispatcher.backward(
                calls, backward_timeout=ctx.layer.backward_timeout, on_result=_reporter(ctx.layer.swarm)
            )
            for index, grad_in in results.items():
                grad_x_TD.index_add_(0, calls[index].token_ids, grad_in)
        return grad_x_TD, None, None, None


def _reporter(swarm: Swarm):
    def report(endpoint: str, ok: bool) -> None:
        (swarm.report_success if ok else swarm.report_failure)(endpoint)

    return report
