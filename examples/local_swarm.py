"""The main job: a local swarm on 127.0.0.1 trains a byte-level MoE language model, then writes.

A coordinator and two nodes start; each node hosts half of the experts of both MoE layers
(``lm0.*``, ``lm1.*``). ``dmoe train`` trains the model through the swarm on the Python standard
library's sources (the gates, attention and embeddings learn here, the experts on the nodes) with
the loss on screen, ``dmoe infer`` generates text from the checkpoint through the same experts,
and a table of the swarm from the nodes' DHT records ends it.
Run: ``bash scripts/demo.sh [--steps N]`` (or ``python examples/local_swarm.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from dmoe.lm.config import LMConfig
from dmoe.testing.process import wait_ready_file

# the defaults of dmoe train: 2 layers of 8 experts, d_model 128, experts 128 -> 256 -> 128
MODEL = LMConfig()
# soft_wrap: lines are never cut at the console's width (80 columns when the output is a file or a pipe),
# so an address or a command copied from a log is whole
console = Console(soft_wrap=True)


def spawn(workdir: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m dmoe ARGS --ready-file ...``; returns the process and its ready file."""
    ready = workdir / f"{name}.json"
    args = [sys.executable, "-m", "dmoe", *args, "--ready-file", str(ready)]
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, ready


def ready(proc: subprocess.Popen, path: Path, name: str) -> dict:
    return wait_ready_file(path, proc, 90, f"{name} (log: {path.with_suffix('.log')})")


def node_args(workdir: Path, name: str, half: int, swarm: str) -> tuple[list[str], list[str]]:
    """The CLI arguments of a node hosting half of every layer's experts, and those experts."""
    n = MODEL.num_experts // 2
    experts = [f"{MODEL.layer_prefix(i)}.[{half * n}:{half * n + n}]" for i in range(MODEL.num_layers)]
    args = ["node", "start", "--swarm", swarm, "--hidden-dim", str(MODEL.d_model), "--inner-dim",
            str(MODEL.expert_inner), "--device", "cpu", "--lr", "1e-3", "--heartbeat-interval", "2",
            "--record-ttl", "20", "--checkpoint-dir", str(workdir / name)]
    for pattern in experts:
        args += ["--experts", pattern]
    return args, experts


def run(title: str, args: list[str]) -> None:
    """Run a dmoe command in the foreground, its output on this terminal."""
    console.rule(f"[bold]{title}")
    console.print("$ dmoe " + " ".join(args), highlight=False)
    subprocess.run([sys.executable, "-m", "dmoe", *args], check=True, stdin=subprocess.DEVNULL)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps (about 0.3 s each on 2 cores)")
    parser.add_argument("--max-new-tokens", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmoe-demo-") as tmp:
        workdir, procs = Path(tmp), []
        try:
            proc, path = spawn(workdir, "coordinator", ["coordinator", "start"])
            procs.append(proc)
            coordinator = ready(proc, path, "coordinator")
            swarm = coordinator["swarm"][0]
            console.print(f"[green]coordinator[/] up; swarm address {swarm}; "
                          f"dashboard {coordinator['dashboard']}")
            nodes = []
            for half, name in enumerate(("node-a", "node-b")):  # both start at once
                argv, experts = node_args(workdir, name, half, swarm)
                proc, path = spawn(workdir, name, argv)
                procs.append(proc)
                nodes.append((name, proc, path, experts))
            for name, proc, path, experts in nodes:
                info = ready(proc, path, name)
                console.print(f"[green]{name}[/] serves {' '.join(experts)} at {info['endpoint']}")
            save = str(workdir / "model")
            eval_interval = str(max(10, args.steps // 5))
            run("training through the swarm", ["train", "--swarm", swarm, "--steps", str(args.steps),
                                               "--save", save, "--eval-interval", eval_interval])
            run("generating through the swarm", ["infer", "--swarm", swarm, "--checkpoint", save, "--prompt",
                                                 "def ", "--max-new-tokens", str(args.max_new_tokens)])
            time.sleep(2.5)  # one heartbeat, so the node records carry the calls just made
            run("the swarm, from the nodes' own records", ["swarm", "status", "--swarm", swarm])
            for proc in procs[::-1]:  # graceful stop: records withdrawn, checkpoints written
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            checkpoints = sorted(p.parent.name for p in workdir.rglob("*.safetensors"))
            console.print(f"nodes stopped; checkpoints: {checkpoints}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
