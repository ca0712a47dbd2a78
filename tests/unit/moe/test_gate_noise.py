"""The gate's noise (``noise_std``): routing is perturbed in training only, by the amount asked."""

from __future__ import annotations

import pytest
import torch

from dmoe.moe.local import LocalMoE

pytestmark = pytest.mark.timeout(30)


def routing(layer: LocalMoE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        layer(x)
    assert layer.last_routing is not None
    return layer.last_routing[1].clone()


def test_noise_perturbs_the_routing_in_training_only():
    torch.manual_seed(0)
    noisy = LocalMoE(prefix="ffn", grid=(8,), in_features=16, k=2, noise_std=1.0)
    plain = LocalMoE(prefix="ffn", grid=(8,), in_features=16, k=2)
    plain.load_state_dict(noisy.state_dict())
    x = torch.randn(256, 16)
    exact = routing(plain.train(), x)
    assert torch.equal(routing(plain, x), exact)  # no noise: the same routing every time
    first, second = routing(noisy.train(), x), routing(noisy, x)
    # noise as large as the logits' spread moves many tokens' choices, differently each time
    assert (first != exact).any(dim=1).sum() > 256 // 4 and (first != second).any(dim=1).sum() > 256 // 4
    assert torch.equal(routing(noisy.eval(), x), exact)  # evaluation: no noise
    torch.manual_seed(7)
    again = routing(noisy.train(), x)
    torch.manual_seed(7)
    assert torch.equal(routing(noisy, x), again)  # the noise is torch's random stream: seeded runs repeat


def test_noise_must_not_be_negative():
    with pytest.raises(ValueError, match="noise_std >= 0"):
        LocalMoE(prefix="ffn", grid=(8,), in_features=16, k=2, noise_std=-0.1)
