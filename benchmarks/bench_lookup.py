"""Benchmark: gating + live-expert lookup per step of dmoe.RemoteMoE on a 64 x 64 grid (4,096 experts).

A coordinator and ``--nodes`` nodes (default 4) on this machine; the first grid coordinate is split
over the nodes (node n hosts ``ffn.[a:b].[0:64]``, 1,024 experts each with 4 nodes). The experts
are tiny (hidden 16, inner 16), so hosting thousands is cheap and a full training step is
dominated by the number of calls, not by compute. The nodes are ``dmoe node start`` with a
heartbeat put off past the run (``--heartbeat-interval``), so that announcing 1,024 experts does not
land in the timings.
The client is ``dmoe.RemoteMoE(swarm, prefix='ffn', grid=(64, 64), in_features=16, k=2)`` (beam
size 2k = 4 by default), after it sees all 4,096 experts in the DHT (``--discovery-timeout``).

Per step (a batch of ``--batch`` random tokens) it times, separately:

* **gate** — ``[gate(x) for gate in layer.gates]`` (one ``nn.Linear`` per grid dimension);
* **lookup** — ``layer.candidates(scores)``: the batch-wide beam search over grid prefixes,
  reading live experts from the Swarm's cache or the DHT;
* **score** — scoring the candidates and taking each token's top-k, as ``RemoteMoE.forward`` does;

in two modes, each on its own client Swarm (its own DHT peer):

* **cached** — ``SwarmConfig(cache_ttl=1e9)``, every prefix key read once before: no DHT read;
* **cold** — ``SwarmConfig(cache_ttl=0)``: every prefix key is read from the DHT on every step
  (one DHT traversal per grid level, all keys of a level in one ``get_many``).

It counts, per step, the prefixes the beam search expands (the level-1 keys it asks for), the
prefix keys asked of the Swarm, the keys actually read from the DHT and the DHT traversals, and
the candidates scored. It checks the result: for each token, the true top-k among all live
experts (every one of the 4,096 scored with the gates) must be among the candidates; it reports
the fraction of tokens for which it is, and of (token, slot) pairs. For context it times a full
training step too (``layer(x).square().mean().backward()``, the experts' Adam steps on the nodes)
with the cache warm, and its number of expert calls: with thousands of experts and tiny compute
this is the many-small-calls case, so ``--event-loop both`` runs everything with a uvloop Swarm
and an asyncio Swarm side by side (steps interleaved) and reports the ratio.

Reports medians over ``--steps`` timed steps after ``--warmup`` untimed ones. Writes
``benchmarks/results/bench_lookup.json`` and the server logs next to it. Every process started
here (coordinator, nodes and their libp2p daemons, in their own process groups) is stopped at
the end, also on an error or SIGTERM.

Run::

    python benchmarks/bench_lookup.py [--nodes 4] [--batch 1 16 256] [--steps 10] [--train-steps 5]
                                      [--event-loop uvloop|asyncio|both] [--swarm ADDR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from common import server_process

import dmoe
import dmoe.client.swarm

# Legend: T tokens, C candidate experts, K experts per token, L grid dimensions, E all grid experts.
PREFIX, GRID, HIDDEN, INNER, K = "ffn", (64, 64), 16, 16, 2
RESULTS = Path(__file__).resolve().parent / "results"
CACHED_TTL = 1e9  # "forever": the cache, once filled, is never stale during the run
LOOKUP_FIELDS = ("gate_s", "lookup_s", "score_s", "route_s", "num_candidates", "num_routed_experts",
                 "expanded_prefixes", "keys_asked", "dht_keys_read", "dht_traversals")


# ---- swarm ------------------------------------------------------------------------------------
@contextmanager
def local_swarm(num_nodes: int, heartbeat: float, record_ttl: float, tmp: Path) -> Iterator[list[str]]:
    """A coordinator and ``num_nodes`` nodes (``dmoe node start``) sharing the grid's rows; yields
    the swarm address."""
    rows = [GRID[0] * n // num_nodes for n in range(num_nodes + 1)]
    with ExitStack() as stack:
        ready = tmp / "coordinator.json"
        cmd = [sys.executable, "-m", "dmoe", "coordinator", "start", "--host", "127.0.0.1",
               "--ready-file", str(ready)]
        log = RESULTS / "bench_lookup_coordinator.log"
        swarm_addrs = stack.enter_context(server_process(cmd, log, ready))["swarm"]
        start = [sys.executable, "-m", "dmoe"]
        for n in range(num_nodes):
            ready = tmp / f"node{n}.json"
            cmd = [*start, "node", "start", "--experts", f"{PREFIX}.[{rows[n]}:{rows[n + 1]}].[0:{GRID[1]}]",
                   "--hidden-dim", str(HIDDEN), "--inner-dim", str(INNER), "--device", "cpu",
                   "--num-threads", "1", "--host", "127.0.0.1", "--port", "0",
                   "--heartbeat-interval", str(heartbeat), "--record-ttl", str(record_ttl),
                   "--ready-file", str(ready)]
            for addr in swarm_addrs:
                cmd += ["--swarm", addr]
            stack.enter_context(server_process(cmd, RESULTS / f"bench_lookup_node{n}.log", ready))
        yield swarm_addrs


def live_coords(swarm: dmoe.Swarm) -> set[tuple[int, int]]:
    """Every live expert of the grid, read from the DHT (not from the cache)."""
    keys = [f"{PREFIX}.{i}." for i in range(GRID[0])]
    found = swarm.live_under(keys, refresh=True)
    return {(i, j) for i, key in enumerate(keys) for j, record in found[key].items()
            if j < GRID[1] and record.uid == f"{PREFIX}.{i}.{j}"}


def wait_for_all(swarm: dmoe.Swarm, timeout: float) -> float:
    """Seconds until the client sees all GRID experts (TimeoutError after ``timeout``)."""
    started = time.monotonic()
    total = GRID[0] * GRID[1]
    while (n := len(live_coords(swarm))) < total:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"only {n}/{total} experts visible after {timeout:.0f}s; "
                               f"see {RESULTS}/bench_lookup_*.log")
        time.sleep(1.0)
    return time.monotonic() - started


# ---- instrumentation --------------------------------------------------------------------------
class Counters:
    """Counts prefix keys asked of a Swarm (wrapping its live_under) and keys read from the DHT
    (wrapping ``find_under_prefixes_async``, which the Swarm calls for the keys its cache lacks)."""

    def __init__(self) -> None:
        self.reset()
        self._original = dmoe.client.swarm.find_under_prefixes_async

    def reset(self) -> None:
        self.levels: list[int] = []  # keys asked per live_under call, in order
        self.dht_reads = 0
        self.dht_keys = 0

    def watch(self, swarm: dmoe.Swarm) -> None:
        live_under = swarm.live_under

        def counted(keys, **kwargs):
            self.levels.append(len(keys))
            return live_under(keys, **kwargs)

        swarm.live_under = counted  # an instance attribute shadows the method, for this swarm only

    @contextmanager
    def reading_dht(self) -> Iterator[None]:
        original = self._original

        async def counted(node, keys):
            self.dht_reads += 1
            self.dht_keys += len(keys)
            return await original(node, keys)

        dmoe.client.swarm.find_under_prefixes_async = counted
        try:
            yield
        finally:
            dmoe.client.swarm.find_under_prefixes_async = original


# ---- measurements -----------------------------------------------------------------------------
def route(layer: dmoe.RemoteMoE, x_TD: torch.Tensor, counters: Counters) -> tuple[dict[str, Any], list, Any]:
    """Gate, lookup and candidate scoring of one batch, as RemoteMoE.forward does them, timed;
    also the gate scores and the candidates' coordinates, for the check."""
    counters.reset()
    t0 = time.perf_counter()
    scores = [gate(x_TD) for gate in layer.gates]
    t1 = time.perf_counter()
    candidates = layer.candidates(scores)
    t2 = time.perf_counter()
    if not candidates:
        raise RuntimeError("the lookup found no live expert")
    coords_CL = torch.tensor([coords for coords, _ in candidates])
    logits_TC = sum(score[:, coords_CL[:, d]] for d, score in enumerate(scores))
    experts_TK = logits_TC.topk(min(layer.k, len(candidates)), dim=-1).indices
    t3 = time.perf_counter()
    timings = {"gate_s": t1 - t0, "lookup_s": t2 - t1, "score_s": t3 - t2, "route_s": t3 - t0,
               "num_candidates": len(candidates), "num_routed_experts": int(experts_TK.unique().numel()),
               "expanded_prefixes": sum(counters.levels[1:]),
               "keys_asked": sum(counters.levels), "dht_keys_read": counters.dht_keys,
               "dht_traversals": counters.dht_reads}
    return timings, scores, coords_CL


