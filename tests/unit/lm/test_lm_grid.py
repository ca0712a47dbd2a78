"""The language model on a grid of several dimensions per layer (LMConfig.grid, beam_size): parsing,
the node patterns and published spec, LocalMoE / RemoteMoE layers built on it, and configs saved
before the options existed."""

from __future__ import annotations

import pytest
import torch

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.uids import expand_patterns
from dmoe.errors import ConfigError
from dmoe.lm.config import LMConfig, TrainConfig
from dmoe.lm.model import MoELM, local_moe_factory, num_active_params, remote_moe_factory
from dmoe.lm.train import model_spec
from dmoe.moe.local import LocalMoE
from dmoe.moe.remote import RemoteMoE

pytestmark = pytest.mark.timeout(60)

PEERS = ["/ip4/127.0.0.1/tcp/1/p2p/x"]  # never dialled: nothing here starts the swarm
SMALL = dict(d_model=16, num_heads=2, num_layers=2, seq_len=8, expert_inner=8)
# the config dict a checkpoint written before the grid options held (dmoe.lm.train.Trainer.save)
OLD_CHECKPOINT_CONFIG = {"d_model": 128, "num_layers": 2, "num_heads": 4, "seq_len": 128, "prefix": "lm",
                         "num_experts": 8, "k": 2, "expert_inner": 256, "ffn": "moe",
                         "aux_loss_weight": 0.01, "z_loss_weight": 0.001}


def test_a_grid_sets_the_experts_per_layer_and_the_node_patterns():
    config = LMConfig(grid="32x32", k=8, expert_inner=64)
    assert config.grid_shape == (32, 32) and config.num_experts == 1024
    assert config.expert_patterns() == ["lm0.[0:32].[0:32]", "lm1.[0:32].[0:32]"]
    three = LMConfig(grid="4x2x3", prefix="m")
    assert three.grid_shape == (4, 2, 3) and three.num_experts == 24
    first = expand_patterns(three.expert_patterns()[:1])
    assert first[:4] == ["m0.0.0.0", "m0.0.0.1", "m0.0.0.2", "m0.0.1.0"] and len(first) == 24
    plain = LMConfig(num_experts=6)
    assert plain.grid_shape == (6,) and plain.expert_patterns() == ["lm0.[0:6]", "lm1.[0:6]"]


@pytest.mark.parametrize("grid", ["4x", "x4", "4*4", "4x-4", "0x4", "4x4x4x4x4", "5000x2"])
def test_a_malformed_grid_is_refused(grid):
    with pytest.raises(ConfigError, match="grid"):
        LMConfig(grid=grid)


def test_beam_size_is_two_k_by_default_or_at_least_k():
    with pytest.raises(ConfigError, match="beam_size"):
        LMConfig(grid="4x4", k=4, beam_size=3)
    with pytest.raises(ConfigError, match="beam_size"):
        LMConfig(beam_size=-1)
    with pytest.raises(ConfigError, match="k \\(20\\) must be at most num_experts \\(16\\)"):
        LMConfig(grid="4x4", k=20)
    swarm = Swarm(SwarmConfig(initial_peers=PEERS))  # not started: RemoteMoE only keeps it
    try:
        default, wide = (MoELM(LMConfig(**SMALL, grid="4x4", k=3, beam_size=beam), remote_moe_factory(swarm))
                         for beam in (0, 5))
        assert [(layer.grid, layer.beam_size) for layer in default.moe_layers()] == [((4, 4), 6)] * 2
        assert [layer.beam_size for layer in wide.moe_layers()] == [5, 5]
        assert all(isinstance(layer, RemoteMoE) for layer in wide.moe_layers())
    finally:
        swarm.loop.close()


def test_the_published_spec_describes_the_grid():
    spec = model_spec(LMConfig(grid="4x8", expert_inner=64))
    assert spec.patterns == ["lm0.[0:4].[0:8]", "lm1.[0:4].[0:8]"]
    assert len(spec.uids) == 64 and spec.uids[8] == "lm0.1.0" and spec.expert_schema == "ffn/h128/i64/float32"


def test_configs_saved_before_the_grid_options_load_and_compare_equal():
    # resume compares the checkpoint's dict with the model's: an old one must still match
    old = LMConfig.from_dict(OLD_CHECKPOINT_CONFIG)
    assert old.to_dict() == OLD_CHECKPOINT_CONFIG and old.grid_shape == (8,)
    assert TrainConfig(local=True).model_config.to_dict() == OLD_CHECKPOINT_CONFIG
    new = LMConfig(grid="4x4", beam_size=4)
    assert new.to_dict()["grid"] == "4x4" and new.to_dict()["beam_size"] == 4
    assert LMConfig.from_dict(new.to_dict()) == new


def test_a_local_model_on_a_grid_learns_with_every_expert_reachable():
    torch.manual_seed(0)
    config = LMConfig(**SMALL, grid="4x4", k=2)
    model = MoELM(config, local_moe_factory())
    layers = model.moe_layers()
    assert all(isinstance(layer, LocalMoE) and layer.grid == (4, 4) and len(layer.experts) == 16
               for layer in layers)
    assert [len(layer.gates) for layer in layers] == [2, 2]  # one gate per dimension
    assert num_active_params(config) == num_active_params(LMConfig(**SMALL, k=2))  # the grid changes none
    tokens = torch.randint(0, 256, (4, config.seq_len + 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, ce = model.loss(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(ce))
    assert losses[-1] < losses[0] - 0.5, losses
    uids, experts_TK = layers[0].last_routing
    assert len(uids) == 16 and uids[5] == "lm0.1.1" and experts_TK.shape == (4 * config.seq_len, 2)
