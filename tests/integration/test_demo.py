"""The README's main job, end to end: a coordinator, two nodes, dmoe train through them, dmoe infer."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_demo_trains_the_lm_through_the_swarm_and_generates():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "local_swarm.py"), "--steps", "40",
                             "--max-new-tokens", "40"],
                            capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    # the nodes joined with only --swarm: the first picked 8 of the 16 experts, the second the other 8
    joined = r"^node-[ab] joined with only --swarm; picked (.*) at "
    picked = [m.split() for m in re.findall(joined, out, re.M)]
    assert len(picked) == 2 and all(len(p) == 8 for p in picked), picked
    assert sorted(picked[0] + picked[1]) == sorted(f"lm{i}.{j}" for i in range(2) for j in range(8))
    steps = re.findall(r"step (\d+)/40 +loss ([\d.]+) .* experts 16 +failed calls (\d+)", out)
    assert [int(s) for s, _, _ in steps] == [10, 20, 30, 40]
    heldout = [float(x) for x in re.findall(r"held-out loss ([\d.]+) nats/byte\n", out)]
    assert len(heldout) >= 2 and heldout[-1] < heldout[0]
    generated = out.split("generating through the swarm", 1)[1]
    assert "\ndef " in generated  # the prompt, followed by what the model wrote
    assert "2 nodes, 16 experts" in out  # dmoe swarm status after the run
    assert "nodes stopped; checkpoints" in out
    # what a user copies from the log is on one line, whole, though the output is a pipe (80 columns)
    address = r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/12D3KooW\w{44}"
    assert re.search(rf"^coordinator up, publishing model 'lm'; swarm address {address}; dashboard http://\S+$",
                     out, re.M)
    assert re.search(rf"^\$ dmoe train --swarm {address} --steps 40 --save \S+ --eval-interval 10$", out,
                     re.M)
