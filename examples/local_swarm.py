"""A local swarm on 127.0.0.1: a coordinator and two nodes hosting 8 experts; a client trains a small MoE through them.

The client finds the experts in the DHT, routes each token to its top-2 experts with a gate it
trains itself, calls Forward/Backward on the nodes over gRPC (the experts learn on the nodes) and
shows the loss going down. Run: ``bash scripts/demo.sh`` (or ``python examples/local_swarm.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import hivemind
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.records import find_experts, find_nodes
from dmoe.wire import deserialize, serialize

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


def train(dht: hivemind.DHT, steps: int) -> None:
    uids = [f"ffn.{i}" for i in range(NUM_EXPERTS)]
    records = find_experts(dht, uids)
    console.print(f"found {len(records)} live experts in the DHT: {', '.join(sorted(records))}")
    stubs = {uid: pbg.ExpertServiceStub(grpc.insecure_channel(r.endpoint)) for uid, r in records.items()}
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 128), torch.nn.Tanh(), torch.nn.Linear(128, HIDDEN))
    gate = torch.nn.Linear(HIDDEN, NUM_EXPERTS)
    gate_opt = torch.optim.Adam(gate.parameters(), lr=3e-3)
    pool = concurrent.futures.ThreadPoolExecutor(NUM_EXPERTS)

    def call(uid, method, *tensors):
        if method == "forward":
            reply = stubs[uid].Forward(pb.ForwardRequest(uid=uid, inputs=[serialize(tensors[0])]), timeout=10)
            return deserialize(reply.outputs[0], max_numel=1 << 24)
        request = pb.BackwardRequest(uid=uid, inputs=[serialize(tensors[0])], grad_outputs=[serialize(tensors[1])])
        return deserialize(stubs[uid].Backward(request, timeout=10).grad_inputs[0], max_numel=1 << 24)

    columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn()]
    first = last = None
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))
        for step in range(steps):
            x_TD = torch.randn(256, HIDDEN)
            with torch.no_grad():
                target_TD = teacher(x_TD)
            logits_TE = gate(x_TD)
            weights_TK, experts_TK = logits_TE.topk(K, dim=-1)
            weights_TK = weights_TK.softmax(-1)
            groups = {uids[e]: (experts_TK == e).nonzero(as_tuple=True) for e in range(NUM_EXPERTS)}
            groups = {uid: g for uid, g in groups.items() if len(g[0])}
            outs = dict(zip(groups, pool.map(lambda u: call(u, "forward", x_TD[groups[u][0]]), groups)))
            expert_out_TKD = torch.zeros(*experts_TK.shape, HIDDEN)
            for uid, (tokens, slots) in groups.items():
                expert_out_TKD[tokens, slots] = outs[uid]
            y_TD = (weights_TK.unsqueeze(-1) * expert_out_TKD).sum(1)
            loss = torch.nn.functional.mse_loss(y_TD, target_TD)
            grad_y_TD = torch.autograd.grad(loss, y_TD, retain_graph=True)[0]
            gate_opt.zero_grad()
            loss.backward()  # the gate learns from the expert outputs
            gate_opt.step()
            grads = {uid: weights_TK[t, s].detach().unsqueeze(-1) * grad_y_TD[t] for uid, (t, s) in groups.items()}
            list(pool.map(lambda u: call(u, "backward", x_TD[groups[u][0]], grads[u]), groups))
            first = loss.item() if first is None else first
            last = loss.item()
            progress.update(task, advance=1, loss=last)
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
            dht = hivemind.DHT(initial_peers=[swarm], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            train(dht, args.steps)
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
