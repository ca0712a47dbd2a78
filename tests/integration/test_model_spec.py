"""The model published in the swarm (dmoe.core.modelspec), end to end on 127.0.0.1: a coordinator
publishes a spec from a TOML file; a node given only --swarm and --model serves its experts with its
sizes; a node whose explicit sizes disagree refuses to start, naming both; a trainer refuses a swarm
where a node serves a uid of its model with other sizes, naming the node."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from swarm_fixtures import CoordinatorProcess, stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.core.modelspec import ModelSpec, find_specs
from dmoe.core.records import find_experts
from dmoe.core.wire import deserialize, serialize
from dmoe.errors import ConfigError
from dmoe.lm.config import TrainConfig
from dmoe.lm.train import Trainer, model_spec
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(180)

SPEC_TOML = """
name = "tiny"
experts = ["tiny0.[0:2]", "tiny1.[0:2]"]
hidden_dim = 8
inner_dim = 16
optimizer = "sgd"
lr = 0.01
version = 2
"""
UIDS = ["tiny0.0", "tiny0.1", "tiny1.0", "tiny1.1"]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory) -> Iterator[CoordinatorProcess]:
    workdir = tmp_path_factory.mktemp("coordinator")
    (workdir / "spec.toml").write_text(SPEC_TOML)
    process = CoordinatorProcess(workdir, ["--model", str(workdir / "spec.toml"), "--no-offer-relay"])
    try:
        yield process.start()
    finally:
        process.cleanup()


def test_a_node_given_only_the_swarm_and_the_model_serves_its_experts(coordinator, node_factory, dht_factory):
    dht = dht_factory(coordinator.swarm)
    spec = wait_for(lambda: find_specs(dht).get("tiny"), 30, "the coordinator's spec")
    assert spec.uids == UIDS and spec.version == 2 and spec.optimizer == "sgd"

    node = node_factory("--swarm", coordinator.swarm[0], "--model", "tiny")
    assert node.ready["experts"] == UIDS
    channel, service = stub(node.endpoint)
    with channel:
        x = torch.randn(3, 8)
        reply = service.Forward(pb.ForwardRequest(uid="tiny1.1", inputs=[serialize(x)]), timeout=30)
        assert deserialize(reply.outputs[0], max_numel=1 << 20).shape == (3, 8)
        info = service.Info(pb.InfoRequest(uids=["tiny0.0"]), timeout=10).experts[0]
        assert info.uid == "tiny0.0"
    records = wait_for(lambda: (r := find_experts(dht, UIDS)) and len(r) == 4 and r, 30, "the node's records")
    assert {rs[0].expert_schema for rs in records.values()} == {"ffn/h8/i16/float32"}


def test_a_node_whose_explicit_sizes_disagree_refuses_to_start(coordinator, tmp_path):
    # no --model: the swarm's only model is followed, and the explicit --hidden-dim checked against it
    command = [sys.executable, "-m", "dmoe", "node", "start", "--swarm", coordinator.swarm[0], "--host",
               "127.0.0.1", "--device", "cpu", "--hidden-dim", "16", "--lr", "0.01"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "--hidden-dim 16 disagrees with model 'tiny', whose hidden_dim is 8" in result.stderr
    assert "--lr" not in result.stderr.split("disagrees")[-1]  # the agreeing option is not named


def test_a_trainer_refuses_a_node_serving_its_uids_with_other_sizes(coordinator, node_factory, tmp_path):
    node = node_factory("--swarm", coordinator.swarm[0], "--experts", "lm0.[0:2]", "--hidden-dim", "16",
                        "--inner-dim", "32")
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    config = TrainConfig(d_model=8, num_heads=2, num_layers=1, num_experts=2, k=1, expert_inner=16,
                         seq_len=16, batch_size=2, data=str(text),
                         swarm=SwarmConfig(initial_peers=coordinator.swarm))
    trainer = Trainer(config)
    with pytest.raises(ConfigError) as refused:
        trainer.start()
    message = str(refused.value)
    assert f"node {node.ready['node_id']} at {node.endpoint} serves lm0." in message
    assert "as ffn/h16/i32/float32, but this model needs ffn/h8/i16/float32" in message
    assert trainer.swarm is None and trainer.spec_publisher is None  # shut down, nothing published


def test_the_trainers_spec_describes_its_model():
    config = TrainConfig(d_model=8, num_heads=2, num_layers=2, num_experts=3, expert_inner=16, local=True)
    spec = model_spec(config)
    assert isinstance(spec, ModelSpec)
    assert (spec.name, spec.patterns, spec.expert_schema) == ("lm", ["lm0.[0:3]", "lm1.[0:3]"],
                                                              "ffn/h8/i16/float32")
