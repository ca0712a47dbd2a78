"""RemoteMoE: a drop-in nn.Module whose experts live on other machines.

Legend for tensor names: T tokens, D model dim (in_features), E experts, K experts per token.
The gate runs here and scores every uid of the grid (``prefix.i.j``); each token goes to its
top-k live experts; each chosen expert gets its whole
sub-batch in one call, all calls in flight at once (see :mod:`dmoe.dispatch`). Experts that fail
or miss the deadline are dropped and the gate weights renormalised over those that answered; a
token with no answer contributes zero (its residual path carries it). Backward goes only to the
experts that answered, and a failed backward drops that expert's gradient, never the step.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
from torch import nn

from dmoe.dispatch import Dispatcher, ExpertCall
from dmoe.swarm import Swarm
from dmoe.wire import compression_from_name

logger = logging.getLogger(__name__)


class RemoteMoE(nn.Module):
    def __init__(
        self, swarm: Swarm, *, prefix: str, grid: tuple[int, ...], in_features: int, k: int = 2, k_min: int = 1,
        forward_timeout: float = 10.0, timeout_after_k_min: float = 1.0, backward_timeout: float = 10.0,
        compression: str = "none",
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
        self.grid = tuple(grid)
        self.uids = [".".join([prefix, *map(str, coords)]) for coords in itertools.product(*map(range, grid))]
        self.gate = nn.Linear(in_features, num_experts)
        self.dispatcher = Dispatcher(swarm.loop, compression_from_name(compression))
        self.aux_loss = torch.zeros(())  # load balancing (Switch), set by each forward
        self.z_loss = torch.zeros(())  # router z-loss, set by each forward
        self.last_num_failed = 0  # expert calls dropped in the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {list(x.shape)}")
        x_TD = x.reshape(-1, self.in_features)
        live = self.swarm.live_experts(self.uids)
        if not live:
            logger.warning("no live expert under prefix %r: is a node running with --experts '%s.[...]'?",
                           self.prefix, self.prefix)
            return torch.zeros_like(x)
        live_E = torch.tensor([uid in live for uid in self.uids])
        logits_TE = self.gate(x_TD).masked_fill(~live_E, float("-inf"))
        k = min(self.k, len(live))
        top_logits_TK, experts_TK = logits_TE.topk(k, dim=-1)
        endpoints = [live[uid].endpoint if uid in live else "" for uid in self.uids]
        out_TKD, answered_TK = _Dispatch.apply(x_TD, experts_TK, endpoints, self)
        scores_TK = torch.exp(top_logits_TK - top_logits_TK.max(-1, keepdim=True).values.detach()) * answered_TK
        weights_TK = scores_TK / scores_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_TK.dtype).tiny)
        y_TD = (weights_TK.unsqueeze(-1) * out_TKD).sum(1)
        self._set_losses(logits_TE[:, live_E], experts_TK, live_E)
        return y_TD.reshape(x.shape)

    def _set_losses(self, live_logits_TE: torch.Tensor, experts_TK: torch.Tensor, live_E: torch.Tensor) -> None:
        num_live = live_logits_TE.shape[-1]
        probs_TE = live_logits_TE.softmax(-1)
        index_of = torch.full((len(self.uids),), -1, dtype=torch.long)
        index_of[live_E] = torch.arange(num_live)
        routed_E = torch.bincount(index_of[experts_TK].flatten(), minlength=num_live).float()
        fraction_E = routed_E / routed_E.sum()
        self.aux_loss = num_live * (fraction_E * probs_TE.mean(0)).sum()
        self.z_loss = torch.logsumexp(live_logits_TE, dim=-1).square().mean()

    def extra_repr(self) -> str:
        return f"prefix={self.prefix!r}, grid={self.grid}, in_features={self.in_features}, k={self.k}"


class _Dispatch(torch.autograd.Function):
    """(x_TD, experts_TK) -> (expert outputs out_TKD, answered_TK mask), differentiable in x_TD."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, experts_TK: torch.Tensor, endpoints: list[str], layer: RemoteMoE):
        x_TD = x_TD.detach()
        calls, slots = [], []
        for e in experts_TK.unique().tolist():
            token_ids, slot_ids = (experts_TK == e).nonzero(as_tuple=True)
            calls.append(ExpertCall(layer.uids[e], endpoints[e], x_TD[token_ids], token_ids))
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
                calls.append(ExpertCall(call.uid, call.endpoint, call.inputs, call.token_ids, grad.contiguous()))
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
