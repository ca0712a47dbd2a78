"""Demand with a real node: a client training through RemoteMoE publishes the tokens/s its gate routes
to each expert; another peer reads it and computes the coverage by the node's replicas; ``dmoe swarm
status --experts`` (a subprocess) shows it, with the heatmap and the experts that no node hosts; and
``dmoe train`` publishes its demand without being asked."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from swarm_fixtures import module_node, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.demand import coverage, find_demand, grid_uids, replica_throughputs, total_demand
from dmoe.core.dht import DHTPeer
from dmoe.core.records import find_nodes
from dmoe.lm.config import TrainConfig
from dmoe.lm.train import Trainer
from dmoe.moe.remote import RemoteMoE
from dmoe.view.config import StatusConfig
from dmoe.view.status import read_view

pytestmark = pytest.mark.timeout(180)
MODEL = dict(d_model=32, num_heads=2, num_layers=2, num_experts=4, expert_inner=64, seq_len=32)
HOSTED = [f"ffn.0.{j}" for j in range(4)]  # of the 2x4 grid ffn: the row ffn.1.* has no replica

node = module_node("--experts", "ffn.0.[0:4]", "--experts", "lm0.[0:4]", "--experts", "lm1.[0:4]",
                   "--hidden-dim", "32", "--inner-dim", "64",
                   "--heartbeat-interval", "1", "--record-ttl", "10")


@pytest.fixture(scope="module")
def reader(node):
    """A peer of its own (not the trainer's) that reads what the trainers published."""
    peer = DHTPeer(initial_peers=node.swarm, client_mode=True).start()
    yield peer
    peer.shutdown()


def test_a_client_publishes_demand_and_another_peer_computes_coverage(node, reader):
    with Swarm(SwarmConfig(initial_peers=node.swarm, cache_ttl=60)) as swarm:
        wait_for(lambda: len(swarm.live_under(["ffn.0."], refresh=True)["ffn.0."]) == 4, 30, "the experts")
        torch.manual_seed(0)
        layer = RemoteMoE(swarm, prefix="ffn", grid=(2, 4), in_features=32, k=2, k_min=2,
                          timeout_after_k_min=30)
        began = time.monotonic()
        publisher = layer.publish_demand(interval=1.0)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        started = time.monotonic()
        for _ in range(6):
            loss = layer(torch.randn(64, 32)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        elapsed, trained_at = time.monotonic() - started, time.time()
        counts = layer.routed_counts()
        assert counts.sum() == 6 * 64 * 2 and layer.num_failed_calls == 0
        routed = {f"ffn.0.{j}" for j in range(4) if counts[j] > 0}
        assert counts[4:].sum() == 0  # no replica of ffn.1.*: never a candidate

        def published():
            records = find_demand(reader, ["ffn"], 30)["ffn"]
            record = records.get(swarm.peer.validator.owner.owner_id)
            if record is None or record.updated_at < trained_at:  # one made before training ended
                return None
            return record if set(record.by_uid()) == routed else None

        record = wait_for(published, 30, "the demand record made after training, read by another peer")
        assert publisher.num_published >= 1 and record.grid == [2, 4]
        # a moving average (time constant 60 s) of what was routed since publishing began: at most the
        # tokens/s of the training, at least those tokens over the time until the record was read
        rate, read_after = sum(record.by_uid().values()), time.monotonic() - began
        assert 0.5 * counts.sum() / read_after < rate < 1.2 * counts.sum() / elapsed, (rate, read_after)

        # the node's load, published on its heartbeat, gives each replica's throughput
        def measured():
            throughputs = replica_throughputs(find_nodes(reader))
            return throughputs if all(throughputs.get(uid) for uid in routed) else None

        throughputs = wait_for(measured, 30, "the node's load of its experts")
        demand = {uid: rate for uid, rate in total_demand([record]).items()}
        found = coverage(demand, throughputs, grid_uids([record]))
        for uid in routed:
            c = found[uid]
            assert c.num_replicas == 1 and c.throughput > 0
            assert c.ratio == pytest.approx(c.demand / c.throughput)
        assert [uid for uid, c in found.items() if c.uncovered] == [f"ffn.1.{j}" for j in range(4)]

        # dmoe swarm status --experts: in this process (the view) and as a user runs it (the table)
        view = read_view(StatusConfig(swarm=SwarmConfig(initial_peers=node.swarm), wait_nodes=1))
        assert view.grids == {"ffn": [2, 4]} and view.num_trainers == 1
        assert view.no_replica == [f"ffn.1.{j}" for j in range(4)]
        shown = {c.uid: c for c in view.coverage}
        assert {uid for uid, c in shown.items() if c.demand > 0} == routed
        assert all(shown[uid].ratio is not None and shown[uid].ratio > 0 for uid in routed)

        command = [sys.executable, "-m", "dmoe", "swarm", "status", "--swarm", node.swarm[0], "--experts",
                   "--wait-nodes", "1"]
        status = subprocess.run(command, capture_output=True, text=True, timeout=90,
                                env=dict(os.environ, COLUMNS="200"))
        assert status.returncode == 0, status.stderr
        text = status.stdout
        assert "demand tok/s" in text and "serves tok/s" in text
        assert "ffn 2x4: demand / throughput per expert" in text
        assert "\nXXXX\n" in text  # the row ffn.1.*: no replica
        assert ("4 expert(s) of the trainers' grids have no replica: ffn.1.0, ffn.1.1, ffn.1.2, ffn.1.3"
                in text)
        rows = [line for line in text.splitlines() if "ffn.1.0" in line and "NONE" in line]
        assert rows, text
        publisher.stop()


def test_dmoe_train_publishes_its_demand_by_default(node, reader):
    config = TrainConfig(**MODEL, swarm=SwarmConfig(initial_peers=node.swarm), steps=3, batch_size=4,
                         eval_interval=0, timeout_after_k_min=30, demand_interval=0.5)
    assert TrainConfig(**MODEL, swarm=SwarmConfig(initial_peers=node.swarm)).publish_demand
    with Trainer(config) as trainer:
        trainer.train()
        owner = trainer.swarm.peer.validator.owner.owner_id

        def published():
            found = find_demand(reader, ["lm0", "lm1"], 30)
            mine = [found[p].get(owner) for p in ("lm0", "lm1")]
            return mine if all(r is not None and r.by_uid() for r in mine) else None

        lm0, lm1 = wait_for(published, 30, "the trainer's demand records for both layers")
    assert lm0.grid == lm1.grid == [4]
    assert set(lm0.by_uid()) <= {f"lm0.{j}" for j in range(4)} and np.all(lm1.flat_rates() >= 0)
