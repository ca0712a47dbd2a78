"""A hostile trainer for tests: joins a run's averaging with every client-side parameter set to one
value (NaN, or an absurd number) and offers them in every round until it is killed.

``python poisoned_trainer.py SPEC`` where SPEC is JSON: model (LMConfig fields), swarm (multiaddrs),
run_id, interval, value ("nan" or a number), ready (a file this writes its DHT peer id to once its
parameters are poisoned)."""

import json
import sys
import time
from pathlib import Path

import torch

from dmoe.client.config import SwarmConfig
from dmoe.lm.config import TrainConfig
from dmoe.lm.train import Trainer


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = TrainConfig(**spec["model"], swarm=SwarmConfig(initial_peers=spec["swarm"]),
                         run_id=spec["run_id"],
                         average_interval=spec["interval"], eval_interval=0, seed=1)
    with Trainer(config) as trainer:
        assert trainer.averager is not None and trainer.swarm is not None
        with torch.no_grad():
            for param in trainer.averager.params:
                param.fill_(float(spec["value"]))
        Path(spec["ready"]).write_text(trainer.swarm.peer.peer_id)
        while True:  # the averager's thread offers the poisoned parameters every interval
            time.sleep(1)


if __name__ == "__main__":
    main()
