"""The README's main job, end to end: coordinator, two nodes, training through RemoteMoE."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_demo_trains_and_the_loss_goes_down():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "local_swarm.py"), "--steps", "30"],
                            capture_output=True, text=True, timeout=220, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "found 8 live experts" in result.stdout
    assert "(down)" in result.stdout and "failed calls 0" in result.stdout
    assert "nodes stopped; checkpoints" in result.stdout
