"""The language model on a 4x4 grid of experts per layer, through a real swarm: ``dmoe train`` publishes
the grid in its spec, a node started with ``--model`` hosts part of it with the spec's sizes, the
trainer finds both nodes' experts by beam search and learns, ``dmoe train --grid 4x4 --resume``
continues the checkpoint, and ``dmoe infer`` generates from it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from swarm_fixtures import NodeProcess, wait_for

from dmoe.cli import main
from dmoe.client.config import SwarmConfig
from dmoe.core.modelspec import find_specs
from dmoe.core.records import find_experts
from dmoe.lm.config import InferConfig, TrainConfig
from dmoe.lm.infer import generate, load_model
from dmoe.lm.train import Trainer, load_checkpoint

pytestmark = pytest.mark.timeout(180)
MODEL = dict(d_model=16, num_heads=2, num_layers=2, grid="4x4", k=2, expert_inner=16, seq_len=16)
SIZES = ["--d-model", "16", "--num-heads", "2", "--num-layers", "2", "--grid", "4x4", "--k", "2",
         "--expert-inner", "16", "--seq-len", "16"]


def rows(first: int, last: int) -> list[str]:
    """--experts options for rows first..last-1 of both layers' 4x4 grids."""
    return [a for layer in range(2) for a in ("--experts", f"lm{layer}.[{first}:{last}].[0:4]")]


@pytest.fixture(scope="module")
def first_node(tmp_path_factory) -> Iterator[NodeProcess]:
    """Rows 0-1 of each grid, sizes given explicitly (it starts before any model is published)."""
    process = NodeProcess(tmp_path_factory.mktemp("grid"), ["--hidden-dim", "16", "--inner-dim", "16",
                                                             "--lr", "3e-3", *rows(0, 2)], "first")
    try:
        yield process.start()
    finally:
        process.cleanup()


def test_a_grid_model_trains_through_the_swarm_and_generates(first_node, node_factory, tmp_path):
    swarm = first_node.swarm
    config = TrainConfig(**MODEL, swarm=SwarmConfig(initial_peers=swarm), steps=8, batch_size=8, lr=3e-3,
                         eval_interval=0, eval_batches=2, timeout_after_k_min=30, save=str(tmp_path / "run"))
    with Trainer(config) as trainer:
        spec = wait_for(lambda: find_specs(trainer.swarm.peer).get("lm"), 30, "the trainer's spec")
        assert spec.patterns == ["lm0.[0:4].[0:4]", "lm1.[0:4].[0:4]"]
        # rows 2-3 on a node given only the model: sizes (and the spec's lr) from the spec
        second = node_factory("--swarm", swarm[0], "--model", "lm", *rows(2, 4), name="second")
        assert sorted(second.ready["experts"]) == [f"lm{i}.{a}.{b}" for i in range(2) for a in (2, 3)
                                                   for b in range(4)]
        uids = [f"lm{i}.{a}.{b}" for i in range(2) for a in range(4) for b in range(4)]
        records = wait_for(lambda: (r := find_experts(trainer.swarm.peer, uids)) and len(r) == 32 and r, 60,
                           "both nodes' experts")
        assert {rs[0].expert_schema for rs in records.values()} == {"ffn/h16/i16/float32"}
        before = trainer.evaluate()
        after = trainer.train()
        assert trainer.num_failed_calls == 0
        layers = trainer.model.moe_layers()
        assert [(layer.grid, layer.beam_size) for layer in layers] == [((4, 4), 4)] * 2
        # the beam search found every expert: routed tokens reached both nodes' rows of both grids
        for layer in layers:
            counts_AB = layer.routed_counts().reshape(4, 4)
            assert counts_AB[:2].sum() > 0 and counts_AB[2:].sum() > 0, counts_AB
        assert all(r["live_experts"] == 32 for r in trainer.history if "live_experts" in r)
        assert after < before, (before, after)
        saved_config, _, step = load_checkpoint(str(tmp_path / "run"))
        assert step == 8 and saved_config.grid_shape == (4, 4)

        # the command line: two more steps on the checkpoint, then generation from it
        result = CliRunner().invoke(main, ["train", *SIZES, "--swarm", swarm[0], "--steps", "10",
                                           "--batch-size", "8", "--lr", "3e-3", "--eval-interval", "0",
                                           "--eval-batches", "2", "--timeout-after-k-min", "30",
                                           "--save", str(tmp_path / "run"), "--resume"])
        assert result.exit_code == 0, result.output
        assert "starting at step 8" in result.output and "done: 10 steps" in result.output
        result = CliRunner().invoke(main, ["infer", "--checkpoint", str(tmp_path / "run"), "--swarm",
                                           swarm[0], "--prompt", "def ", "--max-new-tokens", "8",
                                           "--temperature", "0", "--timeout-after-k-min", "30"])
        assert result.exit_code == 0, result.output
        # the same text as load_model + generate (greedy) from the same checkpoint, every call answered
        infer = InferConfig(checkpoint=str(tmp_path / "run"), swarm=SwarmConfig(initial_peers=swarm),
                            timeout_after_k_min=30)
        model = load_model(infer, trainer.swarm)
        assert [layer.grid for layer in model.moe_layers()] == [(4, 4)] * 2
        text = generate(model, "def ", 8, temperature=0)
        assert "def " + text + "\n" in result.output and len(text) > 0
        assert all(layer.last_num_failed == 0 and len(layer.last_routing[0]) == 16
                   for layer in model.moe_layers())
