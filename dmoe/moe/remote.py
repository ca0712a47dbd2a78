"""RemoteMoE: a drop-in nn.Module whose experts live on other machines.

The gate (:class:`dmoe.moe.gating.MoELayer`) runs here; the live experts, each with its replicas,
are found by a beam search over grid prefixes in the DHT (cached); each chosen expert gets its
sub-batch in one call to the replica expected to finish first (a big one is spread over several),
all calls in flight at once, and a replica that fails or misses its patience is replaced by another
within the deadline (see :mod:`dmoe.client.dispatch` and :mod:`dmoe.client.balance`). Experts none
of whose replicas answer in time are dropped and the gate weights renormalised over those that
answered; a token with no answer contributes zero (its residual path carries it). Backward goes
only to the replicas that answered the forward, for the tokens each answered, and a failed backward
drops that expert's gradient for those tokens, never the step.

Hedging (``hedge=h``): each token also asks its next h experts; the forward ends as soon as every
token has k answers (or, failing that, by the usual k_min rule), the calls still running are
cancelled without blame, and each token keeps its best k answers. The tail of a step is then the
k-th fastest of k + h experts, not the slowest of k.

Each call's fate is reported to the Swarm's endpoint health (:mod:`dmoe.client.health`): back-off
of endpoints that fail, quarantine of experts that misbehave.

Spot checks (``spot_check_rate`` and friends of the Swarm's config; :mod:`dmoe.client.spotcheck`):
some answers are also asked of a second replica and compared, beside the step; a replica that lied
is quarantined. A backward is not sent to a replica quarantined since it answered the forward (by a
spot check, or for any other misbehaviour of that expert there): its answers are not trusted, and
its tokens get no gradient through that expert. Closing the layer's dispatcher (the Swarm's shutdown
does) cancels the checks still in flight first.

Schema (``expert_schema``, as :func:`dmoe.core.modelspec.expert_schema` writes it, e.g.
``ffn/h128/i512/float32``; ``dmoe train`` gives its model's): replicas whose node announced another
schema are not called (a node that joined with other sizes would fail every call on shapes, or with
the same hidden size answer as another expert); the Swarm warns once per such node and lists them
(:meth:`dmoe.client.swarm.Swarm.skipped_nodes`). Records that announce no schema are called. None:
no check.

Demand (:mod:`dmoe.core.demand`): :meth:`RemoteMoE.publish_demand` publishes the tokens/s this
layer's gate routes to each expert (a moving average of ``routed_tokens``) in the DHT, through the
swarm's DHT peer, so that nodes can place themselves where the gate sends tokens; ``dmoe train``
does it for every layer unless ``--no-publish-demand``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from dmoe.client.dispatch import ExpertCall, ExpertJob
from dmoe.client.spotcheck import SpotChecker
from dmoe.client.swarm import Swarm
from dmoe.core.demand import DemandPublisher
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import compression_from_name
from dmoe.moe.gating import Candidates, MoELayer, group_by_expert

logger = logging.getLogger(__name__)


class RemoteMoE(MoELayer):
    """An MoE layer whose experts are called on the nodes of ``swarm``.

    After each forward, besides the statistics of :class:`dmoe.moe.gating.MoELayer` (``aux_loss``,
    ``z_loss``, ``last_routing``), ``last_num_failed`` is the number of chosen experts of that
    forward that lost tokens: some of their tokens got no answer because every replica asked failed
    or the deadline passed (a call answered by another replica after a failover is not counted, nor
    are hedged calls cancelled as not needed); ``num_failed_calls`` is their total since the layer
    was made. ``last_num_retried`` counts the calls of that forward re-sent to another replica (after
    a replica failed, or as a spare after a replica's patience ran out), ``num_retried_calls`` their
    total.

    Each expert may have several replicas (nodes that host its uid); the swarm's
    :class:`dmoe.client.balance.ReplicaBalancer` picks one per call, or spreads a big sub-batch over
    several, and the dispatcher fails over between them within the forward's deadline
    (:mod:`dmoe.client.dispatch`). ``spot_checker`` (:class:`dmoe.client.spotcheck.SpotChecker`, made
    from the Swarm's config) checks some answers against a second replica; its ``stats`` count what
    it did.
    """

    def __init__(
        self, swarm: Swarm, *, prefix: str, grid: tuple[int, ...], in_features: int, k: int = 2,
        k_min: int = 1, forward_timeout: float = 10.0, timeout_after_k_min: float = 1.0,
        backward_timeout: float = 10.0, compression: str = "none", beam_size: int | None = None,
        routing: str = "topk", capacity_factor: float = 1.25, noise_std: float = 0.0, hedge: int = 0,
        expert_schema: str | None = None,
    ):
        super().__init__(prefix=prefix, grid=grid, in_features=in_features, k=k, routing=routing,
                         capacity_factor=capacity_factor, noise_std=noise_std, hedge=hedge)
        if not 1 <= k_min <= k:
            raise ValueError(f"need 1 <= k_min <= k, got k_min={k_min}, k={k}")
        if min(forward_timeout, backward_timeout) <= 0 or timeout_after_k_min < 0:
            raise ValueError("timeouts must be positive")
        self.swarm, self.k_min = swarm, k_min
        self.expert_schema = expert_schema or None  # replicas announced with another one are not called
        self.forward_timeout, self.timeout_after_k_min = forward_timeout, timeout_after_k_min
        self.backward_timeout = backward_timeout
        self.beam_size = beam_size if beam_size is not None else 2 * k
        if self.beam_size < k:
            raise ValueError(f"beam_size ({self.beam_size}) must be at least k ({k})")
        self.dispatcher = swarm.dispatcher(compression_from_name(compression))
        self.dispatcher.batch_per_node = swarm.config.batch_per_node  # one call per node per step, or not
        self.dispatcher.packed_calls = swarm.config.packed_calls  # its experts' rows in one tensor, or not
        self.spot_checker = SpotChecker.from_config(swarm.config, swarm.quarantine)
        self.last_num_retried = 0  # calls of the last forward re-sent to another replica
        self.num_retried_calls = 0  # their total since this layer was made

    def publish_demand(self, publisher: DemandPublisher | None = None, **options) -> DemandPublisher:
        """Publish this layer's demand with ``publisher`` (share one among the layers of a swarm: layers
        of one prefix are summed into one record), or with a new one on the swarm's DHT peer made with
        ``options`` (:class:`dmoe.core.demand.DemandPublisher`'s: ``interval``, ``time_constant``,
        ``ttl``); it publishes every interval once started (it is, on return) and while the swarm
        runs; :meth:`DemandPublisher.publish` stores the records at once."""
        if publisher is None:
            publisher = DemandPublisher(self.swarm.peer, **options)
        elif options:
            raise TypeError("give a publisher or the options of a new one, not both")
        publisher.add(self.prefix, self.grid, self.routed_counts)
        return publisher.start()

    def no_candidates(self) -> None:
        skipped = sorted({m.uid for m in self.swarm.skipped_nodes().values()
                          if m.ours == self.expert_schema and m.uid.startswith(f"{self.prefix}.")})
        if skipped:
            logger.warning("no live expert under prefix %r with schema %s: nodes serve %s with another "
                           "one (see the warnings above)", self.prefix, self.expert_schema,
                           ", ".join(skipped[:8]))
            return
        logger.warning("no live expert under prefix %r: is a node running with --experts '%s.[...]'?",
                       self.prefix, self.prefix)

    def run_experts(self, x_TD, experts_TK, handles):
        return _Dispatch.apply(x_TD, experts_TK, handles, self, _LEARN)

    def candidates(self, scores: list[torch.Tensor]) -> Candidates:
        """Live experts worth scoring, each with its replicas (one per endpoint, none avoided), found
        by a beam search over grid prefixes for the whole batch (:meth:`MoELayer.beam_search`): at
        each level, the union of every token's best ``beam_size`` live prefixes is expanded, all of
        them in one (cached) DHT read. For a 1-D grid this is one read of every live expert. With
        ``expert_schema``, replicas announced with another schema are left out
        (:meth:`dmoe.client.swarm.Swarm.live_levels`)."""
        read = functools.partial(self.swarm.live_levels, schema=self.expert_schema)
        return self.beam_search(scores, self.beam_size, read)


# An input that always needs a gradient: autograd then calls _Dispatch.backward (the experts' Backward,
# which is how they learn) even when x_TD needs none, e.g. a RemoteMoE applied to raw features.
_LEARN = torch.empty(0, requires_grad=True)


class _Dispatch(torch.autograd.Function):
    """(x_TD, experts_TK into records) -> (outputs out_TKD, answered_TK mask, num_failed calls),
    differentiable in x_TD only. It changes nothing on the layer: the layer's forward keeps what it
    returns."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, experts_TK: torch.Tensor, replicas: list[list[ExpertRecord]],
                layer: RemoteMoE, _learn: torch.Tensor):
        x_TD = x_TD.detach()
        jobs, slots = [], []
        groups = group_by_expert(experts_TK)
        if groups:  # every expert's rows gathered at once, then cut (an index op per expert costs more)
            sizes = [token_ids.shape[0] for _, token_ids, _ in groups]
            gathered = x_TD[torch.cat([token_ids for _, token_ids, _ in groups])].split(sizes)
            for (e, token_ids, slot_ids), inputs in zip(groups, gathered):
                jobs.append(ExpertJob(replicas[e][0].uid, replicas[e], inputs, token_ids))
                slots.append(slot_ids)
        answers = layer.dispatcher.forward(
            jobs, num_tokens=x_TD.shape[0], k_min=layer.k_min, forward_timeout=layer.forward_timeout,
            timeout_after_k_min=layer.timeout_after_k_min, on_result=_reporter(layer.swarm),
            enough=layer.k if layer.hedge else 0, avoided=layer.swarm.health.is_avoided,
            spot_check=layer.spot_checker,
        )
        out_TKD = x_TD.new_zeros(*experts_TK.shape, x_TD.shape[-1])
        answered_TK = torch.zeros(experts_TK.shape, dtype=torch.bool)
        # (the call that answered, its slots): backward goes to that replica only
        ctx.answered = [(call, slots[job] if rows.shape[0] == slots[job].shape[0] else slots[job][rows])
                        for job, rows, call, _ in answers.parts]  # a whole job's rows are 0, 1, ... in order
        if ctx.answered:  # every answer in place at once: a step through many experts has hundreds
            token_ids = torch.cat([call.token_ids for call, _ in ctx.answered])
            slot_ids = torch.cat([answer_slots for _, answer_slots in ctx.answered])
            outputs = torch.cat([output for *_, output in answers.parts])
            out_TKD[token_ids, slot_ids] = outputs.to(out_TKD.dtype)
            answered_TK[token_ids, slot_ids] = True
        layer.last_num_retried = answers.num_retried
        layer.num_retried_calls += answers.num_retried
        ctx.layer = layer
        ctx.num_tokens = x_TD.shape[0]
        ctx.mark_non_differentiable(answered_TK)
        return out_TKD, answered_TK, answers.num_failed  # an int output: autograd passes it through as it is

    @staticmethod
    def backward(ctx: Any, grad_out_TKD: torch.Tensor, _grad_answered: Any, _grad_num_failed: None):
        calls = []
        quarantined = ctx.layer.swarm.quarantined
        if ctx.answered:  # every answer's output gradients gathered at once, then cut per answer
            sizes = [call.token_ids.shape[0] for call, _ in ctx.answered]
            grads = grad_out_TKD[torch.cat([call.token_ids for call, _ in ctx.answered]),
                                 torch.cat([slot_ids for _, slot_ids in ctx.answered])]
            answer_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            nonzero = torch.zeros(len(sizes), dtype=torch.int64).index_add_(
                0, answer_of_row, (grads != 0).any(dim=1).long()).tolist()
            for (call, _), grad, any_nonzero in zip(ctx.answered, grads.split(sizes), nonzero):
                if any_nonzero and not quarantined(call.endpoint, call.uid):
                    calls.append(ExpertCall(  # the answered call with its gradients (all its fields)
                        call.uid, call.endpoint, call.inputs, call.token_ids, grad, call.max_tokens,
                        call.max_unary_bytes, call.tls))
        grad_x_TD = grad_out_TKD.new_zeros(ctx.num_tokens, grad_out_TKD.shape[-1])
        if calls:
            results = ctx.layer.dispatcher.backward(
                calls, backward_timeout=ctx.layer.backward_timeout, on_result=_reporter(ctx.layer.swarm)
            )
            if results:  # one index_add_ for all answers: each torch op is a parallel region, costly
                # on a busy machine (a call per answer cost about 1 ms each there)
                grad_x_TD.index_add_(0, torch.cat([calls[i].token_ids for i in results]),
                                     torch.cat(list(results.values())))
        return grad_x_TD, None, None, None, None


def _reporter(swarm: Swarm):
    """The Dispatcher's on_result: each call's fate to the swarm's endpoint health, which also knows
    that this client's own fault (LocalInputError) is no peer's failure."""
    def report(call: ExpertCall, error: BaseException | None) -> None:
        swarm.report(call.endpoint, call.uid, error)

    return report
