"""A trainer of a run for tests: starts a :class:`dmoe.lm.train.Trainer` with a run id on a swarm (what
``dmoe train --run-id`` does before its first step) and saves the client-side parameters it averages
once started. No step is trained: there need be no node.

``python run_trainer.py SPEC`` where SPEC is JSON: model (LMConfig fields), swarm (multiaddrs), run_id,
seed, out (the file the parameters are saved to with ``torch.save``: "held", those it holds once
started, and "initial", those it had when its model was built, before any catching up), and stay (bool).
With stay, it saves them only once its averager is in the DHT among those that share their state (a
trainer that starts later can load from it), then keeps running until its stdin closes.
"""

import json
import os
import sys
import time

import torch
from hivemind.p2p import PeerID

from dmoe.client.config import SwarmConfig
from dmoe.lm.config import TrainConfig
from dmoe.lm.train import Trainer


def sharing_state(trainer: Trainer, run_id: str) -> list[str]:
    """The peer ids of the run's averagers that share their state, as the DHT gives them."""
    peer = trainer.swarm.peer
    entry = peer.run(peer.node.get(f"dmoe_run_{run_id}.all_averagers", latest=True), 30)
    if entry is None or not isinstance(entry.value, dict):
        return []
    return [str(PeerID(key)) if isinstance(key, bytes) else str(key) for key in entry.value]


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = TrainConfig(**spec["model"], swarm=SwarmConfig(initial_peers=spec["swarm"]),
                         run_id=spec["run_id"], average_interval=3600.0, eval_interval=0, seed=spec["seed"])
    with Trainer(config) as trainer:
        assert trainer.averager is not None and trainer.swarm is not None
        if spec["stay"]:
            deadline = time.monotonic() + 60
            while trainer.swarm.peer.peer_id not in sharing_state(trainer, spec["run_id"]):
                if time.monotonic() > deadline:
                    raise SystemExit("this trainer's averager was never declared in the DHT")
                time.sleep(0.2)
        with trainer.averager.averager.get_tensors() as tensors:  # a copy taken when the model was built
            initial = [t.clone() for t in tensors]
        held = [p.detach().clone() for p in trainer.averager.params]
        torch.save({"held": held, "initial": initial}, spec["out"] + ".part")
        os.replace(spec["out"] + ".part", spec["out"])  # the test waits for the file: it appears whole
        if spec["stay"]:
            sys.stdin.read()


if __name__ == "__main__":
    main()
