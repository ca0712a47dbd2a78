"""Benchmark: tail latency of RemoteMoE steps with one slow node out of four, with and without hedging.

Four nodes on this machine host 8 FFN experts (two each; hidden ``--hidden``, inner 4x). The last
node is reached through ``dmoe.testing.netproxy.TcpProxy`` (it announces the proxy's port), which delays
each direction by ``--delay`` seconds +- ``--jitter`` (uniform), so a call to it takes about twice
the delay more than one to the others. The client trains a RemoteMoE layer (k=2, 256 tokens,
forward + backward, Adam on the nodes) in these configurations, each on its own layer with the
same gate weights, steps interleaved so that the machine's noise hits them alike:

* **wait**     — k_min = 2: every token waits for both its experts (a slow node sets every step);
* **quorum**   — k_min = 1, timeout_after_k_min = ``--after-k-min``: a token goes on with one answer,
  the other is waited for at most that long (fast, but tokens lose an expert);
* **hedge**    — hedge = 1, k_min = 2: each token also asks its third-best expert and keeps its best
  two answers; the forward ends when every token has two;
* **hedge2**   — the same with its third- and fourth-best experts (hedge = 2). With two experts per
  node, a token whose top-3 holds both of the slow node's experts needs that node under hedge = 1.

plus **wait, no slow node** and **hedge2, no slow node** (the proxy's delay and jitter set to 0) for
reference. Each configuration has a client Swarm of its own, so that the back-off of failing
endpoints (a late call counts as a failure, a hedged call cancelled because it was not needed does
not) is its own too. Reports p50 / p90 / p99 / max of the step time over ``--steps`` steps after
``--warmup``, the expert calls per step, and the share of steps that routed tokens to the slow node
(``slow used``; a banned node gets none), and the share of (token, slot) outputs that came from the
token's own top-2 among all 8 experts (``own top-2``) or that were missing (``missing``): the price
each configuration pays in quality. Writes ``benchmarks/results/bench_tail.json``.

Run::

    python benchmarks/bench_tail.py [--steps 40] [--delay 0.1] [--jitter 0.05] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from common import server_process, show_progress

import dmoe
from dmoe.testing.netproxy import TcpProxy

RESULTS = Path(__file__).resolve().parent / "results"
NUM_NODES, EXPERTS_PER_NODE, K, TOKENS = 4, 2, 2, 256


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.1, help="one-way delay to the slow node (s)")
    parser.add_argument("--jitter", type=float, default=0.05, help="uniform jitter on that delay (s)")
    parser.add_argument("--after-k-min", type=float, default=0.02, help="the quorum configuration's wait (s)")
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    num_experts = NUM_NODES * EXPERTS_PER_NODE
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        proxy = stack.enter_context(TcpProxy(jitter=args.jitter, seed=0))
        swarm_addr: list[str] = []
        for n in range(NUM_NODES):
            ready = Path(tmp) / f"node{n}.json"
            cmd = [sys.executable, "-m", "dmoe", "node", "start", "--host", "127.0.0.1", "--port", "0",
                   "--device", "cpu", "--num-threads", "1", "--hidden-dim", str(args.hidden),
                   "--experts", f"ffn.[{n * EXPERTS_PER_NODE}:{(n + 1) * EXPERTS_PER_NODE}]",
                   "--ready-file", str(ready)]
            if n == NUM_NODES - 1:
                cmd += ["--announce-port", str(proxy.port)]
            for addr in swarm_addr[:1]:
                cmd += ["--swarm", addr]
            info = stack.enter_context(server_process(cmd, RESULTS / f"bench_tail_node{n}.log", ready))
            swarm_addr = swarm_addr or info["swarm"]
            if n == NUM_NODES - 1:
                proxy.target = ("127.0.0.1", info["port"])
        runs = [("wait, no slow node", "wait", 0.0), ("wait", "wait", args.delay),
                ("quorum", "quorum", args.delay), ("hedge", "hedge", args.delay),
                ("hedge2", "hedge2", args.delay), ("hedge2, no slow node", "hedge2", 0.0)]
        swarms = {name: stack.enter_context(dmoe.Swarm(dmoe.SwarmConfig(initial_peers=swarm_addr,
                                                                        cache_ttl=2.0)))
                  for name, _, _ in runs}
        deadline = time.monotonic() + 60
        for swarm in swarms.values():
            while len(swarm.live_under(["ffn."], refresh=True)["ffn."]) < num_experts:
                if time.monotonic() > deadline:
                    raise TimeoutError("the client does not see all experts")
                time.sleep(0.5)
        slow_uids = {f"ffn.{i}" for i in range(num_experts - EXPERTS_PER_NODE, num_experts)}

        torch.manual_seed(0)
        common = dict(prefix="ffn", grid=(num_experts,), in_features=args.hidden, k=K, forward_timeout=10.0,
                      backward_timeout=10.0)
        configs = {
            "wait": dict(k_min=2, timeout_after_k_min=10.0),
            "quorum": dict(k_min=1, timeout_after_k_min=args.after_k_min),
            "hedge": dict(k_min=2, timeout_after_k_min=10.0, hedge=1),
            "hedge2": dict(k_min=2, timeout_after_k_min=10.0, hedge=2),
        }
        layers = {name: dmoe.RemoteMoE(swarms[name], **common, **configs[kind]) for name, kind, _ in runs}
        first = next(iter(layers.values()))
        for layer in layers.values():
            layer.load_state_dict(first.state_dict())
        times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        slow_used: dict[str, list[bool]] = {name: [] for name, _, _ in runs}
        calls: dict[str, list[int]] = {name: [] for name, _, _ in runs}
        own: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        missing: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        for step in range(args.warmup + args.steps):
            # an input that needs a gradient, as a layer's inside a model: backward then reaches the experts
            x = torch.randn(TOKENS, args.hidden,
                            generator=torch.Generator().manual_seed(step)).requires_grad_(True)
            for name, _, delay in runs:
                layer = layers[name]
                proxy.delay, proxy.jitter = delay, (args.jitter if delay else 0.0)
                started = time.perf_counter()
                y = layer(x)
                y.square().mean().backward()
                elapsed = time.perf_counter() - started
                if step < args.warmup:
                    continue
                times[name].append(elapsed)
                uids, experts_TK = layer.last_routing
                routed = torch.unique(experts_TK[experts_TK >= 0]).tolist()
                calls[name].append(len(routed))
                slow_used[name].append(any(uids[e] in slow_uids for e in routed))
                with torch.no_grad():  # which of each token's own top-2 among all experts gave an output
                    own_TK = layer.gates[0](x).topk(K, dim=-1).indices
                    given_TK = torch.tensor([[int(uids[e].split(".")[1]) if e >= 0 else -1 for e in row]
                                             for row in experts_TK.tolist()])
                    given_TK = given_TK.masked_fill(~layer.last_answered_TK, -1)
                    hits = (own_TK.unsqueeze(-1) == given_TK.unsqueeze(1)).any(-1)
                own[name].append(float(hits.float().mean()))
                missing[name].append(
                    float(1 - layer.last_answered_TK.sum(-1).clamp(max=K).float().mean() / K))
            show_progress(f"step {step + 1}/{args.warmup + args.steps}", step + 1, args.warmup + args.steps)

    rows = {}
    for name, _, delay in runs:
        t = times[name]
        rows[name] = {"slow_node_delay_s": delay, "p50_s": percentile(t, 50), "p90_s": percentile(t, 90),
                      "p99_s": percentile(t, 99), "max_s": max(t), "mean_s": statistics.fmean(t),
                      "experts_called": statistics.fmean(calls[name]),
                      "own_top2": statistics.fmean(own[name]), "slow_used": statistics.fmean(slow_used[name]),
                      "missing": statistics.fmean(missing[name]), "seconds": t}
    print(f"\nRemoteMoE, {num_experts} experts on {NUM_NODES} nodes, the last behind "
          f"+{args.delay * 1e3:.0f} ms +- {args.jitter * 1e3:.0f} ms each way; k=2, {TOKENS} tokens, "
          f"forward + backward; {args.steps} steps")
    print(f"{'config':<20} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7} {'experts':>8} "
          f"{'slow used':>10} {'own top-2':>10} {'missing':>8}")
    for name, r in rows.items():
        print(f"{name:<20} {r['p50_s']:>7.3f} {r['p90_s']:>7.3f} {r['p99_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['experts_called']:>8.1f} {r['slow_used']:>10.2f} {r['own_top2']:>10.3f} "
              f"{r['missing']:>8.3f}")
    out = {"config": {**vars(args), "nodes": NUM_NODES, "experts": num_experts, "k": K, "tokens": TOKENS},
           "results": rows}
    (RESULTS / "bench_tail.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'bench_tail.json'}")


if __name__ == "__main__":
    main()
