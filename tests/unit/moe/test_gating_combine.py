"""The gate's arithmetic (dmoe.moe.gating.MoELayer), each part against a computation written out here
from the docs: top-k weights are the softmax of the chosen logits renormalised over the experts that
answered (none: zero); Switch sends each token to its most likely expert within a capacity of
ceil(capacity_factor x T / C), in token order, weighted by that probability; the aux loss is C x
sum(fraction routed x mean probability), the z-loss the mean squared logsumexp; routed_tokens counts
each token's top-k per expert of the grid; and the constructor refuses each bad setting."""

from __future__ import annotations

import math

import pytest
import torch

from dmoe.moe.gating import Candidates, MoELayer, group_by_expert
from dmoe.moe.local import LocalMoE

pytestmark = pytest.mark.timeout(60)
D = 6


class Answering(LocalMoE):
    """A LocalMoE whose experts in ``silent`` give no answer (counted as failed calls)."""

    silent: set[int] = set()

    def run_experts(self, x_TD, experts_TK, handles):
        out_TKD, answered_TK, _ = super().run_experts(x_TD, experts_TK, handles)
        for e in self.silent:
            answered_TK = answered_TK & (experts_TK != e)
        return out_TKD * answered_TK.unsqueeze(-1), answered_TK, len(self.silent)


def _logits(layer: LocalMoE, x: torch.Tensor) -> torch.Tensor:
    """[T, C] logits of every expert, flat over the grid (row-major): the sum of each level's score."""
    scores = [gate(x) for gate in layer.gates]
    if len(scores) == 1:
        return scores[0]
    return (scores[0][:, :, None] + scores[1][:, None, :]).reshape(x.shape[0], -1)


def _topk_reference(layer: LocalMoE, x: torch.Tensor, silent: set[int]) -> torch.Tensor:
    top, chosen = _logits(layer, x).topk(layer.k, dim=-1)
    rows = []
    for t in range(x.shape[0]):
        alive = [j for j in range(layer.k) if int(chosen[t, j]) not in silent]
        if not alive:
            rows.append(torch.zeros(D))
            continue
        w = torch.softmax(top[t, alive], dim=0)
        rows.append(sum(w[i] * layer.experts[int(chosen[t, j])](x[t]) for i, j in enumerate(alive)))
    return torch.stack(rows)


@pytest.mark.parametrize("grid,k", [((5,), 2), ((2, 3), 3)])
def test_topk_weights_are_the_softmax_renormalised_over_the_experts_that_answered(grid, k):
    torch.manual_seed(0)
    layer = Answering(prefix="ffn", grid=grid, in_features=D, k=k, inner_dim=8).eval()
    x = torch.randn(4, 3, D) * 3  # [..., D] is flattened to tokens and shaped back
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _topk_reference(layer, x.reshape(-1, D), set()).reshape(x.shape))
        assert layer.last_num_failed == 0 and layer.last_answered_TK.all()
        top1 = int(_logits(layer, x.reshape(-1, D)).argmax(-1).mode().values)
        layer.silent = {top1}
        y = layer(x)
        torch.testing.assert_close(y, _topk_reference(layer, x.reshape(-1, D), {top1}).reshape(x.shape))
        assert layer.last_num_failed == 1 and layer.num_failed_calls == 1
        assert torch.equal(layer.last_answered_TK, layer.last_routing[1] != top1)
        layer.silent = set(range(math.prod(grid)))  # nobody answers: zero, not NaN
        assert torch.equal(layer(x), torch.zeros_like(x)) and layer.num_failed_calls == 1 + math.prod(grid)


def test_the_losses_and_the_routed_counts_follow_their_formulas():
    torch.manual_seed(1)
    layer = LocalMoE(prefix="ffn", grid=(2, 3), in_features=D, k=2, inner_dim=8)
    x = torch.randn(10, D)
    layer(x)
    logits = _logits(layer, x).detach()
    chosen = logits.topk(2, dim=-1).indices
    fraction = torch.bincount(chosen.flatten(), minlength=6).float() / 20
    torch.testing.assert_close(layer.aux_loss.detach(), 6 * (fraction * logits.softmax(-1).mean(0)).sum())
    torch.testing.assert_close(layer.z_loss.detach(), torch.logsumexp(logits, -1).square().mean())
    assert layer.routed_counts().tolist() == torch.bincount(chosen.flatten(), minlength=6).tolist()
    layer(x[:3])
    both = torch.cat([chosen.flatten(), chosen[:3].flatten()])
    assert layer.routed_counts().tolist() == torch.bincount(both, minlength=6).tolist()
    assert layer.uid((1, 2)) == "ffn.1.2" and layer.last_routing[0][5] == "ffn.1.2"
    assert repr(layer).startswith("LocalMoE(\n  prefix='ffn', grid=(2, 3), in_features=6, k=2\n")


def test_switch_takes_each_experts_tokens_in_order_up_to_its_capacity():
    torch.manual_seed(2)
    layer = LocalMoE(prefix="sw", grid=(3,), in_features=D, k=1, routing="switch", capacity_factor=1.0,
                     inner_dim=8)
    with torch.no_grad():
        layer.gates[0].weight.zero_()
        layer.gates[0].bias.copy_(torch.tensor([2.0, 0.0, -1.0]))  # every token prefers expert 0
        x = torch.randn(7, D)
        y = layer(x)
        capacity = math.ceil(1.0 * 7 / 3)  # 3 tokens each
        experts = layer.last_routing[1][:, 0].tolist()
        assert experts == [0] * capacity + [-1] * (7 - capacity)
        p = torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0)[0]
        want = torch.cat([p * layer.experts[0](x[:capacity]), torch.zeros(7 - capacity, D)])
        torch.testing.assert_close(y, want)
        assert layer.routed_counts().tolist() == [capacity, 0, 0]
        fraction = torch.tensor([1.0, 0.0, 0.0])
        probs = torch.softmax(layer.gates[0](x), -1)
        torch.testing.assert_close(layer.aux_loss, 3 * (fraction * probs.mean(0)).sum())
        layer.capacity_factor = 3.0  # room for all: each at its own best
        layer(x)
        assert layer.last_routing[1][:, 0].tolist() == [0] * 7


