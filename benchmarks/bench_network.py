"""Benchmark: RemoteMoE throughput over a shaped link, against the bound that bandwidth alone sets.

The node runs in a network namespace of its own (:class:`dmoe.testing.netlab.NetLab`), behind a veth link
limited to ``--bandwidth`` Mbit/s each way by ``tc tbf``; the client reaches its gRPC endpoint
through :class:`dmoe.testing.netproxy.TcpProxy` (the node announces the proxy's port), which adds half of
``--rtt`` to each direction and counts the bytes. For each bandwidth and round-trip time it trains
(forward + backward, Adam on the node; ``--tokens`` tokens of width ``--hidden`` per step):

* **dmoe, 1 in flight**: a RemoteMoE layer, 8 FFN experts, k=2, one step at a time, with wire
  compression none, fp16 and 8-bit. A step is forward up, forward down, backward up, backward
  down: at least two round trips and some link idle, whatever the bandwidth.
* **dmoe, N in flight**: the same layer and compressions with ``--in-flight`` steps at once, as
  ``dmoe train --steps-in-flight N`` runs them (:class:`dmoe.lm.overlap.StepsInFlight`: each step on
  a replica of the layer holding the gate's parameters when it started, its gradients applied in
  order by Adam), so one step's requests go up while another's replies come down.
* **dmoe, M micro x N** (``--micro MxN``): one step at a time, its tokens cut into M micro-batches,
  N of them in flight at once (each on a replica of the layer at the step's parameters), their
  gradients summed into one Adam update: no gradient late, the link idle only between steps.
* **model-parallel**: the same compute per token (two expert evaluations) as a chain of two
  stages, each one expert on the node taking every token, one step in flight: what a
  model-parallel pipeline without micro-batching does, one stage after the other.

It reports s/step (wall time / steps, all threads together), the bytes per step in each direction
(as relayed by the proxy), the bound that the bandwidth alone sets, ``bytes of the busier direction
x 8 / bandwidth`` (the link is full duplex), the efficiency ``bound / achieved`` and tokens/s. The
JSON also has ``sequential_bound_s``, all bytes x 8 / bandwidth: the time if nothing overlapped.
Needs root (network namespaces). Writes ``benchmarks/results/bench_network.json`` and a plot
``bench_network.png`` (efficiency, and tokens/s against RTT; with matplotlib).

Run::

    sudo python benchmarks/bench_network.py [--bandwidth 10 50 100] [--rtt 0 25 50 100 200] [--steps 4]
        [--in-flight 2 4] [--micro 8x4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import pyplot

import dmoe
from dmoe.lm.overlap import StepsInFlight
from dmoe.testing.netlab import NetLab
from dmoe.testing.netproxy import TcpProxy
from dmoe.testing.process import wait_ready_file

RESULTS = Path(__file__).resolve().parent / "results"
NUM_EXPERTS, K = 8, 2
COMPRESSIONS = ("none", "fp16", "8bit")


def label(name: str, compression: str, inflight: int | str) -> str:
    if name == "micro":
        m, n = str(inflight).split("x")
        return f"dmoe {compression}, {m} micro x {n}"
    return name if name == "model-parallel" else f"dmoe {compression}, {inflight} in flight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[10, 50, 100], help="Mbit/s each way")
    parser.add_argument("--rtt", type=float, nargs="+", default=[0, 25, 50, 100, 200], help="milliseconds")
    parser.add_argument("--steps", type=int, default=4,
                        help="measured steps per thread, after one warm-up step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[2],
                        help="steps in flight of the overlapped variants (each with every compression)")
    parser.add_argument("--micro", nargs="*", default=[],
                        help="micro-batch variants MxN: each step's tokens in M micro-batches, N of them "
                             "in flight at once, their gradients summed into one update (none late)")
    args = parser.parse_args()
    # (name, compression, steps in flight); "model-parallel" is the chain of two one-expert stages
    variants = [*(("dmoe", c, n) for n in [1, *args.in_flight] for c in COMPRESSIONS),
                *(("micro", c, m) for m in args.micro for c in COMPRESSIONS),
                ("model-parallel", "none", 1)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, NetLab() as lab, TcpProxy() as proxy, \
            open(RESULTS / "bench_network_node.log", "wb") as log:
        ready = Path(tmp) / "node.json"
        node = lab.popen([sys.executable, "-m", "dmoe", "node", "start", "--host", lab.inner_ip,
                          "--port", "0", "--announce-host", "127.0.0.1", "--announce-port", str(proxy.port),
                          "--device", "cpu", "--experts", f"ffn.[0:{NUM_EXPERTS}]",
                          "--experts", "stage0.[0:1]", "--experts", "stage1.[0:1]",
                          "--hidden-dim", str(args.hidden),
                          "--max-message-bytes", str(256 << 20), "--max-request-bytes", str(256 << 20),
                          "--max-inflight-bytes", str(1 << 30), "--ready-file", str(ready)],
                         stdout=log, stderr=subprocess.STDOUT)
        info = wait_ready_file(ready, node, 120, f"the node (log: {RESULTS / 'bench_network_node.log'})")
        proxy.target = (lab.inner_ip, info["port"])
        with dmoe.Swarm(dmoe.SwarmConfig(initial_peers=info["swarm"], host=lab.outer_ip,
                                         cache_ttl=1e9)) as swarm:
            deadline = time.monotonic() + 60
            while len(swarm.live_under(["ffn."], refresh=True)["ffn."]) < NUM_EXPERTS or not all(
                    swarm.live_under([f"stage{i}."], refresh=True)[f"stage{i}."] for i in range(2)):
                if time.monotonic() > deadline:
                    raise TimeoutError("the client does not see the node's experts")
                time.sleep(0.5)
            torch.manual_seed(0)
            deadlines = dict(forward_timeout=120, timeout_after_k_min=120, backward_timeout=120)
            made: list[dmoe.RemoteMoE] = []

            def make_layer(compression: str) -> dmoe.RemoteMoE:
                torch.manual_seed(0)  # every layer and replica starts with the same gate
                made.append(dmoe.RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=args.hidden,
                                           k=K, k_min=K, compression=compression, **deadlines))
                return made[-1]

            stages = [dmoe.RemoteMoE(swarm, prefix=f"stage{i}", grid=(1,), in_features=args.hidden, k=1,
                                     **deadlines)
                      for i in range(2)]
            made += stages
            # inputs that need a gradient, as a layer's inside a model: backward then reaches the experts
            inputs = [torch.randn(args.tokens, args.hidden, requires_grad=True) for _ in range(4)]

            def trainer(name: str, compression: str, in_flight: int) -> Trainer:
                if name == "model-parallel":
                    return Trainer(lambda model, x: stages[1](stages[0](x)).square().mean().backward(),
                                   torch.nn.ModuleList(stages), None, 1)
                layer = make_layer(compression)
                if name == "micro":
                    m, n = map(int, in_flight.split("x"))
                    return Trainer(lambda model, x: model(x).square().mean().backward(), layer,
                                   lambda: make_layer(compression), n, micro_batches=m)
                return Trainer(lambda model, x: model(x).square().mean().backward(), layer,
                               lambda: make_layer(compression), in_flight)

            for mbit in args.bandwidth:
                lab.shape(mbit)
                for rtt in args.rtt:
                    proxy.delay = rtt / 2e3
                    for name, compression, inflight in variants:
                        with trainer(name, compression, inflight) as run:
                            row = measure(run, inputs, args.steps, proxy)
                        bound = row["busier_direction_bytes_per_step"] * 8 / (mbit * 1e6)
                        row.update(variant=label(name, compression, inflight), name=name,
                                   compression=compression, inflight=inflight, bandwidth_mbit=mbit,
                                   rtt_ms=rtt, bound_s=bound,
                                   sequential_bound_s=row["bytes_per_step"] * 8 / (mbit * 1e6),
                                   efficiency=bound / row["s_per_step"],
                                   tokens_per_s=args.tokens / row["s_per_step"])
                        rows.append(row)
                        print(f"{mbit:>5.0f} Mbit/s {rtt:>4.0f} ms {row['variant']:>24}: "
                              f"{row['s_per_step']:7.3f} s/step, {row['bytes_per_step'] / 1e6:6.2f} MB/step, "
                              f"bound {bound:6.3f} s, efficiency {100 * row['efficiency']:5.1f}%, "
                              f"{row['tokens_per_s']:8,.0f} tok/s",
                              flush=True)
            failed = sum(layer.num_failed_calls for layer in made)
    out = {"config": {**vars(args), "experts": NUM_EXPERTS, "k": K}, "failed_calls": failed, "results": rows}
    (RESULTS / "bench_network.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'bench_network.json'} (failed expert calls: {failed})")
    plot(rows, args)


class Trainer:
    """Training steps of ``model`` (``step(model, x)``: forward and backward), one at a time or
    ``in_flight`` at once through :class:`dmoe.lm.overlap.StepsInFlight` on replicas from
    ``make_replica``, the gate's gradients applied by Adam; with ``micro_batches`` M > 1, one step at
    a time, its M micro-batches ``in_flight`` at once, their gradients summed into one update."""

    def __init__(self, step: Callable[[torch.nn.Module, torch.Tensor], None], model: torch.nn.Module,
                 make_replica: Callable[[], torch.nn.Module] | None, in_flight: int, *,
                 micro_batches: int = 1):
        self.step_fn, self.model = step, model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.micro_batches = micro_batches
        self.summed: list[torch.Tensor | None] = [None] * len(list(model.parameters()))
        self.pipeline = None if in_flight == 1 else StepsInFlight(
            model, make_replica, in_flight=in_flight,
            apply=self.optimizer.step if micro_batches == 1 else self._sum,
            predict=micro_batches == 1, shorten=micro_batches == 1,
            warmup=0)  # it measures the wire: no steps one at a time first
        self.in_flight = 1 if micro_batches > 1 else in_flight

    def _sum(self) -> None:
        for i, p in enumerate(self.model.parameters()):
            if p.grad is not None:
                self.summed[i] = p.grad.clone() if self.summed[i] is None else self.summed[i] + p.grad

    def step(self, x: torch.Tensor) -> None:
        if self.micro_batches > 1:
            for chunk in x.chunk(self.micro_batches):
                self.pipeline.submit(lambda replica, chunk=chunk: self.step_fn(replica, chunk))
            self.pipeline.drain()
            for p, summed in zip(self.model.parameters(), self.summed):
                p.grad = summed
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.summed = [None] * len(self.summed)
            return
        if self.pipeline is None:
            self.step_fn(self.model, x)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.pipeline.submit(lambda replica: self.step_fn(replica, x))

    def drain(self) -> None:
        if self.pipeline is not None:
            self.pipeline.drain()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


def measure(trainer: Trainer, inputs: list[torch.Tensor], steps: int, proxy: TcpProxy) -> dict:
    """``in_flight`` warm-up steps, then ``steps * in_flight`` steps: s/step is the wall time over
    them all (from the first started to the last ended); bytes are the proxy's counts over the same
    span."""
    for i in range(trainer.in_flight):
        trainer.step(inputs[i % len(inputs)])
    trainer.drain()
    before = dict(proxy.num_bytes)
    total = steps * trainer.in_flight
    started = time.perf_counter()
    for i in range(total):
        trainer.step(inputs[i % len(inputs)])
    trainer.drain()
    elapsed = time.perf_counter() - started
    moved = {d: (proxy.num_bytes[d] - before[d]) / total for d in before}
    return {"s_per_step": elapsed / total, "bytes_per_step": sum(moved.values()),
            "busier_direction_bytes_per_step": max(moved.values()), "wall_s": elapsed, "steps": total}


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    plt = pyplot()
    if plt is None:
        return
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    figure, axes = plt.subplots(2, len(args.bandwidth), figsize=(4.8 * len(args.bandwidth), 7.2),
                                squeeze=False)
    for column, mbit in enumerate(args.bandwidth):
        for variant in variants:
            cells = [r for r in rows if r["bandwidth_mbit"] == mbit and r["variant"] == variant]
            rtts = [r["rtt_ms"] for r in cells]
            axes[0][column].plot(rtts, [100 * r["efficiency"] for r in cells], marker="o", label=variant)
            axes[1][column].plot(rtts, [r["tokens_per_s"] for r in cells], marker="o", label=variant)
        axes[0][column].set_title(f"{mbit:g} Mbit/s each way")
        axes[0][column].set_ylim(0, 105)
        axes[1][column].set_xlabel("round-trip time (ms)")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bandwidth bound / step time (%)")
    axes[1][0].set_ylabel("tokens / s")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "bench_network.png", dpi=110)
    print(f"plot: {RESULTS / 'bench_network.png'}")


if __name__ == "__main__":
    main()
