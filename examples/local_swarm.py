"""The main job: a local swarm on 127.0.0.1 trains a byte-level MoE language model, then writes.

A coordinator starts and publishes the model's spec (``--model spec.toml``: its expert grids and
sizes); two nodes join with only ``--swarm ADDR`` (and a budget of half the experts each): each
builds its experts from the spec and picks which ones to host, the second those the first left
without a replica. ``dmoe train`` trains the model through the swarm on the Python standard
library's sources (the gates, attention and embeddings learn here, the experts on the nodes) with
the loss on screen, ``dmoe infer`` generates text from the checkpoint through the same experts,
and a table of the swarm from the nodes' DHT records ends it.
Run: ``bash scripts/demo.sh [--steps N]`` (or ``python examples/local_swarm.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from dmoe.lm.config import LMConfig
from dmoe.lm.train import model_spec
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


def spec_toml(workdir: Path) -> Path:
    """The model's spec as ``dmoe coordinator start --model`` reads it: what ``dmoe train`` publishes."""
    spec = model_spec(MODEL)
    path = workdir / "spec.toml"
    path.write_text("\n".join([
        f'name = "{spec.name}"', f"experts = {json.dumps(spec.patterns)}",
        f'expert_cls = "{spec.expert_cls}"', f"hidden_dim = {spec.hidden_dim}",
        f"inner_dim = {spec.inner_dim}", f"version = {spec.version}", ""]))
    return path


def node_args(workdir: Path, name: str, swarm: str) -> list[str]:
    """The CLI arguments of a volunteer's node: the swarm to join, and a budget of half the experts
    (the spec sets the rest); a checkpoint folder of its own."""
    budget = MODEL.num_layers * MODEL.num_experts // 2
    return ["node", "start", "--swarm", swarm, "--max-experts", str(budget), "--device", "cpu",
            "--heartbeat-interval", "2", "--record-ttl", "20", "--checkpoint-dir", str(workdir / name)]


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
            proc, path = spawn(workdir, "coordinator", ["coordinator", "start", "--model",
                                                        str(spec_toml(workdir))])
            procs.append(proc)
            coordinator = ready(proc, path, "coordinator")
            swarm = coordinator["swarm"][0]
            console.print(f"[green]coordinator[/] up, publishing model {MODEL.prefix!r}; "
                          f"swarm address {swarm}; dashboard {coordinator['dashboard']}")
            # one after the other: the second sees what the first picked (started together, they would
            # settle the same way within a few heartbeats, by moving experts)
            for name in ("node-a", "node-b"):
                proc, path = spawn(workdir, name, node_args(workdir, name, swarm))
                procs.append(proc)
                info = ready(proc, path, name)
                console.print(f"[green]{name}[/] joined with only --swarm; picked "
                              f"{' '.join(info['experts'])} at {info['endpoint']}")
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
