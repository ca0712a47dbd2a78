"""Benchmark: one dmoe node serving one FFN expert, against the same bare module, on the same device
(the CPU, or a CUDA GPU) and in the same precision (float32, or bf16 / fp16 autocast).

What it measures, side by side in one run:

* **local** — ``create_expert("ffn", uid="ffn.0", hidden_dim=1024)`` (Linear 1024->4096, GELU,
  Linear 4096->1024, the node's own weights) called in this process on batches of 64 tokens, with
  the torch thread count the node gets (torch's default). On a GPU: the bare module, its inputs
  already on the device, under the same autocast as the node (``--precision``, bf16 by default
  there), the device synchronised after each step. This is the throughput baseline; it is
  run before, between and after the nodes and the median of the runs is the reference.
* **node** — ``dmoe node start --device D --autocast P`` in its own process (group), first with batching
  on, then (after it has stopped) with ``--no-batching``. 1, 4 and 16 clients each send batches of 64
  tokens in a closed loop (send, wait for the answer, send again) for ``--duration`` seconds after
  a ``--warmup``. The clients are asyncio tasks on one ``grpc.aio`` channel in this process (not
  the node's): that loads the node harder than sync stubs in threads, which contend for the GIL.

Modes: ``forward`` (one Forward call per step; local: forward under inference_mode) and ``train``
(a Forward then a Backward call per step; local: forward + backward + grad clipping + Adam step,
as the node's Backward does). Note the node's Backward recomputes the forward pass.

Reported per cell: samples/s (tokens/s), p50 / p99 latency per step, % of local throughput, and
errors by gRPC status (e.g. RESOURCE_EXHAUSTED); then, per mode, the node's throughput at its most
clients (batching on) as a % of the bare module's, the GPU node's goal being at least 70% in bf16.
Writes ``benchmarks/results/bench_node.json`` (``bench_node_<device>.json`` off the CPU) and the
node logs next to it. Client and node share this machine's cores.

Run::

    python benchmarks/bench_node.py [--duration S] [--warmup S] [--mode forward|train|both]
        [--device auto|cpu|cuda] [--precision fp32|bf16|fp16] [--hidden D] [--batch T]
        [--clients 1,4,16] [--batching both|on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import torch
from common import server_process

from dmoe.core.experts import create_expert
from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg

HIDDEN, BATCH, UID = 1024, 64, "ffn.0"
CLIENT_COUNTS = (1, 4, 16)
GOAL_PCT = 70.0  # the GPU node at its most clients against the bare module in bf16
AUTOCAST = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}  # --precision -> the node's --autocast
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CALL_TIMEOUT_S = 60.0


@dataclasses.dataclass(slots=True)
class Cell:
    mode: str
    clients: int  # 0: local baseline
    batching: str  # "on" | "off" | "local"
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    steps: int
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    pct_of_local: float | None = None
    load_1m: float | None = None  # 1-minute load average right after the cell (node + clients count too)


@dataclasses.dataclass(frozen=True, slots=True)
class Setup:
    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    hidden: int = HIDDEN
    batch: int = BATCH  # tokens per call and per local step
    threads: int | None = None  # torch CPU threads of the node and the bare module (None: torch's default)


def summarize(setup: Setup, mode: str, clients: int, batching: str, latencies: list[float], duration: float,
              errors: dict[str, int]) -> Cell:
    lat_ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([float("nan")])
    p50, p99 = (float(v) for v in np.percentile(lat_ms, [50, 99]))
    samples_per_s = len(latencies) * setup.batch / duration
    return Cell(mode, clients, batching, samples_per_s, p50, p99, len(latencies), dict(errors))


def bench_local(setup: Setup, mode: str, duration: float, warmup: float) -> Cell:
    """The bare expert module in this process on the setup's device and precision, one batch per step,
    closed loop (on CUDA the inputs stay on the device and each step ends with a synchronisation)."""
    device = torch.device(setup.device)
    module = create_expert("ffn", uid=UID, hidden_dim=setup.hidden)[0].to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    x, grad = (torch.randn(setup.batch, setup.hidden, device=device) for _ in range(2))
    dtype = DTYPES.get(setup.precision)
    scaler = torch.amp.GradScaler(setup.device) if dtype == torch.float16 else None
    autocast = lambda: torch.autocast(setup.device, dtype=dtype, enabled=dtype is not None)  # noqa: E731

    def step() -> None:
        if mode == "forward":
            with torch.inference_mode(), autocast():
                module(x).float()
        else:
            leaf = x.clone().requires_grad_(True)
            with autocast():
                y = module(leaf).float()
            if scaler is None:
                y.backward(grad)
            else:
                scaler.scale(y).backward(grad)
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)  # the node's default --max-grad-norm
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration
    while (t0 := time.perf_counter()) < end:
        step()
        if measure_from <= (t1 := time.perf_counter()) <= end:
            latencies.append(t1 - t0)
    return summarize(setup, mode, 0, "local", latencies, duration, {})


async def bench_clients(setup: Setup, endpoint: str, mode: str, clients: int, batching: str, duration: float,
                        warmup: float) -> Cell:
    """`clients` asyncio tasks on one grpc.aio channel, each in a closed loop of 64-token steps."""
    x, grad = (serialize(torch.randn(setup.batch, setup.hidden)) for _ in range(2))
    numel = setup.batch * setup.hidden
    forward_req = pb.ForwardRequest(uid=UID, inputs=[x])
    backward_req = pb.BackwardRequest(uid=UID, inputs=[x], grad_outputs=[grad])
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    end = measure_from + duration

    async def worker(stub: pbg.ExpertServiceStub) -> None:
        while (t0 := loop.time()) < end:
            try:
                out = await stub.Forward(forward_req, timeout=CALL_TIMEOUT_S)
                deserialize(out.outputs[0], max_numel=numel)
                if mode == "train":
                    back = await stub.Backward(backward_req, timeout=CALL_TIMEOUT_S)
                    deserialize(back.grad_inputs[0], max_numel=numel)
            except grpc.aio.AioRpcError as e:
                if loop.time() >= measure_from:
                    errors[e.code().name] += 1
                await asyncio.sleep(0.01)  # shed load: back off a little before the next call
                continue
            if measure_from <= (t1 := loop.time()) <= end:  # completed inside the measured window
                latencies.append(t1 - t0)

    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pbg.ExpertServiceStub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(clients)))
    return summarize(setup, mode, clients, batching, latencies, duration, errors)


@contextmanager
def node_process(setup: Setup, batching: bool, log_path: Path) -> Iterator[dict]:
    """A node in its own process group; yields its ready-file JSON; the group is killed on exit. On a
    GPU it sizes its batch limit by the device's memory (no --max-batch-tokens)."""
    with tempfile.TemporaryDirectory() as tmp:
        ready_file = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "dmoe", "node", "start", "--experts", "ffn.[0:1]", "--expert-cls", "ffn",
               "--hidden-dim", str(setup.hidden), "--device", setup.device,
               "--autocast", AUTOCAST[setup.precision], "--host", "127.0.0.1", "--port", "0",
               "--ready-file", str(ready_file), "--batching" if batching else "--no-batching"]
        if setup.threads is not None:
            cmd += ["--num-threads", str(setup.threads)]
        with server_process(cmd, log_path, ready_file) as ready:
            yield ready


