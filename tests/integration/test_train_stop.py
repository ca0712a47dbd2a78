"""``dmoe train`` stopped by SIGTERM (as an init system or ``docker stop`` stops it) writes a checkpoint
of the step it reached, then exits 130, even far from its next periodic checkpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from swarm_fixtures import HERE, wait_for

from dmoe.errors import CheckpointError
from dmoe.lm.train import load_checkpoint

pytestmark = pytest.mark.timeout(120)
MODEL = dict(d_model=16, num_heads=2, num_layers=1, num_experts=2, expert_inner=32, seq_len=16)


def test_sigterm_writes_a_checkpoint_of_the_step_reached(tmp_path):
    save, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    args = [sys.executable, "-m", "dmoe", "train", "--local", "--data", "stdlib", "--steps", "1000000",
            "--save-interval", "1000000", "--eval-interval", "0", "--batch-size", "2", "--save", str(save),
            "--metrics-file", str(metrics)]
    for key, value in MODEL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    log = tmp_path / "train.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=HERE)
    try:
        def steps() -> int:
            if proc.poll() is not None:
                raise RuntimeError(f"dmoe train exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            return sum(1 for line in lines if "loss" in json.loads(line))

        wait_for(lambda: steps() >= 3, 60, "three training steps")
        with pytest.raises(CheckpointError):  # nothing saved yet: the next periodic save is far away
            load_checkpoint(str(save))
        seen = steps()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stopped = re.search(r"stopped at step (\d+)", log.read_text())
    assert stopped, log.read_text()[-3000:]
    _, _, step = load_checkpoint(str(save))
    assert step == int(stopped.group(1)) >= seen >= 3
