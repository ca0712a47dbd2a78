"""A node that joins a training run mid-way, serving a uid of the model with another schema (here: other
hidden size), on 127.0.0.1: the trainer's client skips that replica (no call reaches it, the step is
served by the good replica), warns once naming the node, and counts it in its step records.

One good node and one trainer for the module; the bad node is started mid-run by the test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from swarm_fixtures import NodeProcess, stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.core.records import find_experts
from dmoe.lm.config import TrainConfig
from dmoe.lm.train import Trainer
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(120)
HIDDEN, INNER, NUM_EXPERTS = 16, 32, 4
GOOD_SCHEMA, BAD_SCHEMA = f"ffn/h{HIDDEN}/i{INNER}/float32", f"ffn/h8/i{INNER}/float32"
SHARED_UID = "lm0.1"


def call_stats(endpoint: str, uid: str) -> dict[str, int]:
    """The Info stats of one expert of a node: the calls it served and the requests it answered with an
    error status."""
    channel, service = stub(endpoint)
    try:
        stats = service.Info(pb.InfoRequest(uids=[uid]), timeout=10).experts[0].stats
        return {"forward_calls": stats.forward_calls, "backward_calls": stats.backward_calls,
                "errors": stats.errors, "rejected": stats.rejected}
    finally:
        channel.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("schema")


@pytest.fixture(scope="module")
def good(workdir) -> Iterator[NodeProcess]:
    process = NodeProcess(workdir, ["--experts", f"lm0.[0:{NUM_EXPERTS}]", "--hidden-dim", str(HIDDEN),
                                    "--inner-dim", str(INNER), "--average-interval", "0"], "good")
    try:
        yield process.start()
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def trainer(good, workdir) -> Iterator[Trainer]:
    text = workdir / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    config = TrainConfig(d_model=HIDDEN, num_heads=2, num_layers=1, num_experts=NUM_EXPERTS, k=2,
                         expert_inner=INNER, seq_len=16, batch_size=4, data=str(text), eval_batches=1,
                         swarm=SwarmConfig(initial_peers=good.swarm, cache_ttl=0.2))
    with Trainer(config) as trainer:
        yield trainer


def test_a_node_joining_with_another_schema_gets_no_call(good, trainer, workdir, caplog):
    assert trainer.train_step()["failed_calls"] == 0  # the run is going
    bad = NodeProcess(workdir, ["--swarm", good.swarm[0], "--experts", f"{SHARED_UID}", "--hidden-dim", "8",
                                "--inner-dim", str(INNER), "--average-interval", "0"], "bad")
    try:
        bad.start()

        def seen() -> bool:  # the trainer's DHT peer finds the bad node's replica beside the good one
            replicas = find_experts(trainer.swarm.peer, [SHARED_UID]).get(SHARED_UID, [])
            return {r.endpoint for r in replicas} == {good.endpoint, bad.endpoint}

        wait_for(seen, 30, "the bad node's record")
        assert {r.expert_schema for r in find_experts(trainer.swarm.peer, [SHARED_UID])[SHARED_UID]} == {
            GOOD_SCHEMA, BAD_SCHEMA}

        caplog.set_level(logging.WARNING, logger="dmoe.client.swarm")
        served_before = call_stats(good.endpoint, SHARED_UID)["forward_calls"]
        records = []

        def shared_uid_served_thrice() -> bool:  # steps until the gate sent tokens to the shared uid 3 times
            records.append(trainer.train_step())
            return call_stats(good.endpoint, SHARED_UID)["forward_calls"] >= served_before + 3

        wait_for(shared_uid_served_thrice, 60, "three steps that routed tokens to the shared uid", interval=0)
        assert call_stats(bad.endpoint, SHARED_UID) == {"forward_calls": 0, "backward_calls": 0, "errors": 0,
                                                        "rejected": 0}
        assert [r["failed_calls"] for r in records] == [0] * len(records)
        layer = trainer.model.moe_layers()[0]
        assert layer.num_retried_calls == 0  # no call went there and had to be re-sent to the good one

        warnings = [r.getMessage() for r in caplog.records if "replicas are skipped" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once per node, not once per step or call
        for part in (bad.ready["node_id"], bad.endpoint, SHARED_UID, BAD_SCHEMA, GOOD_SCHEMA):
            assert part in warnings[0]
        assert records[-1]["skipped_nodes"] == 1
        assert set(trainer.swarm.skipped_nodes()) == {bad.ready["node_id"]}
    finally:
        bad.cleanup()
