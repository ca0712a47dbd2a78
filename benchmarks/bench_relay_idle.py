"""Benchmark: what a relay's idle timeout costs a client. A relay closes a client connection that
carried no byte either way for ``idle_timeout`` seconds (``--relay-idle-timeout``, 300 s by default);
gRPC channels send nothing between calls, so a client whose steps are further apart than that has
its channel cut, and its next step dials the relay again (the relay's ``open``, the node's
``attach``). This measures that step against one on an open channel.

A coordinator (which offers the relay, here with ``--relay-idle-timeout 1``) and one node served
through it (``--reachability relay``) on 127.0.0.1, each a process of its own; one client with one
RemoteMoE layer. Steps alternate: one right after another step (the channel open), then one after
a pause past the idle timeout (the channel cut, checked on the relay's figures in ``/api/swarm``).
Reported: median and p90 step time of each, the difference, and whether any call failed.

Run::

    python benchmarks/bench_relay_idle.py [--pairs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from common import server_process, summary, timed_step, write_report

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.moe.remote import RemoteMoE

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_EXPERTS, TOKENS, HIDDEN = 4, 64, 64
IDLE_TIMEOUT = 1.0


def relay_connections(dashboard: str) -> int:
    with urllib.request.urlopen(dashboard + "api/swarm", timeout=10) as response:
        return json.load(response)["relay"]["connections"]


def wait_until_cut(dashboard: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while relay_connections(dashboard) != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("the relay did not cut the idle channel")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="pairs of steps (open channel, cut channel)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_relay_idle.json")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"open": [], "cut": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ready = workdir / "coordinator.ready.json"
        cmd = [sys.executable, "-m", "dmoe", "coordinator", "start", "--ready-file", str(ready),
               "--relay-idle-timeout", str(IDLE_TIMEOUT)]
        with server_process(cmd, RESULTS_DIR / "bench_relay_idle.coordinator.log", ready) as coordinator:
            node_ready = workdir / "node.ready.json"
            node_cmd = [sys.executable, "-m", "dmoe", "node", "start", "--device", "cpu",
                        "--experts", f"ffn.[0:{NUM_EXPERTS}]", "--hidden-dim", str(HIDDEN),
                        "--inner-dim", str(HIDDEN), "--num-threads", "1", "--lr", "1e-6",
                        "--swarm", coordinator["swarm"][0], "--reachability", "relay",
                        "--ready-file", str(node_ready)]
            with server_process(node_cmd, RESULTS_DIR / "bench_relay_idle.node.log", node_ready), \
                    Swarm(SwarmConfig(initial_peers=coordinator["swarm"], cache_ttl=3600)) as swarm:
                torch.manual_seed(0)
                layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2)
                x = torch.randn(TOKENS, HIDDEN)
                try:
                    for _ in range(5):
                        timed_step(layer, x.clone())
                    for _ in range(args.pairs):
                        times["open"].append(timed_step(layer, x.clone()))
                        time.sleep(IDLE_TIMEOUT)
                        wait_until_cut(coordinator["dashboard"])
                        times["cut"].append(timed_step(layer, x.clone()))  # asserts no call failed
                finally:
                    layer.dispatcher.close()
    report = {name: summary(v) for name, v in times.items()}
    report["extra_ms_median"] = 1e3 * (report["cut"]["median"] - report["open"]["median"])
    report["config"] = {"pairs": args.pairs, "num_experts": NUM_EXPERTS, "tokens": TOKENS, "hidden": HIDDEN,
                        "idle_timeout": IDLE_TIMEOUT}
    print(f"{'channel':<8} {'p50 ms':>8} {'p90 ms':>8}")
    for name in ("open", "cut"):
        print(f"{name:<8} {1e3 * report[name]['median']:>8.2f} {1e3 * report[name]['p90']:>8.2f}")
    print(f"a step on a channel the relay cut while idle: {report['extra_ms_median']:+.2f} ms (medians), "
          f"no call failed in {args.pairs} cuts")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
