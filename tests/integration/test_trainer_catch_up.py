"""A trainer that joins a run late starts from the run's parameters (README: "A trainer that joins late
first loads the averaged parameters from a peer"): :meth:`dmoe.lm.train.Trainer.start` catches up
with the run's averagers before its first step. Two real trainers (tests/support/run_trainer.py, each
in a process of its own: their averagers fork) of different seeds on one swarm: the second starts
once the first shares its state, and holds the first's client-side parameters, not its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from swarm_fixtures import HERE, wait_for

pytestmark = pytest.mark.timeout(180)
MODEL = dict(d_model=16, num_heads=2, num_layers=1, num_experts=2, expert_inner=32, seq_len=16)


def trainer(tmp_path, swarm: list[str], name: str, seed: int, stay: bool) -> subprocess.Popen:
    spec = dict(model=MODEL, swarm=swarm, run_id="late-start", seed=seed, out=str(tmp_path / f"{name}.pt"),
                stay=stay)
    return subprocess.Popen([sys.executable, str(HERE / "run_trainer.py"), json.dumps(spec)],
                            stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE, start_new_session=True, cwd=HERE)


def test_a_trainer_that_joins_a_run_late_starts_from_the_runs_parameters(tmp_path, dht_factory):
    bootstrap = dht_factory([])
    processes: dict[str, subprocess.Popen] = {}
    try:
        processes["first"] = trainer(tmp_path, bootstrap.visible_maddrs, "first", seed=1, stay=True)

        def first_ready() -> bool:
            if processes["first"].poll() is not None:
                log = (tmp_path / "first.log").read_text()
                raise RuntimeError(f"the first trainer exited:\n{log[-3000:]}")
            return (tmp_path / "first.pt").exists()

        wait_for(first_ready, 120, "the first trainer to share its state", interval=0.2)
        processes["late"] = trainer(tmp_path, bootstrap.visible_maddrs, "late", seed=2, stay=False)
        assert processes["late"].wait(120) == 0, (tmp_path / "late.log").read_text()[-3000:]
        first = torch.load(tmp_path / "first.pt", weights_only=True)
        late = torch.load(tmp_path / "late.pt", weights_only=True)
        assert len(late["held"]) == len(first["held"]) == len(first["initial"]) > 0
        # the first found no one to load from: it holds what it was built with
        assert all(torch.equal(a, b) for a, b in zip(first["held"], first["initial"]))
        # the late one was built with other values (another seed), and holds the first's
        assert not all(torch.equal(a, b) for a, b in zip(late["initial"], first["held"]))
        assert all(torch.equal(a, b) for a, b in zip(late["held"], first["held"]))
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the trainer, its averager and its libp2p daemon
                    proc.wait(10)
