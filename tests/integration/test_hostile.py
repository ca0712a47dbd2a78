"""Hostile peers in a swarm: records that lie about where an expert is or what it takes, experts
that answer NaN, huge values, wrong shapes, garbage, or answer late on purpose. The client notices
each one, stops using it (quarantine for liars, back-off for the slow), and training goes on unharmed."""

from __future__ import annotations

import time

import pytest
import torch
from hostile import HostileServer, plant_records
from swarm_fixtures import stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(180)
HIDDEN, NUM_EXPERTS = 16, 11


def test_hostile_experts_are_detected_avoided_and_training_is_unharmed(node_factory):
    honest = node_factory("--experts", "ffn.[0:4]", "--hidden-dim", str(HIDDEN), "--lr", "0.01",
                          name="honest")
    # a node of another schema (width 8) announcing under the same prefix, and one whose expert answers NaN
    narrow = node_factory("--experts", "ffn.[4:5]", "--hidden-dim", "8", "--swarm", honest.swarm[0],
                          name="narrow")
    nan = node_factory("--experts", "ffn.[5:6]", "--hidden-dim", str(HIDDEN), "--expert-cls",
                       "experts_for_tests:NaNExpert", "--swarm", honest.swarm[0], name="nan")
    liar = HostileServer({"ffn.6": "huge", "ffn.7": "wrong_shape", "ffn.8": "garbage"}).start()
    slow = HostileServer({"ffn.9": "slow"}, slow_seconds=6.0).start()
    try:
        config = SwarmConfig(initial_peers=honest.swarm, cache_ttl=0.5, ban_base=1.0, lookup_timeout=1.0)
        with Swarm(config) as swarm:
            plant_records(swarm.peer, {uid: liar.endpoint for uid in ("ffn.6", "ffn.7", "ffn.8")})
            plant_records(swarm.peer, {"ffn.9": slow.endpoint}, node_id="slow")
            # a record that names a uid the endpoint does not host (the honest node has no ffn.10)
            plant_records(swarm.peer, {"ffn.10": honest.endpoint}, node_id="impostor")
            wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == NUM_EXPERTS, 30,
                     "every record, honest or not")

            torch.manual_seed(0)
            layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=1,
                              forward_timeout=2.0, timeout_after_k_min=0.3, backward_timeout=2.0)
            optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
            target_map = torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5
            data = torch.randn(512, HIDDEN)
            losses, step_times, liar_calls_after_warmup = [], [], None
            began, step = time.monotonic(), 0
            while step < 40 or time.monotonic() - began < 8.0:  # long enough for the slow one to be retried
                x = data[torch.randint(0, len(data), (128,))]
                started = time.monotonic()
                y = layer(x)
                loss = torch.nn.functional.mse_loss(y, x @ target_map)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_times.append(time.monotonic() - started)
                assert bool(torch.isfinite(y).all()) and torch.isfinite(loss), f"step {step}"
                assert all(bool(torch.isfinite(p).all()) for p in layer.parameters())
                losses.append(float(loss.detach()))
                if step == 4:
                    liar_calls_after_warmup = dict(liar.calls)
                step += 1

            quarantined = {
                "huge values": (liar.endpoint, "ffn.6"), "wrong shape": (liar.endpoint, "ffn.7"),
                "garbage reply": (liar.endpoint, "ffn.8"), "other schema": (narrow.endpoint, "ffn.4"),
                "NaN": (nan.endpoint, "ffn.5"), "uid not hosted": (honest.endpoint, "ffn.10"),
            }
            for what, (endpoint, uid) in quarantined.items():
                assert swarm.quarantined(endpoint, uid), f"{what}: {uid} at {endpoint} is still in use"
            assert all(liar.calls[uid] >= 1 for uid in liar.calls), liar.calls  # each was tried, and caught
            assert liar.calls == liar_calls_after_warmup, "a quarantined expert was called again"
            # the slow one is an ordinary failure: backed off, not quarantined, retried ever more rarely
            assert not swarm.quarantined(slow.endpoint, "ffn.9")
            assert swarm.health.failures(slow.endpoint) >= 2
            assert slow.calls["ffn.9"] <= 6
            # honest experts never quarantined, and they learned
            assert not any(swarm.quarantined(honest.endpoint, f"ffn.{i}") for i in range(4))
            channel, service = stub(honest.endpoint)
            versions = [e.version for e in service.Info(pb.InfoRequest(), timeout=10).experts]
            channel.close()
            assert sum(versions) > 40, versions
            # training unharmed: every step within its deadlines, and the loss went down
            deadlines = swarm.config.lookup_timeout + layer.forward_timeout + layer.backward_timeout
            assert max(step_times) < deadlines + 2.0, step_times
            assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
            # this client's own fault (values above the nodes' --max-input-abs) quarantines no honest node
            y = layer(torch.full((16, HIDDEN), 1e5))
            assert layer.last_num_failed > 0 and not bool(y.any())
            assert not any(swarm.quarantined(honest.endpoint, f"ffn.{i}") for i in range(4))
    finally:
        liar.shutdown()
        slow.shutdown()
