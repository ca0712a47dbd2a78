"""Replica averaging's blend: halfway to the replica, floating-point state only, all or nothing."""

from __future__ import annotations

import pytest
import torch

from dmoe.core.contribution import Refused
from dmoe.node.averaging import blend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")


def backend(uid: str = "ffn.0"):
    return build_backend(uid, NodeConfig(hidden_dim=8, inner_dim=16, optimizer="sgd", lr=0.5), CPU)


def state(b) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in b.module.state_dict().items()}


def test_blend_moves_halfway_and_keeps_the_optimizer_and_version():
    ours, theirs = backend(), backend()
    theirs.backward([torch.randn(16, 8)], [torch.randn(16, 8)])
    ours.backward([torch.randn(16, 8)], [torch.randn(16, 8)])
    before, other = state(ours), state(theirs)
    momentum = {k: v.clone() for k, v in ours.optimizer.state_dict()["state"].items()}
    spread = blend(ours, other, max_distance=4.0)
    distance = sum(float((other[k] - before[k]).square().sum()) for k in before) ** 0.5
    norm = sum(float(before[k].square().sum()) for k in before) ** 0.5
    assert spread == pytest.approx(distance / norm, rel=1e-5) and spread > 0
    for name, value in state(ours).items():
        torch.testing.assert_close(value, (before[name] + other[name]) / 2, msg=name)
    assert ours.version == 1 and ours.optimizer.state_dict()["state"].keys() == momentum.keys()


def test_a_refused_replica_changes_nothing():
    ours = backend()
    before = state(ours)
    for poison, match in [(float("nan"), "NaN"), (1e6, "times its norm")]:
        theirs = {k: torch.full_like(v, poison) for k, v in before.items()}
        with pytest.raises(Refused, match=match):
            blend(ours, theirs, max_distance=4.0)
        for name, value in state(ours).items():
            torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    with pytest.raises(Refused, match="missing"):
        blend(ours, dict(list(before.items())[1:]), max_distance=4.0)
