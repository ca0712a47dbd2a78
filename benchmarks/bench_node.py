"""Benchmark: one dmoe node serving one FFN expert on CPU, against the same module run locally.

What it measures, side by side in one run:

* **local** — ``create_expert("ffn", uid="ffn.0", hidden_dim=1024)`` (Linear 1024->4096, GELU,
  Linear 4096->1024, the node's own weights) called in this process on batches of 64 tokens, with
  the torch thread count the node gets (torch's default). This is the throughput baseline; it is
  run before, between and after the two nodes and the median of the three is the reference.
* **node** — ``dmoe node start --device cpu`` in its own process (group), first with batching on,
  then (after it has stopped) with ``--no-batching``. 1, 4 and 16 clients each send batches of 64
  tokens in a closed loop (send, wait for the answer, send again) for ``--duration`` seconds after
  a ``--warmup``. The clients are asyncio tasks on one ``grpc.aio`` channel in this process (not
  the node's): that loads the node harder than sync stubs in threads, which contend for the GIL.

Modes: ``forward`` (one Forward call per step; local: forward under inference_mode) and ``train``
(a Forward then a Backward call per step; local: forward + backward + grad clipping + Adam step,
as the node's Backward does). Note the node's Backward recomputes the forward pass.

Reported per cell: samples/s (tokens/s), p50 / p99 latency per step, % of local throughput, and
errors by gRPC status (e.g. RESOURCE_EXHAUSTED). Writes ``benchmarks/results/bench_node.json``
and the node logs next to it. Client and node share this machine's cores.

Run::

    python benchmarks/bench_node.py [--duration S] [--warmup S] [--mode forward|train|both]
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


def summarize(mode: str, clients: int, batching: str, latencies: list[float], duration: float,
              errors: dict[str, int]) -> Cell:
    lat_ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([float("nan")])
    p50, p99 = (float(v) for v in np.percentile(lat_ms, [50, 99]))
    samples_per_s = len(latencies) * BATCH / duration
    return Cell(mode, clients, batching, samples_per_s, p50, p99, len(latencies), dict(errors))


def bench_local(mode: str, duration: float, warmup: float) -> Cell:
    """The expert module in this process, one batch of 64 tokens per step, closed loop."""
    module, _ = create_expert("ffn", uid=UID, hidden_dim=HIDDEN)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    x, grad = torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)

    def step() -> None:
        if mode == "forward":
            with torch.inference_mode():
                module(x)
            return
        leaf = x.clone().requires_grad_(True)
        module(leaf).backward(grad)
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)  # the node's default --max-grad-norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration
    while (t0 := time.perf_counter()) < end:
        step()
        if measure_from <= (t1 := time.perf_counter()) <= end:
            latencies.append(t1 - t0)
    return summarize(mode, 0, "local", latencies, duration, {})


async def bench_clients(endpoint: str, mode: str, clients: int, batching: str, duration: float,
                        warmup: float) -> Cell:
    """`clients` asyncio tasks on one grpc.aio channel, each in a closed loop of 64-token steps."""
    x, grad = serialize(torch.randn(BATCH, HIDDEN)), serialize(torch.randn(BATCH, HIDDEN))
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
                deserialize(out.outputs[0], max_numel=BATCH * HIDDEN)
                if mode == "train":
                    back = await stub.Backward(backward_req, timeout=CALL_TIMEOUT_S)
                    deserialize(back.grad_inputs[0], max_numel=BATCH * HIDDEN)
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
    return summarize(mode, clients, batching, latencies, duration, errors)


@contextmanager
def node_process(batching: bool, log_path: Path) -> Iterator[dict]:
    """A node in its own process group; yields its ready-file JSON; the group is killed on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        ready_file = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "dmoe", "node", "start", "--experts", "ffn.[0:1]", "--expert-cls", "ffn",
               "--hidden-dim", str(HIDDEN), "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
               "--ready-file", str(ready_file), "--batching" if batching else "--no-batching"]
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
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_node.json")
    args = parser.parse_args()
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()  # torch's default, which the node (no --num-threads) also gets
    print(f"torch threads: {threads}; {BATCH} tokens x {HIDDEN} per call; {args.duration}s per cell",
          flush=True)

    # The local baseline runs before, between and after the two nodes; the median is the reference,
    # so a burst of other load on a shared machine moves it less (all runs are kept in the JSON).
    local_runs: dict[str, list[Cell]] = {m: [] for m in modes}

    def run_local() -> None:
        for m in modes:
            local_runs[m].append(cell := bench_local(m, args.duration, args.warmup))
            cell.load_1m = os.getloadavg()[0]
            print(f"  {m} local: {cell.samples_per_s:,.0f} samples/s", flush=True)

    node_cells: list[Cell] = []
    for batching in (True, False):
        run_local()
        log_path = args.out.parent / f"bench_node_{'batching' if batching else 'no_batching'}.log"
        with node_process(batching, log_path) as ready:
            for mode in modes:
                for clients in CLIENT_COUNTS:
                    label = "on" if batching else "off"
                    cell = asyncio.run(
                        bench_clients(ready["endpoint"], mode, clients, label, args.duration, args.warmup))
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
    payload = {"torch_threads": threads, "batch_tokens": BATCH, "hidden_dim": HIDDEN,
               "duration_s": args.duration, "warmup_s": args.warmup, "cpu_count": os.cpu_count(),
               "torch": torch.__version__,
               "local_runs": {m: [dataclasses.asdict(c) for c in runs] for m, runs in local_runs.items()},
               "results": [dataclasses.asdict(c) for c in cells]}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
