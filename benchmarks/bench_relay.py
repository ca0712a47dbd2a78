"""Benchmark: what a relay costs. The same RemoteMoE steps to a node dialled directly and to a node
served through a relay (``--reachability relay``), in one run.

A coordinator (which offers the relay) and two nodes on 127.0.0.1, each a process of its own:
``direct`` hosts ``ffn.[0:8]`` and ``relayed`` hosts ``rel.[0:8]`` (same class and size). One
client, two RemoteMoE layers with the same gate; steps alternate (direct, relayed, direct, ...), so
drift on this machine hits both alike. Two sizes: small experts, where per-call costs show, and large
requests, where the relay's copying of bytes shows. Reported: median and p90 step time (forward +
backward), and the ratio relayed / direct. Also what a node's start-up check costs: a relay's
dial-back with the Info call that checks who answers, against the bare TCP dial, alternating. On
one machine the relay shares its two cores with everything else, and its hop adds no distance;
across the internet, the relay's own distance from client and node adds to each call.

Run::

    python benchmarks/bench_relay.py [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")  # a Relay runs in this process next to gRPC
                                                        # (docs/nat.md)

import torch  # noqa: E402
from common import server_process, summary, timed_step, write_report  # noqa: E402

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm  # noqa: E402
from dmoe.core.records import find_experts  # noqa: E402
from dmoe.moe.remote import RemoteMoE  # noqa: E402
from dmoe.relay.limits import RelayLimits
from dmoe.relay.protocol import probe  # noqa: E402
from dmoe.relay.server import Relay  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_EXPERTS = 8
SIZES = {"small": (64, 64), "large": (512, 1024)}  # name: (tokens, hidden)


def node_cmd(workdir: Path, name: str, prefix: str, hidden: int, swarm: str,
             mode: str) -> tuple[list[str], Path]:
    ready = workdir / f"{name}.ready.json"
    return [sys.executable, "-m", "dmoe", "node", "start", "--device", "cpu",
            "--experts", f"{prefix}.[0:{NUM_EXPERTS}]",
            "--hidden-dim", str(hidden), "--inner-dim", str(hidden), "--num-threads", "1", "--lr", "1e-6",
            "--swarm", swarm, "--reachability", mode, "--ready-file", str(ready)], ready


def measure(workdir: Path, swarm_address: str, size: str, steps: int) -> dict:
    tokens, hidden = SIZES[size]
    direct_cmd, direct_ready = node_cmd(workdir, f"direct-{size}", "ffn", hidden, swarm_address, "direct")
    relayed_cmd, relayed_ready = node_cmd(workdir, f"relayed-{size}", "rel", hidden, swarm_address, "relay")
    with server_process(direct_cmd, RESULTS_DIR / f"bench_relay.direct-{size}.log", direct_ready) as direct, \
            server_process(relayed_cmd, RESULTS_DIR / f"bench_relay.relayed-{size}.log",
                           relayed_ready) as relayed:
        probes = probe_cost(direct["port"], direct["node_id"]) if size == "small" else None
        with Swarm(SwarmConfig(initial_peers=[swarm_address], cache_ttl=3600)) as swarm:
            records = find_experts(swarm.peer, [f"rel.{i}" for i in range(NUM_EXPERTS)])
            dial = {r.dial_endpoint for replicas in records.values() for r in replicas}
            assert dial == {relayed["relay_endpoint"]}, records
            torch.manual_seed(0)
            layers = {name: RemoteMoE(swarm, prefix=prefix, grid=(NUM_EXPERTS,), in_features=hidden, k=2)
                      for name, prefix in (("direct", "ffn"), ("relayed", "rel"))}
            layers["relayed"].load_state_dict(layers["direct"].state_dict())  # the same gate: the same calls
            try:
                x = torch.randn(tokens, hidden)
                for _ in range(10):
                    for layer in layers.values():
                        timed_step(layer, x.clone())
                times: dict[str, list[float]] = {name: [] for name in layers}
                for _ in range(steps):
                    for name, layer in layers.items():
                        times[name].append(timed_step(layer, x.clone()))
            finally:
                for layer in layers.values():
                    layer.dispatcher.close()
    result = {name: summary(v) for name, v in times.items()}
    result["ratio_relayed_over_direct"] = result["relayed"]["median"] / result["direct"]["median"]
    result["tokens"], result["hidden"], result["steps"] = tokens, hidden, steps
    if probes is not None:
        result["probe"] = probes
    return result


def probe_cost(port: int, node_id: str, repeats: int = 30) -> dict:
    """Median seconds of a probe (node to relay, dial-back, answer), verified and TCP only, alternating."""
    times: dict[str, list[float]] = {"verified": [], "tcp_only": []}

    async def run(relay: Relay) -> None:
        for _ in range(repeats):
            for kind, who in (("verified", node_id), ("tcp_only", "")):
                started = time.perf_counter()
                reply = await probe(relay.address, port, key=None, node_id=who)
                times[kind].append(time.perf_counter() - started)
                assert reply["reachable"] and reply["verified"] == bool(who), reply

    with Relay(limits=RelayLimits(probes_per_minute=1e6)) as relay:
        asyncio.run(run(relay))
    return {kind: statistics.median(v) for kind, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200,
                        help="measured steps per path (small experts; large: a fifth)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_relay.json")
    args = parser.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    report: dict = {"config": {"steps": args.steps, "num_experts": NUM_EXPERTS,
                               "calls_per_step": 2 * NUM_EXPERTS}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ready = workdir / "coordinator.ready.json"
        cmd = [sys.executable, "-m", "dmoe", "coordinator", "start", "--ready-file", str(ready)]
        with server_process(cmd, RESULTS_DIR / "bench_relay.coordinator.log", ready) as coordinator:
            for size in SIZES:
                report[size] = measure(workdir, coordinator["swarm"][0], size,
                                       args.steps if size == "small" else max(10, args.steps // 5))
    print(f"{'size':<7} {'tokens x hidden':>16} {'direct p50 ms':>14} {'relayed p50 ms':>15} "
          f"{'direct p90':>11} {'relayed p90':>12} {'relayed/direct':>15}")
    for size in SIZES:
        r = report[size]
        print(f"{size:<7} {r['tokens']:>7} x {r['hidden']:<6} {1e3 * r['direct']['median']:>14.2f} "
              f"{1e3 * r['relayed']['median']:>15.2f} {1e3 * r['direct']['p90']:>11.2f} "
              f"{1e3 * r['relayed']['p90']:>12.2f} {r['ratio_relayed_over_direct']:>14.3f}x")
    p = report["small"]["probe"]
    print(f"start-up dial-back: verified (TCP + Info) {1e3 * p['verified']:.2f} ms, "
          f"TCP only {1e3 * p['tcp_only']:.2f} ms (medians)")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
