"""A local swarm on 127.0.0.1: a coordinator and two nodes hosting 8 experts; a client trains a small MoE through them.

The client (``dmoe.RemoteMoE``) finds the experts in the DHT, routes each token to its top-2 live
experts with a gate it trains itself, and calls them over gRPC with deadlines (the experts learn on
the nodes); the loss goes down on screen. Then a table of the swarm from the nodes' DHT records. Run: ``bash scripts/demo.sh`` (or ``python examples/local_swarm.py``).
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

import hivemind
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import dmoe
from dmoe.records import find_nodes

HIDDEN, NUM_EXPERTS, K = 64, 8, 2
console = Console()


def start(workdir: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m dmoe ARGS --ready-file ...`` and wait for its ready file."""
    ready = workdir / f"{name}.json"
    args = [sys.executable, "-m", "dmoe", *args, "--ready-file", str(ready)]
    log = open(workdir / f"{name}.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {workdir / name}.log")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())


def start_node(workdir: Path, name: str, experts: str, swarm: str) -> subprocess.Popen:
    proc, info = start(workdir, name, [
        "node", "start", "--swarm", swarm, "--experts", experts, "--hidden-dim", str(HIDDEN), "--device", "cpu",
        "--lr", "3e-3", "--heartbeat-interval", "2", "--record-ttl", "20", "--checkpoint-dir", str(workdir / name)])
    console.print(f"[green]{name}[/] serves {experts} at {info['endpoint']}")
    return proc


def train(swarm_address: str, steps: int) -> None:
    """A residual MoE block, x + RemoteMoE(LayerNorm(x)), fits a fixed random function."""
    with dmoe.Swarm(dmoe.SwarmConfig(initial_peers=[swarm_address])) as swarm:
        moe = dmoe.RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=K, k_min=1,
                             forward_timeout=5, timeout_after_k_min=0.5, backward_timeout=5)
        live = swarm.live_under(["ffn."])["ffn."]
        console.print(f"found {len(live)} live experts in the DHT: {', '.join(r.uid for _, r in sorted(live.items()))}")
        torch.manual_seed(0)
        teacher = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 128), torch.nn.Tanh(), torch.nn.Linear(128, HIDDEN))
        norm = torch.nn.LayerNorm(HIDDEN)
        optimizer = torch.optim.Adam([*moe.parameters(), *norm.parameters()], lr=3e-3)  # the experts learn on the nodes
        columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("failed calls {task.fields[failed]}"),
                   TimeElapsedColumn()]
        first = last = None
        failed = 0
        try:
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("train", total=steps, loss=float("nan"), failed=0)
                for _ in range(steps):
                    x_TD = torch.randn(256, HIDDEN)
                    with torch.no_grad():
                        target_TD = x_TD + teacher(x_TD)
                    y_TD = x_TD + moe(norm(x_TD))
                    loss = torch.nn.functional.mse_loss(y_TD, target_TD)
                    optimizer.zero_grad()
                    (loss + 0.01 * moe.aux_loss).backward()
                    optimizer.step()
                    failed += moe.last_num_failed
                    first = loss.item() if first is None else first
                    last = loss.item()
                    progress.update(task, advance=1, loss=last, failed=failed)
        finally:
            moe.dispatcher.close()
    console.print(f"loss {first:.4f} -> {last:.4f} ({'down' if last < first else 'NOT down'})")


def show_swarm(dht: hivemind.DHT) -> None:
    table = Table(title="swarm, from the nodes' DHT records")
    for column in ("node", "endpoint", "experts", "forward calls", "backward calls", "p50 ms"):
        table.add_column(column)
    for node_id, record in sorted(find_nodes(dht).items()):
        loads = record.load.values()
        table.add_row(node_id[-8:], record.endpoint, ", ".join(record.experts), str(sum(l.forward_calls for l in loads)),
                      str(sum(l.backward_calls for l in loads)),
                      f"{sorted(l.latency_p50_ms for l in loads)[len(record.load) // 2]:.1f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmoe-demo-") as tmp:
        workdir, procs, dht = Path(tmp), [], None
        try:
            proc, coordinator = start(workdir, "coordinator", ["coordinator", "start"])
            procs.append(proc)
            swarm = coordinator["swarm"][0]
            console.print(f"[green]coordinator[/] up; swarm address {swarm}")
            procs.append(start_node(workdir, "node-a", "ffn.[0:4]", swarm))
            procs.append(start_node(workdir, "node-b", "ffn.[4:8]", swarm))
            train(swarm, args.steps)
            dht = hivemind.DHT(initial_peers=[swarm], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            time.sleep(2.5)  # one heartbeat, so the node records carry the calls just made
            show_swarm(dht)
            for proc in procs[::-1]:  # graceful stop: records withdrawn, checkpoints written
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            console.print(f"nodes stopped; checkpoints: {sorted(p.parent.name for p in workdir.rglob('*.safetensors'))}")
        finally:
            if dht is not None:
                dht.shutdown()
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
