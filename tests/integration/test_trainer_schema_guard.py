"""A trainer refuses a swarm whose nodes serve its model's uids with other sizes only when none serves
them with its own (test_model_spec has that refusal): beside a node of the right sizes, one record of
another schema (anyone may announce one) is warned of, its replicas skipped, and the trainer starts."""

from __future__ import annotations

import pytest
from hostile import plant_records
from swarm_fixtures import wait_for

from dmoe.client.config import SwarmConfig
from dmoe.core.records import find_experts
from dmoe.lm.config import TrainConfig
from dmoe.lm.train import Trainer
from dmoe.node.joining import replicas_of

pytestmark = pytest.mark.timeout(180)
OTHER = "ffn/h16/i32/float32"


def test_one_record_of_another_schema_beside_matching_replicas_does_not_stop_a_trainer(
        dht_factory, node_factory, tmp_path, caplog):
    boot = dht_factory([])
    swarm = [boot.visible_maddrs[0]]
    node = node_factory("--swarm", swarm[0], "--experts", "lm0.[0:2]", "--hidden-dim", "8",
                        "--inner-dim", "16")
    plant_records(dht_factory(swarm), {"lm0.1": "127.0.0.1:9"}, node_id="evil", expert_schema=OTHER)

    def announced() -> set[str]:
        return {r.node_id for r in replicas_of(find_experts(boot, ["lm0.1"]).get("lm0.1"))}

    wait_for(lambda: announced() == {"evil", node.ready["node_id"]}, 30, "both records of lm0.1")
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    config = TrainConfig(d_model=8, num_heads=2, num_layers=1, num_experts=2, k=1, expert_inner=16,
                         seq_len=16, batch_size=2, data=str(text), swarm=SwarmConfig(initial_peers=swarm))
    trainer = Trainer(config)
    try:
        trainer.start()
        assert trainer.spec_publisher is not None
        assert (f"node evil at 127.0.0.1:9 serves lm0.1 as {OTHER}, but this model needs ffn/h8/i16/float32; "
                "its replicas are skipped") in caplog.text
    finally:
        trainer.shutdown()