def print_table(cells: list[Cell]) -> None:
    header = ("mode", "clients", "batching", "samples/s", "p50 ms", "p99 ms", "% of local", "errors")
    rows = [(c.mode, str(c.clients) if c.clients else "-", c.batching, f"{c.samples_per_s:,.0f}",
             f"{c.p50_ms:.1f}", f"{c.p99_ms:.1f}", "" if c.pct_of_local is None else f"{c.pct_of_local:.0f}%",
             ", ".join(f"{k}={v}" for k, v in c.errors.items()) or "0") for c in cells]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.rjust(w) if i >= 3 and i < 7 else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cols, widths)))
    print(line(header), "-" * len(line(header)), *(line(r) for r in rows), sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each cell")
    parser.add_argument("--mode", choices=("forward", "train", "both"), default="both")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the node and the bare module run (auto: cuda if torch sees one)")
    parser.add_argument("--precision", choices=tuple(AUTOCAST), default=None,
                        help="autocast of the node and the bare module (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="the expert's hidden dim (inner: 4x)")
    parser.add_argument("--batch", type=int, default=BATCH, help="tokens per call and per local step")
    parser.add_argument("--clients", default=",".join(map(str, CLIENT_COUNTS)),
                        help="comma-separated client counts")
    parser.add_argument("--batching", choices=("both", "on", "off"), default="both")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the node and the bare module (default: torch's own)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report (default: results/bench_node.json, bench_node_cuda.json on a GPU)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    setup = Setup(device=device, precision=args.precision or ("bf16" if device == "cuda" else "fp32"),
                  hidden=args.hidden, batch=args.batch, threads=args.threads)
    default_name = "bench_node.json" if device == "cpu" else f"bench_node_{device}.json"
    out: Path = args.out or RESULTS_DIR / default_name
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    client_counts = sorted(int(c) for c in args.clients.split(","))
    batchings = {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # torch's default or --threads, which the node also gets
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"device: {device} ({device_name}), precision {setup.precision}; torch threads: {threads}; "
          f"{setup.batch} tokens x {setup.hidden} per call; {args.duration}s per cell", flush=True)

    # The local baseline runs before, between and after the nodes; the median is the reference,
    # so a burst of other load on a shared machine moves it less (all runs are kept in the JSON).
    local_runs: dict[str, list[Cell]] = {m: [] for m in modes}

    def run_local() -> None:
        for m in modes:
            local_runs[m].append(cell := bench_local(setup, m, args.duration, args.warmup))
            cell.load_1m = os.getloadavg()[0]
            print(f"  {m} local: {cell.samples_per_s:,.0f} samples/s", flush=True)

    node_cells: list[Cell] = []
    for batching in batchings:
        run_local()
        log_path = out.parent / f"bench_node_{'batching' if batching else 'no_batching'}.log"
        with node_process(setup, batching, log_path) as ready:
            for mode in modes:
                for clients in client_counts:
                    label = "on" if batching else "off"
                    cell = asyncio.run(bench_clients(setup, ready["endpoint"], mode, clients, label,
                                                     args.duration, args.warmup))
                    cell.load_1m = os.getloadavg()[0]
                    print(f"  {mode} clients={clients} batching={label}: {cell.samples_per_s:,.0f} samples/s",
                          flush=True)
                    node_cells.append(cell)
    run_local()
    local = {m: sorted(runs, key=lambda c: c.samples_per_s)[len(runs) // 2] for m, runs in local_runs.items()}
    for cell in node_cells:
        cell.pct_of_local = 100 * cell.samples_per_s / local[cell.mode].samples_per_s
    order = {"on": 0, "off": 1}
    cells = [c for m in modes for c in [local[m], *sorted((c for c in node_cells if c.mode == m),
                                                          key=lambda c: (c.clients, order[c.batching]))]]
    print()
    print_table(cells)
    for m in modes:
        rates = [c.samples_per_s for c in local_runs[m]]
        print(f"local {m} runs (samples/s): {', '.join(f'{r:,.0f}' for r in rates)}; "
              f"the median is the reference")
        if max(rates) > 1.25 * min(rates):
            print(f"  warning: the local {m} baseline varied {max(rates) / min(rates):.1f}x during the run;"
                  " other load on this machine makes the % column unreliable (rerun on an idle machine)")
    goals = {}
    applies = "" if device == "cuda" and setup.precision == "bf16" else " (the goal is for a GPU in bf16)"
    for m in modes:
        most = [c.pct_of_local for c in node_cells
                if c.mode == m and c.batching == "on" and c.clients == client_counts[-1]]
        if most and most[0] is not None:
            goals[m] = pct = most[0]
            print(f"{m}: node at {client_counts[-1]} clients (batching on) = {pct:.0f}% of the bare module "
                  f"on {device} ({device_name}) in {setup.precision}; goal >= {GOAL_PCT:.0f}%: "
                  f"{'met' if pct >= GOAL_PCT else 'not met'}{applies}")
    payload = {"device": device, "device_name": device_name, "precision": setup.precision,
               "torch_threads": threads, "batch_tokens": setup.batch, "hidden_dim": setup.hidden,
               "duration_s": args.duration, "warmup_s": args.warmup, "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "goal_pct": GOAL_PCT, "node_pct_of_local_at_most_clients": goals,
               "local_runs": {m: [dataclasses.asdict(c) for c in runs] for m, runs in local_runs.items()},
               "results": [dataclasses.asdict(c) for c in cells]}
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