def check(scores: list[torch.Tensor], coords_CL: torch.Tensor, live_mask: torch.Tensor) -> dict[str, int]:
    """How many tokens have all of their true top-k among the candidates, and how many (token,
    slot) pairs are; the true top-k scores every live expert of the grid with the gates."""
    with torch.no_grad():
        logits_TE = (scores[0][:, :, None] + scores[1][:, None, :]).flatten(1)
        logits_TE = logits_TE.masked_fill(~live_mask.flatten(), float("-inf"))
        true_TK = logits_TE.topk(K, dim=-1).indices
        is_candidate_E = torch.zeros(GRID[0] * GRID[1], dtype=torch.bool)
        is_candidate_E[coords_CL[:, 0] * GRID[1] + coords_CL[:, 1]] = True
        found_TK = is_candidate_E[true_TK]
    return {"tokens_with_true_topk": int(found_TK.all(-1).sum()), "pairs_found": int(found_TK.sum()),
            "tokens": found_TK.shape[0]}


def interleaved(runs: dict[str, Callable[[], dict]], steps: int, warmup: int) -> dict[str, list[dict]]:
    """``warmup`` untimed then ``steps`` timed rounds; a round runs every configuration once, in turn."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            results[name].append(run())
    return results


def median_of(samples: list[dict], field: str) -> float:
    return statistics.median(s[field] for s in samples)


def measure_lookup(layers: dict[tuple[str, str], dmoe.RemoteMoE], loops: list[str], batch: int,
                   counters: Counters, live_mask: torch.Tensor, steps: int, warmup: int) -> dict[str, dict]:
    """Gating + lookup of ``batch`` tokens, cached and cold, with each loop (interleaved)."""
    results = {}
    for mode in ("cached", "cold"):
        runs = {}
        for loop in loops:
            def run(layer: dmoe.RemoteMoE = layers[loop, mode]) -> dict[str, Any]:
                timings, scores, coords_CL = route(layer, torch.randn(batch, HIDDEN), counters)
                return {**timings, **check(scores, coords_CL, live_mask)}

            runs[loop] = run
        for loop, samples in interleaved(runs, steps, warmup).items():
            tokens = sum(s["tokens"] for s in samples)
            name = f"{mode} {loop} T={batch}"
            results[name] = {
                "mode": mode, "event_loop": loop, "batch": batch, "samples": samples,
                **{f"median_{field}": median_of(samples, field) for field in LOOKUP_FIELDS},
                "fraction_tokens_true_topk": sum(s["tokens_with_true_topk"] for s in samples) / tokens,
                "fraction_pairs_found": sum(s["pairs_found"] for s in samples) / (K * tokens),
            }
            print(f"  {name}: {results[name]['median_route_s'] * 1e3:.1f} ms", flush=True)
    return results


def measure_training(layers: dict[str, dmoe.RemoteMoE], batch: int, steps: int,
                     warmup: int) -> dict[str, dict]:
    """Full training steps (forward + backward, Adam on the nodes) with each loop (interleaved)."""
    runs = {}
    for loop, layer in layers.items():
        def step(layer: dmoe.RemoteMoE = layer) -> dict[str, Any]:
            x = torch.randn(batch, HIDDEN, requires_grad=True)
            start = time.perf_counter()
            layer(x).square().mean().backward()
            seconds = time.perf_counter() - start
            _, experts_TK = layer.last_routing
            layer.zero_grad(set_to_none=True)
            return {"step_s": seconds, "forward_calls": int(experts_TK.unique().numel()),
                    "failed": layer.last_num_failed}

        runs[loop] = step
    results = {}
    for loop, samples in interleaved(runs, steps, warmup).items():
        results[loop] = {"batch": batch, "samples": samples, "median_step_s": median_of(samples, "step_s"),
                         "median_forward_calls": median_of(samples, "forward_calls"),
                         "failed_calls": sum(s["failed"] for s in samples)}
        print(f"  train {loop} T={batch}: {results[loop]['median_step_s']:.3f} s/step", flush=True)
    return results


# ---- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="nodes sharing the grid's rows")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256],
                        help="tokens per step (several: one measurement each; training uses the largest)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per lookup configuration")
    parser.add_argument("--train-steps", type=int, default=5, help="timed full training steps (0: none)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--beam-size", type=int, default=None, help="RemoteMoE beam_size (default 2k)")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio", "both"], default="uvloop",
                        help="event loop of the client Swarm; both: each, side by side")
    parser.add_argument("--heartbeat-interval", type=float, default=900.0,
                        help="nodes' DHT heartbeat (s); long, so that no beat runs during the timings")
    parser.add_argument("--record-ttl", type=float, default=1800.0, help="nodes' DHT record lifetime (s)")
    parser.add_argument("--swarm", action="append", default=[],
                        help="measure this running swarm (multiaddr; repeat for several), start none")
    parser.add_argument("--discovery-timeout", type=float, default=180.0,
                        help="seconds to wait until the client sees all experts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.nodes <= GRID[0] or args.steps < 1 or args.warmup < 0 or min(args.batch) < 1:
        parser.error(f"need 1 <= --nodes <= {GRID[0]}, --steps >= 1, --warmup >= 0, --batch >= 1")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind the context managers: stop the servers
    loops = ["uvloop", "asyncio"] if args.event_loop == "both" else [args.event_loop]
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    counters = Counters()
    out: dict[str, Any] = {"config": {
        "grid": list(GRID), "experts": GRID[0] * GRID[1], "nodes": args.nodes, "hidden": HIDDEN,
        "inner": INNER, "k": K, "beam_size": args.beam_size or 2 * K, "batches": args.batch,
        "steps": args.steps, "train_steps": args.train_steps, "warmup": args.warmup, "event_loops": loops,
        "external_swarm": args.swarm,
        "heartbeat_interval": args.heartbeat_interval, "record_ttl": args.record_ttl,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        swarm_addrs = args.swarm
        if not swarm_addrs:
            swarm_addrs = stack.enter_context(local_swarm(
                args.nodes, args.heartbeat_interval, args.record_ttl, Path(tmp)))
            out["swarm_start_s"] = time.monotonic() - started
            print(f"coordinator + {args.nodes} nodes up in {out['swarm_start_s']:.1f}s", flush=True)
        swarms: dict[tuple[str, str], dmoe.Swarm] = {}
        for loop in loops:
            for mode, ttl in (("cached", CACHED_TTL), ("cold", 0.0)):
                swarms[loop, mode] = stack.enter_context(dmoe.Swarm(dmoe.SwarmConfig(
                    initial_peers=swarm_addrs, cache_ttl=ttl, event_loop=loop)))
        probe = swarms[loops[0], "cold"]
        out["discovery_s"] = wait_for_all(probe, args.discovery_timeout)
        live_mask = torch.zeros(GRID, dtype=torch.bool)
        for i, j in live_coords(probe):
            live_mask[i, j] = True
        print(f"client sees all {int(live_mask.sum())} experts after {out['discovery_s']:.1f}s more",
              flush=True)

        layers: dict[tuple[str, str], dmoe.RemoteMoE] = {}
        for key, swarm in swarms.items():
            counters.watch(swarm)
            layers[key] = dmoe.RemoteMoE(swarm, prefix=PREFIX, grid=GRID, in_features=HIDDEN, k=K, k_min=1,
                                         beam_size=args.beam_size, forward_timeout=60, timeout_after_k_min=60,
                                         backward_timeout=60)
        first = next(iter(layers.values()))
        for layer in layers.values():  # the same gate weights everywhere, so every configuration routes alike
            layer.load_state_dict(first.state_dict())
        all_keys = [f"{PREFIX}."] + [f"{PREFIX}.{i}." for i in range(GRID[0])]
        for loop in loops:  # every prefix key in the cache, so cached steps never read the DHT
            swarms[loop, "cached"].live_under(all_keys)

        out["lookup"] = {}
        with counters.reading_dht():
            for batch in args.batch:
                out["lookup"].update(measure_lookup(layers, loops, batch, counters, live_mask, args.steps,
                                                    args.warmup))
        out["train"] = {}
        if args.train_steps > 0:
            out["train"] = measure_training({loop: layers[loop, "cached"] for loop in loops}, max(args.batch),
                                            args.train_steps, args.warmup)
        if len(out["train"]) == 2:
            out["train_ratio_asyncio_over_uvloop"] = (out["train"]["asyncio"]["median_step_s"]
                                                      / out["train"]["uvloop"]["median_step_s"])

    print_tables(out)
    (RESULTS / "bench_lookup.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'bench_lookup.json'}")


def print_tables(out: dict[str, Any]) -> None:
    cfg = out["config"]
    print(f"\ngating + lookup per step: {cfg['grid'][0]}x{cfg['grid'][1]} grid ({cfg['experts']} experts) "
          f"on {cfg['nodes']} nodes, k={cfg['k']}, beam {cfg['beam_size']}; medians of {cfg['steps']} "
          f"steps (ms)")
    head = (f"{'config':<22} {'gate':>6} {'lookup':>8} {'score':>7} {'total':>8} {'expanded':>8} "
            f"{'DHT keys':>8} {'DHT gets':>8} {'candidates':>10} {'true top-k: tokens':>18} {'pairs':>6}")
    print(head)
    print("-" * len(head))
    for name, r in out["lookup"].items():
        print(f"{name:<22} {r['median_gate_s'] * 1e3:>6.2f} {r['median_lookup_s'] * 1e3:>8.2f} "
              f"{r['median_score_s'] * 1e3:>7.2f} {r['median_route_s'] * 1e3:>8.2f} "
              f"{r['median_expanded_prefixes']:>8g} {r['median_dht_keys_read']:>8g} "
              f"{r['median_dht_traversals']:>8g} {r['median_num_candidates']:>10g} "
              f"{r['fraction_tokens_true_topk']:>18.3f} {r['fraction_pairs_found']:>6.3f}")
    print("(expanded: level-1 prefixes the beam search expands; DHT keys: prefix keys read from the DHT; "
          "DHT gets: DHT traversals;\n true top-k: fraction of tokens / of (token, slot) pairs whose true "
          "top-k among all live experts are candidates)")
    if out["train"]:
        print(f"\nfull training step (forward + backward, Adam on the nodes), cache warm; "
              f"medians of {cfg['train_steps']} steps")
        head = (f"{'event loop':<12} {'tokens':>6} {'s/step':>8} {'min':>8} {'max':>8} "
                f"{'forward calls':>13} {'failed':>6}")
        print(head)
        print("-" * len(head))
        for loop, r in out["train"].items():
            times = [s["step_s"] for s in r["samples"]]
            print(f"{loop:<12} {r['batch']:>6} {r['median_step_s']:>8.3f} {min(times):>8.3f} "
                  f"{max(times):>8.3f} {r['median_forward_calls']:>13g} {r['failed_calls']:>6}")
        if "train_ratio_asyncio_over_uvloop" in out:
            print(f"asyncio/uvloop (full step): {out['train_ratio_asyncio_over_uvloop']:.2f}x")


if __name__ == "__main__":
    main()