@pytest.mark.parametrize("settings,message", [
    (dict(grid=()), "grid must be"), (dict(grid=(3, 0)), "grid must be"),
    (dict(k=0), "need 1 <= k <= number of experts \\(4\\), got k=0"),
    (dict(k=5), "got k=5"), (dict(routing="top1"), "routing must be"),
    (dict(routing="switch", k=2), "use k=1"), (dict(capacity_factor=0.0), "capacity_factor > 0"),
    (dict(noise_std=-0.1), "noise_std >= 0"), (dict(hedge=-1), "hedge must be >= 0"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        LocalMoE(**{**dict(prefix="ffn", grid=(4,), in_features=D, k=1), **settings})


def test_good_settings_at_their_edges_are_taken():
    for settings in (dict(k=4), dict(k=1), dict(routing="switch", k=1, capacity_factor=0.01),
                     dict(noise_std=0.0, hedge=0), dict(grid=(1, 1), k=1)):
        layer = LocalMoE(**{**dict(prefix="ffn", grid=(4,), in_features=D, k=1), **settings})
        assert layer(torch.randn(2, D)).shape == (2, D)
    for width in (5, 7):  # narrower and wider inputs alike
        with pytest.raises(ValueError, match=rf"expected input \[\.\.\., 6\], got \[2, {width}\]"):
            layer(torch.randn(2, width))


def test_group_by_expert_leaves_out_tokens_routed_nowhere():
    experts_TK = torch.tensor([[2, 0], [-1, 2], [0, -1]])
    groups = [(e, t.tolist(), s.tolist()) for e, t, s in group_by_expert(experts_TK)]
    assert groups == [(0, [0, 2], [1, 0]), (2, [0, 1], [0, 1])]


def test_the_noise_is_noise_std_times_one_normal_draw_per_logit():
    torch.manual_seed(3)
    layer = LocalMoE(prefix="ffn", grid=(5,), in_features=D, k=2, inner_dim=8, noise_std=0.7).train()
    x = torch.randn(6, D)
    with torch.no_grad():
        torch.manual_seed(11)
        y = layer(x)
        torch.manual_seed(11)
        noisy = layer.gates[0](x) + 0.7 * torch.randn(6, 5)
        top, chosen = noisy.topk(2, dim=-1)
        w = top.softmax(-1)
        want = torch.stack([sum(w[t, j] * layer.experts[int(chosen[t, j])](x[t]) for j in range(2))
                            for t in range(6)])
    torch.testing.assert_close(y, want)
    assert torch.equal(layer.last_routing[1], chosen)


def test_large_logits_give_finite_weights():
    torch.manual_seed(4)
    layer = LocalMoE(prefix="ffn", grid=(4,), in_features=D, k=2, inner_dim=8).eval()
    with torch.no_grad():
        layer.gates[0].weight.mul_(1000.0)  # logits in the hundreds: exp() alone overflows float32
        x = torch.randn(5, D)
        y = layer(x)
        top, chosen = layer.gates[0](x).topk(2, dim=-1)
        w = top.double().softmax(-1).float()
        want = torch.stack([sum(w[t, j] * layer.experts[int(chosen[t, j])](x[t]) for j in range(2))
                            for t in range(5)])
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want)


class Empty(MoELayer):
    """A layer that finds no expert at all (a swarm with nobody serving its grid)."""

    calls = 0

    def candidates(self, scores):
        return []

    def no_candidates(self):
        self.calls += 1


def test_the_defaults_and_a_layer_that_finds_no_expert():
    layer = Empty(prefix="ffn", grid=(4,), in_features=D)
    assert (layer.k, layer.capacity_factor, layer.noise_std, layer.hedge, layer.routing) == (2, 1.25, 0.0, 0,
                                                                                           "topk")
    assert layer.last_num_failed == 0 and layer.num_failed_calls == 0 and layer.last_routing is None
    assert layer.routed_counts().tolist() == [0, 0, 0, 0]
    x = torch.randn(3, 2, D, requires_grad=True)
    layer.last_num_failed = 5  # as a step whose calls failed would leave it
    y = layer(x)
    assert torch.equal(y, torch.zeros(3, 2, D)) and layer.calls == 1
    assert layer.last_num_failed == 0  # no call was made, so none failed
    assert float(layer.aux_loss) == 0.0 and float(layer.z_loss) == 0.0 and layer.last_routing is None
    y.sum().backward()  # still a function of x: its gradient is zero, not missing
    assert torch.equal(x.grad, torch.zeros(3, 2, D))


def test_candidates_spell_their_pairs_and_uids_when_read():
    coords = torch.tensor([[0, 1], [1, 0], [1, 2]])
    found = Candidates("ffn", coords, ["a", "b", "c"])
    assert len(found) == 3 and len(found.uids) == 3 and repr(found) == "Candidates(3 experts)"
    assert list(found.uids) == ["ffn.0.1", "ffn.1.0", "ffn.1.2"] and found.uids[2] == "ffn.1.2"
    assert list(found) == [((0, 1), "a"), ((1, 0), "b"), ((1, 2), "c")] and found[1] == ((1, 0), "b")
