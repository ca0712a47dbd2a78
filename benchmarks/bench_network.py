"""Benchmark: RemoteMoE step time over a shaped link, against the bound that bandwidth alone sets.

The node runs in a network namespace of its own (:class:`dmoe.netlab.NetLab`), behind a veth link
limited to ``--bandwidth`` Mbit/s each way by ``tc tbf``; the client reaches its gRPC endpoint
through :class:`dmoe.netproxy.TcpProxy` (the node announces the proxy's port), which adds half of
``--rtt`` to each direction and counts the bytes. For each bandwidth, round-trip time and wire
compression (none, fp16, 8-bit) the client trains a RemoteMoE layer (8 FFN experts of hidden
``--hidden``, k=2, ``--tokens`` tokens, forward + backward, Adam on the node) for ``--steps`` steps
after one warm-up step, and reports the median s/step, the bytes on the wire per step in each
direction (as relayed by the proxy), the bound that the bandwidth alone sets, ``bytes of the busier
direction x 8 / bandwidth`` (the link is full duplex: each direction has the bandwidth, and the
calls of one step overlap: one expert's reply comes down while another's request goes up), and the
efficiency ``bound / achieved``. The JSON also has ``sequential_bound_s``, all bytes x 8 / bandwidth:
the time if nothing overlapped. Needs root (network namespaces). Writes ``benchmarks/results/bench_network.json``
and a plot ``bench_network.png`` (with matplotlib).

Run::

    sudo python benchmarks/bench_network.py [--bandwidth 10 50 100] [--rtt 0 25 50 100 200] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dmoe
from dmoe.local import wait_ready_file
from dmoe.netlab import NetLab
from dmoe.netproxy import TcpProxy

RESULTS = Path(__file__).resolve().parent / "results"
NUM_EXPERTS, K = 8, 2
COMPRESSIONS = ("none", "fp16", "8bit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, nargs="+", default=[10, 50, 100], help="Mbit/s each way")
    parser.add_argument("--rtt", type=float, nargs="+", default=[0, 25, 50, 100, 200], help="milliseconds")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, NetLab() as lab, TcpProxy() as proxy, \
            open(RESULTS / "bench_network_node.log", "wb") as log:
        ready = Path(tmp) / "node.json"
        node = lab.popen([sys.executable, "-m", "dmoe", "node", "start", "--host", lab.inner_ip, "--port", "0",
                          "--announce-host", "127.0.0.1", "--announce-port", str(proxy.port), "--device", "cpu",
                          "--experts", f"ffn.[0:{NUM_EXPERTS}]", "--hidden-dim", str(args.hidden),
                          "--max-message-bytes", str(256 << 20), "--max-request-bytes", str(256 << 20),
                          "--max-inflight-bytes", str(1 << 30), "--ready-file", str(ready)],
                         stdout=log, stderr=subprocess.STDOUT)
        info = wait_ready_file(ready, node, 120, f"the node (log: {RESULTS / 'bench_network_node.log'})")
        proxy.target = (lab.inner_ip, info["port"])
        with dmoe.Swarm(dmoe.SwarmConfig(initial_peers=info["swarm"], host=lab.outer_ip, cache_ttl=1e9)) as swarm:
            deadline = time.monotonic() + 60
            while len(swarm.live_under(["ffn."], refresh=True)["ffn."]) < NUM_EXPERTS:
                if time.monotonic() > deadline:
                    raise TimeoutError("the client does not see the node's experts")
                time.sleep(0.5)
            torch.manual_seed(0)
            layers = {c: dmoe.RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=args.hidden, k=K,
                                        k_min=K, forward_timeout=120, timeout_after_k_min=120, backward_timeout=120,
                                        compression=c) for c in COMPRESSIONS}
            for layer in layers.values():
                layer.load_state_dict(layers["none"].state_dict())
            x = torch.randn(args.tokens, args.hidden)
            for mbit in args.bandwidth:
                lab.shape(mbit)
                for rtt in args.rtt:
                    proxy.delay = rtt / 2e3
                    for compression, layer in layers.items():
                        times, num_bytes, up_down = [], [], []
                        for step in range(1 + args.steps):
                            before = dict(proxy.num_bytes)
                            started = time.perf_counter()
                            layer(x).square().mean().backward()
                            elapsed = time.perf_counter() - started
                            if step:
                                times.append(elapsed)
                                moved = {d: proxy.num_bytes[d] - before[d] for d in before}
                                num_bytes.append(sum(moved.values()))
                                up_down.append(max(moved.values()))
                        achieved = statistics.median(times)
                        per_step = statistics.median(num_bytes)
                        bound = statistics.median(up_down) * 8 / (mbit * 1e6)
                        row = {"bandwidth_mbit": mbit, "rtt_ms": rtt, "compression": compression,
                               "s_per_step": achieved, "bytes_per_step": per_step,
                               "busier_direction_bytes_per_step": statistics.median(up_down), "bound_s": bound,
                               "sequential_bound_s": per_step * 8 / (mbit * 1e6),
                               "efficiency": bound / achieved, "failed_calls": layer.num_failed_calls,
                               "seconds": times}
                        rows.append(row)
                        print(f"{mbit:>5.0f} Mbit/s {rtt:>4.0f} ms {compression:>5}: {achieved:7.3f} s/step, "
                              f"{per_step / 1e6:6.2f} MB/step, bound {bound:6.3f} s, "
                              f"efficiency {100 * bound / achieved:5.1f}%", flush=True)
    out = {"config": {**vars(args), "experts": NUM_EXPERTS, "k": K}, "results": rows}
    (RESULTS / "bench_network.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'bench_network.json'}")
    plot(rows, args)


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return
    figure, axes = plt.subplots(1, len(args.bandwidth), figsize=(4.5 * len(args.bandwidth), 3.8), squeeze=False)
    for ax, mbit in zip(axes[0], args.bandwidth):
        for compression in COMPRESSIONS:
            cells = [r for r in rows if r["bandwidth_mbit"] == mbit and r["compression"] == compression]
            ax.plot([r["rtt_ms"] for r in cells], [100 * r["efficiency"] for r in cells], marker="o", label=compression)
        ax.set_title(f"{mbit:g} Mbit/s")
        ax.set_xlabel("round-trip time (ms)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("efficiency: bandwidth bound / step time (%)")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "bench_network.png", dpi=110)
    print(f"plot: {RESULTS / 'bench_network.png'}")


if __name__ == "__main__":
    main()
