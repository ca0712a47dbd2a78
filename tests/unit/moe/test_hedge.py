"""Hedging in the gate: each token asks k + h experts and keeps its best k answers."""

from __future__ import annotations

import pytest
import torch

from dmoe.moe.local import LocalMoE

pytestmark = pytest.mark.timeout(60)


class Flaky(LocalMoE):
    """A LocalMoE whose experts in ``dead`` never answer."""

    dead: set[int] = set()

    def run_experts(self, x_TD, experts_TK, handles):
        out_TKD, answered_TK, _ = super().run_experts(x_TD, experts_TK, handles)
        for e in self.dead:
            answered_TK = answered_TK & (experts_TK != e)
        num_failed = sum(bool((experts_TK == e).any()) for e in self.dead)  # one call per expert asked
        return out_TKD * answered_TK.unsqueeze(-1), answered_TK, num_failed


def layers(hedge: int, seed: int = 0) -> tuple[Flaky, Flaky]:
    torch.manual_seed(seed)
    plain = Flaky(prefix="ffn", grid=(6,), in_features=8, k=2, inner_dim=16)
    hedged = Flaky(prefix="ffn", grid=(6,), in_features=8, k=2, inner_dim=16, hedge=hedge)
    hedged.load_state_dict(plain.state_dict())
    return plain, hedged


def test_with_every_expert_answering_hedging_changes_nothing():
    plain, hedged = layers(hedge=2)
    x = torch.randn(32, 8)
    torch.testing.assert_close(hedged(x), plain(x))
    torch.testing.assert_close(hedged.aux_loss, plain.aux_loss)
    assert hedged.last_routing[1].shape == (32, 4) and plain.last_routing[1].shape == (32, 2)
    assert hedged.last_num_failed == plain.last_num_failed == 0


def test_a_dead_expert_is_replaced_by_the_tokens_next_best():
    plain, hedged = layers(hedge=1)
    x = torch.randn(64, 8)
    dead = int(plain.gates[0](x).argmax(-1).mode().values)  # the expert most tokens pick first
    hedged.dead = {dead}
    y = hedged(x)
    assert hedged.last_num_failed == 1 and hedged.num_failed_calls == 1  # what run_experts measured
    # the same tokens through a layer where the dead expert does not exist: each token's best two of the rest
    with torch.no_grad():
        logits = plain.gates[0](x)
        logits[:, dead] = float("-inf")
        top, chosen = logits.topk(2, dim=-1)
        weights = top.softmax(-1)
        experts = list(plain.experts)
        expected = torch.stack([sum(weights[t, j] * experts[int(chosen[t, j])](x[t]) for j in range(2))
                                for t in range(64)])
    torch.testing.assert_close(y, expected)
    plain.dead = {dead}  # without hedging, those tokens get only one expert
    assert not torch.allclose(plain(x), expected)
    assert plain.last_num_failed == 1 and plain.num_failed_calls == 1


def test_hedging_is_for_topk_routing_only():
    with pytest.raises(ValueError, match="hedge"):
        LocalMoE(prefix="ffn", grid=(4,), in_features=8, k=1, routing="switch", hedge=1)
    with pytest.raises(ValueError, match="hedge"):
        LocalMoE(prefix="ffn", grid=(4,), in_features=8, k=1, hedge=-1)
