"""Trainers' averaging with a poisoned peer: a trainer of the same run offering NaN parameters is
refused, round after round, and the honest trainer's parameters stay finite and keep training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from swarm_fixtures import HERE, wait_for

from dmoe.lm.train import load_checkpoint

pytestmark = pytest.mark.timeout(300)
MODEL = dict(d_model=32, num_heads=2, num_layers=2, num_experts=4, expert_inner=64, seq_len=32)
RUN_ID = "guarded"


def node_args() -> list[str]:
    args = ["--hidden-dim", str(MODEL["d_model"]), "--inner-dim", str(MODEL["expert_inner"])]
    for layer in range(MODEL["num_layers"]):
        args += ["--experts", f"lm{layer}.[0:{MODEL['num_experts']}]"]
    return args


def launch(args: list[str], log_path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=HERE)


def honest_trainer(tmp_path, swarm: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "dmoe", "train", "--run-id", RUN_ID, "--average-interval", "2",
            "--steps", "100000", "--batch-size", "4", "--eval-interval", "0", "--save-interval", "1",
            "--save", str(tmp_path / "honest"), "--metrics-file", str(tmp_path / "honest.jsonl")]
    for key, value in MODEL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    for address in swarm:
        args += ["--swarm", address]
    return launch(args, tmp_path / "honest.log")


def poisoned_trainer(tmp_path, swarm: list[str]) -> subprocess.Popen:
    spec = dict(model=MODEL, swarm=swarm, run_id=RUN_ID, interval=2, value="nan",
                ready=str(tmp_path / "poisoned.peer"))
    return launch([sys.executable, str(HERE / "poisoned_trainer.py"), json.dumps(spec)],
                  tmp_path / "poisoned.log")


def steps(tmp_path) -> list[dict]:
    path = tmp_path / "honest.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_a_trainer_offering_nan_is_refused_and_the_honest_one_stays_finite(node_factory, tmp_path):
    node = node_factory(*node_args())
    processes = {"poisoned": poisoned_trainer(tmp_path, node.swarm)}
    try:
        def alive(name: str) -> None:
            if processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")

        def poisoned_ready():
            alive("poisoned")
            return (tmp_path / "poisoned.peer").exists()

        wait_for(poisoned_ready, 120, "the poisoned trainer")
        poisoned_id = (tmp_path / "poisoned.peer").read_text()
        processes["honest"] = honest_trainer(tmp_path, node.swarm)

        def refusals() -> list[str]:
            alive("honest")
            alive("poisoned")
            assert all(math.isfinite(r["loss"]) for r in steps(tmp_path)), "the honest trainer took the NaN"
            log = (tmp_path / "honest.log").read_text(errors="replace")
            return [line for line in log.splitlines() if "refused an averaging round's result" in line]

        wait_for(lambda: len(refusals()) >= 2, 180, "two refused averaging rounds", interval=0.5)
        assert all("NaN" in line and poisoned_id in line for line in refusals()), refusals()
        refused_at = steps(tmp_path)[-1]["step"]
        wait_for(lambda: steps(tmp_path)[-1]["step"] > refused_at + 2, 60, "steps past the refusals")
        assert all(math.isfinite(r["loss"]) for r in steps(tmp_path))
        assert not any("averaged_with" in json.loads(line)
                       for line in (tmp_path / "honest.jsonl").read_text().splitlines())
        _, state, step = load_checkpoint(str(tmp_path / "honest"))
        assert step > refused_at and all(bool(torch.isfinite(v).all()) for v in state.values())
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the trainer, its averager and its libp2p daemon
            proc.wait(10)
