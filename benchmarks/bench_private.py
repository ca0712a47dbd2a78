"""Benchmark: what a private swarm costs. The same RemoteMoE steps through an open swarm and through
a private one (``--swarm-key``: an HMAC token per call, checked by the node, and signed DHT traffic).

Two swarms of one node each (``ffn.[0:8]``, small experts so that per-call costs show), started
side by side; one client per swarm. Steps alternate between the two (A B A B ...), so drift on this
machine hits both alike. Reported: median and p90 step time (forward + backward, 8 expert calls
each way), the ratio private / open, and the node's own guard counters. Also the time for a
node's DHT lookup of all 8 experts (refresh, no cache) in each swarm.

Run::

    python benchmarks/bench_private.py [--steps N] [--hidden D] [--tokens T]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import server_process, summary, timed_step, write_report

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.core.auth import SwarmKey
from dmoe.moe.remote import RemoteMoE

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_EXPERTS = 8


def node_cmd(workdir: Path, name: str, hidden: int, key: Path | None) -> tuple[list[str], Path]:
    ready = workdir / f"{name}.ready.json"
    cmd = [sys.executable, "-m", "dmoe", "node", "start", "--device", "cpu",
           "--experts", f"ffn.[0:{NUM_EXPERTS}]", "--hidden-dim", str(hidden), "--num-threads", "1",
           "--ready-file", str(ready), "--lr", "1e-6"]
    if key is not None:
        cmd += ["--swarm-key", str(key)]
    return cmd, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="measured steps per swarm")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=30, help="uncached DHT lookups per swarm")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_private.json")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        key_path = workdir / "swarm.key"
        SwarmKey.generate(key_path)
        open_cmd, open_ready = node_cmd(workdir, "open", args.hidden, None)
        private_cmd, private_ready = node_cmd(workdir, "private", args.hidden, key_path)
        with server_process(open_cmd, RESULTS_DIR / "bench_private.open.log", open_ready) as open_node, \
                server_process(private_cmd, RESULTS_DIR / "bench_private.private.log",
                               private_ready) as private_node:
            swarms = {
                "open": Swarm(SwarmConfig(initial_peers=open_node["swarm"], cache_ttl=3600)).start(),
                "private": Swarm(SwarmConfig(initial_peers=private_node["swarm"], cache_ttl=3600,
                                             swarm_key=str(key_path))).start(),
            }
            try:
                torch.manual_seed(0)
                layers = {name: RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=args.hidden,
                                          k=2)
                          for name, swarm in swarms.items()}
                for layer in layers.values():  # the same gate, so both send the same calls
                    layer.load_state_dict(layers["open"].state_dict())
                lookups: dict[str, list[float]] = {name: [] for name in swarms}
                for _ in range(args.lookups):
                    for name, swarm in swarms.items():
                        started = time.perf_counter()
                        found = swarm.live_under(["ffn."], refresh=True)["ffn."]
                        lookups[name].append(time.perf_counter() - started)
                        assert len(found) == NUM_EXPERTS, (name, len(found))
                x = torch.randn(args.tokens, args.hidden)
                for _ in range(20):  # warm-up: channels, shape caches
                    for layer in layers.values():
                        timed_step(layer, x.clone())
                times: dict[str, list[float]] = {name: [] for name in swarms}
                for _ in range(args.steps):
                    for name, layer in layers.items():
                        times[name].append(timed_step(layer, x.clone()))
            finally:
                for swarm in swarms.values():
                    swarm.shutdown()
    report = {
        "config": vars(args) | {"out": str(args.out), "num_experts": NUM_EXPERTS,
                                "calls_per_step": 2 * NUM_EXPERTS},
        "step_s": {name: summary(v) for name, v in times.items()},
        "lookup_s": {name: summary(v) for name, v in lookups.items()},
    }
    report["ratio_private_over_open"] = {
        "step_median": report["step_s"]["private"]["median"] / report["step_s"]["open"]["median"],
        "lookup_median": report["lookup_s"]["private"]["median"] / report["lookup_s"]["open"]["median"],
    }
    print(f"{'swarm':<8} {'step p50 ms':>12} {'step p90 ms':>12} {'lookup p50 ms':>14} {'lookup p90 ms':>14}")
    for name in ("open", "private"):
        s, lk = report["step_s"][name], report["lookup_s"][name]
        print(f"{name:<8} {1e3 * s['median']:>12.2f} {1e3 * s['p90']:>12.2f} {1e3 * lk['median']:>14.2f} "
              f"{1e3 * lk['p90']:>14.2f}")
    ratio = report["ratio_private_over_open"]
    print(f"private / open: step {ratio['step_median']:.3f}x, lookup {ratio['lookup_median']:.3f}x "
          f"({args.steps} steps of {args.tokens} tokens, {2 * NUM_EXPERTS} calls each, hidden {args.hidden})")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
