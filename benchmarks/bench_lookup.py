"""Benchmark: gating + live-expert lookup per step of dmoe.RemoteMoE on a 64 x 64 grid (4,096 experts).

A coordinator and ``--nodes`` nodes (default 4) on this machine; the first grid coordinate is split
over the nodes (node n hosts ``ffn.[a:b].[0:64]``, 1,024 experts each with 4 nodes). The experts
are tiny (hidden 16, inner 16), so hosting thousands is cheap and a full training step is
dominated by the number of calls, not by compute. The nodes are ``dmoe node start`` with a
heartbeat put off past the run (``--heartbeat-interval``), so that announcing 1,024 experts does not
land in the timings, and no replica averaging (``--average-interval 0``: there are no replicas, and a
round looked up the replicas of all the node's experts in the DHT every 30 s, in the timings).
The client is ``dmoe.RemoteMoE(swarm, prefix='ffn', grid=(64, 64), in_features=16, k=2)`` (beam
size 2k = 4 by default), after it sees all 4,096 experts in the DHT (``--discovery-timeout``).

Per step (a batch of ``--batch`` random tokens) it times, separately:

* **gate** — ``[gate(x) for gate in layer.gates]`` (one ``nn.Linear`` per grid dimension);
* **lookup** — the batch-wide beam search over grid prefixes, reading live experts from the
  Swarm's cache or the DHT, done two ways side by side (``--lookup both``, interleaved):
  ``vectorised``, ``layer.beam_search`` over ``Swarm.live_levels`` (each level's keys in one read,
  the beams picked on tensors), and ``prefix-loop``, the loop over prefixes and candidates over
  ``Swarm.live_replicas_under`` that ``RemoteMoE.candidates`` ran before (kept here as the baseline);
* **score** — scoring the candidates and taking each token's top-k, as ``RemoteMoE.forward`` does;

in two modes, each on its own client Swarm (its own DHT peer):

* **cached** — ``SwarmConfig(cache_ttl=1e9)``, every prefix key read once before: no DHT read;
* **cold-every-peer** — ``SwarmConfig(cache_ttl=0)``: every prefix key is read from the DHT on every
  step (one DHT traversal per grid level, all keys of a level in one ``get_many``), merging the copies
  of every peer the traversal reaches (``lookup_breadth=0``: hivemind's bucket size of 20, every peer
  of this swarm);
* **cold-breadth-2** — cold, with ``lookup_breadth=2`` (the default): the copies of the 2 peers nearest
  each key only.

Both with ``lookup_timeout`` 60 s, so that a slow read on a loaded machine is timed rather than
replaced by the last known experts.

It counts, per step, the prefixes the beam search expands (the level-1 keys it asks for), the
prefix keys asked of the Swarm, the keys actually read from the DHT and the DHT traversals, and
the candidates scored. It checks the result: for each token, the true top-k among all live
experts (every one of the 4,096 scored with the gates) must be among the candidates; it reports
the fraction of tokens for which it is, and of (token, slot) pairs.

**Full step** (``--train-steps``): a training step of the largest batch
(``layer(x).square().mean().backward()``, the experts' Adam steps on the nodes) with the cache
warm, with thousands of experts and tiny compute: the many-small-calls case. It runs with one call
per node per step (``batched``, ``SwarmConfig.batch_per_node``: packed, every expert's rows in one
tensor), with one call per node carrying a message per expert (``unpacked``,
``SwarmConfig.packed_calls=False``) and with a call per expert (``per-expert``, the path before), side
by side, steps interleaved, on three grids of experts of the
same size hosted by the same nodes: the 64 x 64 grid (4,096 experts), a 16 x 16 grid (``mid``, 256)
and 8 experts (``few``); each node hosts its share of each. Per step it counts the expert calls the
nodes received (their Info: forward and backward, batched or not) and the nodes the step's experts
live on (each node touched should get one call forward and one backward); it reports the ratios
per-expert / batched on the 4,096 grid (goal: at least 4x) and 256 / 8 experts (goal: at most 2x).
``--event-loop both`` runs each configuration with a uvloop Swarm and an asyncio Swarm too. The nodes
run the waiting batches of many experts as one group (``--grouping``, see ``dmoe.node.grouped``);
``--node-grouping both`` measures the full step again in a second local swarm whose nodes run each
expert alone (``--no-grouping``), and reports the old path whole (a call per expert, each expert alone:
``per-expert ungrouped``) against the new (``batched`` on grouping nodes).

Reports medians over ``--steps`` timed steps after ``--warmup`` untimed ones. Writes
``benchmarks/results/bench_lookup.json`` and the server logs next to it. Every process started
here (coordinator, nodes and their libp2p daemons, in their own process groups) is stopped at
the end, also on an error or SIGTERM.

Run::

    python benchmarks/bench_lookup.py [--nodes 4] [--batch 1 16 256] [--steps 10] [--train-steps 5]
                                      [--event-loop uvloop|asyncio|both] [--swarm ADDR]
                                      [--node-grouping on|off|both]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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

import grpc
import torch
from common import server_process

import dmoe
import dmoe.client.swarm
from dmoe.moe.gating import Candidates, candidate_logits

# Legend: T tokens, C candidate experts, K experts per token, L grid dimensions, E all grid experts.
PREFIX, GRID, HIDDEN, INNER, K = "ffn", (64, 64), 16, 16, 2
RESULTS = Path(__file__).resolve().parent / "results"
CACHED_TTL = 1e9  # "forever": the cache, once filled, is never stale during the run
# lookup modes: name -> (cache_ttl, lookup_breadth), each on its own client Swarm
MODES = {"cached": (CACHED_TTL, dmoe.SwarmConfig().lookup_breadth), "cold-breadth-2": (0.0, 2),
         "cold-every-peer": (0.0, 0)}
LOOKUPS = ("prefix-loop", "vectorised")  # see lookup_with()
LOOKUP_TIMEOUT = 60.0  # SwarmConfig.lookup_timeout of the measured swarms
LOOKUP_FIELDS = ("gate_s", "lookup_s", "score_s", "route_s", "num_candidates", "num_routed_experts",
                 "expanded_prefixes", "keys_asked", "dht_keys_read", "dht_traversals")


# ---- swarm ------------------------------------------------------------------------------------
@contextmanager
def local_swarm(num_nodes: int, heartbeat: float, record_ttl: float, tmp: Path, grouping: bool = True
                ) -> Iterator[tuple[list[str], list[int]]]:
    """A coordinator and ``num_nodes`` nodes (``dmoe node start``, with ``--grouping`` or not) sharing the
    grid's rows; yields the swarm address and the nodes' process ids."""
    rows = [GRID[0] * n // num_nodes for n in range(num_nodes + 1)]
    with ExitStack() as stack:
        ready = tmp / "coordinator.json"
        cmd = [sys.executable, "-m", "dmoe", "coordinator", "start", "--host", "127.0.0.1",
               "--ready-file", str(ready)]
        tail = "" if grouping else "_ungrouped"  # each swarm's logs kept: the second does not overwrite them
        log = RESULTS / f"bench_lookup_coordinator{tail}.log"
        swarm_addrs = stack.enter_context(server_process(cmd, log, ready))["swarm"]
        start, pids = [sys.executable, "-m", "dmoe"], []
        for n in range(num_nodes):
            ready = tmp / f"node{n}.json"
            cmd = [*start, "node", "start", "--experts", f"{PREFIX}.[{rows[n]}:{rows[n + 1]}].[0:{GRID[1]}]",
                   *full_step_experts(n, num_nodes),
                   "--hidden-dim", str(HIDDEN), "--inner-dim", str(INNER), "--device", "cpu",
                   "--num-threads", "1", "--host", "127.0.0.1", "--port", "0",
                   "--heartbeat-interval", str(heartbeat), "--record-ttl", str(record_ttl),
                   "--average-interval", "0", "--ready-file", str(ready),
                   "--grouping" if grouping else "--no-grouping"]
            for addr in swarm_addrs:
                cmd += ["--swarm", addr]
            log = RESULTS / f"bench_lookup_node{n}{tail}.log"
            info = stack.enter_context(server_process(cmd, log, ready))
            pids.append(int(info["pid"]))
        yield swarm_addrs, pids


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
    """Counts prefix keys asked of a Swarm (wrapping its live_replicas_under and live_levels) and keys
    read from the DHT (wrapping ``find_under_prefixes_async``, which the Swarm calls for the keys its
    cache lacks)."""

    def __init__(self) -> None:
        self.reset()
        self._original = dmoe.client.swarm.find_under_prefixes_async

    def reset(self) -> None:
        self.levels: list[int] = []  # keys asked per lookup call, in order
        self.dht_reads = 0
        self.dht_keys = 0

    def watch(self, swarm: dmoe.Swarm) -> None:
        for name in ("live_replicas_under", "live_levels"):
            def counted(keys, *args, _lookup=getattr(swarm, name), **kwargs):
                self.levels.append(len(keys))
                return _lookup(keys, *args, **kwargs)

            setattr(swarm, name, counted)  # an instance attribute shadows the method, for this swarm only

    @contextmanager
    def reading_dht(self) -> Iterator[None]:
        original = self._original

        async def counted(node, keys, *args):
            self.dht_reads += 1
            self.dht_keys += len(keys)
            return await original(node, keys, *args)

        dmoe.client.swarm.find_under_prefixes_async = counted
        try:
            yield
        finally:
            dmoe.client.swarm.find_under_prefixes_async = original


# ---- measurements -----------------------------------------------------------------------------
def prefix_loop(layer: dmoe.RemoteMoE, scores: list[torch.Tensor]) -> list:
    """The beam search RemoteMoE.candidates ran before the vectorised one, as it was: at each level a
    Python loop over the prefixes, then one over the candidates (their replicas, one per endpoint)."""
    root, schema = f"{layer.prefix}.", layer.expert_schema
    level = layer.swarm.live_replicas_under([root], schema=schema)[root]
    prefixes: list[tuple[int, ...]] = [(c,) for c in sorted(level) if c < layer.grid[0]]
    records = {(c,): level[c] for c, in prefixes}
    for depth in range(1, len(layer.grid)):
        if not prefixes:
            return []
        with torch.no_grad():
            partial_TP = sum(scores[d][:, [p[d] for p in prefixes]] for d in range(depth))
            beam = partial_TP.topk(min(layer.beam_size, len(prefixes)), dim=-1).indices.unique().tolist()
        chosen = [prefixes[i] for i in beam]
        keys = {p: layer.uid(p) + "." for p in chosen}
        found = layer.swarm.live_replicas_under(list(keys.values()), schema=schema)
        prefixes = [p + (c,) for p in chosen for c in sorted(found[keys[p]]) if c < layer.grid[depth]]
        records = {p + (c,): found[keys[p]][c]
                   for p in chosen for c in found[keys[p]] if c < layer.grid[depth]}
    chosen = []
    for p in prefixes:
        seen, replicas = set(), []
        for r in records[p]:
            if r.uid == layer.uid(p) and r.dial_endpoint not in seen:
                seen.add(r.dial_endpoint)
                replicas.append(r)
        if replicas:
            chosen.append((p, replicas))
    return chosen


def lookup_with(name: str, layer: dmoe.RemoteMoE) -> Callable[[list[torch.Tensor]], Any]:
    """The lookup ``name`` (LOOKUPS) of ``layer``: gate scores -> candidates."""
    if name == "prefix-loop":
        return lambda scores: prefix_loop(layer, scores)
    read = functools.partial(layer.swarm.live_levels, schema=layer.expert_schema)
    return lambda scores: layer.beam_search(scores, layer.beam_size, read)


def route(layer: dmoe.RemoteMoE, lookup: Callable[[list[torch.Tensor]], Any], x_TD: torch.Tensor,
          counters: Counters) -> tuple[dict[str, Any], list, Any]:
    """Gate, lookup and candidate scoring of one batch, as RemoteMoE.forward does them, timed;
    also the gate scores and the candidates' coordinates, for the check."""
    counters.reset()
    t0 = time.perf_counter()
    scores = [gate(x_TD) for gate in layer.gates]
    t1 = time.perf_counter()
    candidates = lookup(scores)
    t2 = time.perf_counter()
    if not candidates:
        raise RuntimeError("the lookup found no live expert")
    coords_CL = (candidates.coords_CL if isinstance(candidates, Candidates)
                 else torch.tensor([coords for coords, _ in candidates]))
    logits_TC = candidate_logits(scores, coords_CL)
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


def interleaved(runs: dict[Any, Callable[[], dict]], steps: int, warmup: int) -> dict[Any, list[dict]]:
    """``warmup`` untimed then ``steps`` timed rounds; a round runs every configuration once, in turn."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    results: dict[Any, list[dict]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            results[name].append(run())
    return results


def median_of(samples: list[dict], field: str) -> float:
    return statistics.median(s[field] for s in samples)


def measure_lookup(layers: dict[tuple[str, str], dmoe.RemoteMoE], loops: list[str], lookups: list[str],
                   batch: int, counters: Counters, live_mask: torch.Tensor, steps: int, warmup: int
                   ) -> dict[str, dict]:
    """Gating + lookup of ``batch`` tokens, cached and cold, with each loop and lookup (interleaved)."""
    results = {}
    for mode in MODES:
        runs = {}
        for loop in loops:
            for lookup in lookups:
                def run(layer: dmoe.RemoteMoE = layers[loop, mode],
                        find: Callable = lookup_with(lookup, layers[loop, mode])) -> dict[str, Any]:
                    timings, scores, coords_CL = route(layer, find, torch.randn(batch, HIDDEN), counters)
                    return {**timings, **check(scores, coords_CL, live_mask)}

                runs[loop, lookup] = run
        for (loop, lookup), samples in interleaved(runs, steps, warmup).items():
            tokens = sum(s["tokens"] for s in samples)
            name = f"{mode} {loop} T={batch} {lookup}"
            results[name] = {
                "mode": mode, "event_loop": loop, "lookup": lookup, "batch": batch, "samples": samples,
                **{f"median_{field}": median_of(samples, field) for field in LOOKUP_FIELDS},
                "fraction_tokens_true_topk": sum(s["tokens_with_true_topk"] for s in samples) / tokens,
                "fraction_pairs_found": sum(s["pairs_found"] for s in samples) / (K * tokens),
            }
            print(f"  {name}: {results[name]['median_route_s'] * 1e3:.1f} ms", flush=True)
    return results


# ---- full step -------------------------------------------------------------------------------
# the full step's grids (name -> prefix, grid), experts of one size, each node hosting its share of each
FULL_STEP_GRIDS = {"4096": (PREFIX, GRID), "256": ("mid", (16, 16)), "8": ("few", (8,))}
# path -> (SwarmConfig.batch_per_node, SwarmConfig.packed_calls)
PATHS = {"batched": (True, True), "unpacked": (True, False), "per-expert": (False, False)}


def full_step_experts(n: int, num_nodes: int) -> list[str]:
    """--experts options of node ``n``: its rows of the smaller grids of the full step."""
    options = []
    for prefix, grid in FULL_STEP_GRIDS.values():
        if prefix == PREFIX:
            continue
        first, last = grid[0] * n // num_nodes, grid[0] * (n + 1) // num_nodes
        if last > first:
            options += ["--experts", f"{prefix}.[{first}:{last}]" + "".join(f".[0:{d}]" for d in grid[1:])]
    return options


def endpoints_by_uid(swarm: dmoe.Swarm, prefix: str, grid: tuple[int, ...]) -> dict[str, str]:
    """Where each live expert of a 1-D or 2-D grid is (its first replica's endpoint)."""
    keys = [f"{prefix}."] if len(grid) == 1 else [f"{prefix}.{i}." for i in range(grid[0])]
    found = swarm.live_replicas_under(keys, refresh=True)
    return {replicas[0].uid: replicas[0].dial_endpoint for key in keys for replicas in found[key].values()}


class NodeCalls:
    """Expert calls the nodes received so far (their Info: Forward and Backward in every form, a batched
    call counting once), summed over the nodes; each Info names one uid, so it stays cheap."""

    def __init__(self, endpoints: dict[str, str]):
        from dmoe.proto import expert_pb2 as pb
        from dmoe.proto import expert_pb2_grpc as pbg

        self._pb = pb
        one_uid = {endpoint: uid for uid, endpoint in endpoints.items()}
        self._stubs = []
        for endpoint, uid in sorted(one_uid.items()):
            channel = grpc.insecure_channel(endpoint)
            self._stubs.append((channel, pbg.ExpertServiceStub(channel), uid))

    def __call__(self) -> int:
        return sum(stub.Info(self._pb.InfoRequest(uids=[uid]), timeout=30).expert_calls
                   for _, stub, uid in self._stubs)

    def close(self) -> None:
        for channel, _, _ in self._stubs:
            channel.close()


def full_step_layers(swarms: dict[str, dmoe.Swarm], loops: list[str]
                     ) -> tuple[dict[str, dmoe.RemoteMoE], dict[str, str]]:
    """A RemoteMoE per (grid, path, loop) on the cached swarms, layers of one grid with the same gate
    weights; and where each expert lives. Grids a running swarm (--swarm) lacks are left out."""
    layers, endpoints = {}, {}
    for grid_name, (prefix, grid) in FULL_STEP_GRIDS.items():
        deadline = time.monotonic() + 30  # announced with the 4,096, all but always visible already
        while len(where := endpoints_by_uid(swarms[loops[0]], prefix, grid)) < math.prod(grid):
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if len(where) < math.prod(grid):
            print(f"  full step: {len(where)} of the {math.prod(grid)} experts of {prefix!r} live: left out")
            continue
        endpoints.update(where)
        first = None
        for path, (batched, packed) in PATHS.items():
            for loop in loops:
                layer = dmoe.RemoteMoE(swarms[loop], prefix=prefix, grid=grid, in_features=HIDDEN, k=K,
                                       k_min=1, forward_timeout=60, timeout_after_k_min=60,
                                       backward_timeout=60)
                layer.dispatcher.batch_per_node = batched
                layer.dispatcher.packed_calls = packed
                if first is None:
                    first = layer
                layer.load_state_dict(first.state_dict())
                layers[f"{grid_name} {path}" + (f" {loop}" if len(loops) > 1 else "")] = layer
    return layers, endpoints


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far (None where /proc cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure_training(layers: dict[str, dmoe.RemoteMoE], endpoints: dict[str, str], batch: int, steps: int,
                     warmup: int, node_pids: list[int]) -> dict[str, dict]:
    """Full training steps (forward + backward, Adam on the nodes) of each layer (interleaved): seconds,
    CPU seconds of this process and of the nodes (``node_pids``, those started here), expert calls the
    nodes received, nodes the step's experts live on."""
    node_calls = NodeCalls(endpoints)

    def nodes_cpu() -> float | None:
        used = [cpu_seconds(pid) for pid in node_pids]
        return sum(used) if node_pids and None not in used else None  # type: ignore[arg-type]

    runs = {}
    for name, layer in layers.items():
        def step(layer: dmoe.RemoteMoE = layer) -> dict[str, Any]:
            x = torch.randn(batch, HIDDEN, requires_grad=True)
            calls = node_calls()
            nodes_before, client_before = nodes_cpu(), time.process_time()
            start = time.perf_counter()
            layer(x).square().mean().backward()
            seconds = time.perf_counter() - start
            client_cpu, nodes_after = time.process_time() - client_before, nodes_cpu()
            calls = node_calls() - calls
            uids, experts_TK = layer.last_routing
            used = experts_TK.unique().tolist()
            layer.zero_grad(set_to_none=True)
            nodes_cpu_s = None if nodes_before is None or nodes_after is None else nodes_after - nodes_before
            return {"step_s": seconds, "client_cpu_s": client_cpu, "nodes_cpu_s": nodes_cpu_s,
                    "cpu_s": client_cpu + nodes_cpu_s if nodes_cpu_s is not None else None,
                    "experts": len(used), "calls": calls,
                    "nodes_touched": len({endpoints[uids[e]] for e in used}), "failed": layer.last_num_failed}

        runs[name] = step
    try:
        sampled = interleaved(runs, steps, warmup)
    finally:
        node_calls.close()
    results = {}
    for name, samples in sampled.items():
        results[name] = {"batch": batch, "samples": samples, "median_step_s": median_of(samples, "step_s"),
                         **{f"median_{field}": median_of(samples, field)
                            for field in ("experts", "calls", "nodes_touched", "client_cpu_s")},
                         **{f"median_{field}": (median_of(samples, field) if samples[0][field] is not None
                                                else None) for field in ("nodes_cpu_s", "cpu_s")},
                         "failed_calls": sum(s["failed"] for s in samples)}
        print(f"  train {name} T={batch}: {results[name]['median_step_s']:.3f} s/step, "
              f"{results[name]['median_calls']:g} calls, CPU {_ms(results[name]['median_client_cpu_s'])} ms "
              f"client + {_ms(results[name]['median_nodes_cpu_s'])} ms nodes", flush=True)
    return results


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.0f}"


def training_ratios(train: dict[str, dict], loops: list[str], field: str = "median_step_s"
                    ) -> dict[str, float]:
    """Per-expert / batched step time (or ``field``, e.g. median_cpu_s) on each grid, 256 / 8 experts
    per path, asyncio / uvloop."""
    def step(name: str, loop: str) -> float | None:
        result = train.get(name + (f" {loop}" if len(loops) > 1 else ""))
        return result[field] if result else None

    ratios = {}
    for loop in loops:
        tail = f" ({loop})" if len(loops) > 1 else ""
        for grid in FULL_STEP_GRIDS:
            per_expert, batched = step(f"{grid} per-expert", loop), step(f"{grid} batched", loop)
            if per_expert and batched:
                ratios[f"{grid} experts: per-expert / batched{tail}"] = per_expert / batched
            unpacked = step(f"{grid} unpacked", loop)
            if unpacked and batched:
                ratios[f"{grid} experts: unpacked / batched{tail}"] = unpacked / batched
        for path in PATHS:
            many, few = step(f"256 {path}", loop), step(f"8 {path}", loop)
            if many and few:
                ratios[f"{path}: 256 / 8 experts{tail}"] = many / few
        for grid in FULL_STEP_GRIDS:  # the old path whole: a call per expert, each expert alone on its node
            old, new = step(f"{grid} per-expert ungrouped", loop), step(f"{grid} batched", loop)
            if old and new:
                ratios[f"{grid} experts: per-expert ungrouped / batched grouped{tail}"] = old / new
            ungrouped, grouped = step(f"{grid} batched ungrouped", loop), step(f"{grid} batched", loop)
            if ungrouped and grouped:
                ratios[f"{grid} experts: batched, ungrouped / grouped{tail}"] = ungrouped / grouped
        many, few = step("256 batched ungrouped", loop), step("8 batched ungrouped", loop)
        if many and few:
            ratios[f"batched ungrouped: 256 / 8 experts{tail}"] = many / few
    if len(loops) == 2 and step("4096 batched", "uvloop") and step("4096 batched", "asyncio"):
        ratios["4096 batched: asyncio / uvloop"] = (step("4096 batched", "asyncio")
                                                    / step("4096 batched", "uvloop"))
    return ratios


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
    parser.add_argument("--lookup", choices=[*LOOKUPS, "both"], default="both",
                        help="the beam search measured (see lookup_with); both: each, side by side")
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio", "both"], default="uvloop",
                        help="event loop of the client Swarm; both: each, side by side")
    parser.add_argument("--heartbeat-interval", type=float, default=500.0,
                        help="nodes' DHT heartbeat (s); long, so that no beat runs during the timings")
    parser.add_argument("--record-ttl", type=float, default=590.0,
                        help="nodes' DHT record lifetime (s, < 600)")
    parser.add_argument("--swarm", action="append", default=[],
                        help="measure this running swarm (multiaddr; repeat for several), start none")
    parser.add_argument("--discovery-timeout", type=float, default=180.0,
                        help="seconds to wait until the client sees all experts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-threads", type=int, default=1,
                        help="torch threads of this client process (the nodes run with --num-threads 1): on "
                             "a machine of few cores shared with the nodes, more turn each tiny op of a step "
                             "into a parallel region that waits for busy cores")
    parser.add_argument("--node-grouping", choices=["on", "off", "both"], default="on",
                        help="nodes run waiting batches of same-shaped experts as one group (--grouping); "
                             "both: the full step measured on nodes with it and, in a second local swarm, "
                             "on nodes without it")
    args = parser.parse_args()
    if not 1 <= args.nodes <= GRID[0] or args.steps < 1 or args.warmup < 0 or min(args.batch) < 1:
        parser.error(f"need 1 <= --nodes <= {GRID[0]}, --steps >= 1, --warmup >= 0, --batch >= 1")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind the context managers: stop the servers
    loops = ["uvloop", "asyncio"] if args.event_loop == "both" else [args.event_loop]
    lookups = list(LOOKUPS) if args.lookup == "both" else [args.lookup]
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.client_threads)
    counters = Counters()
    out: dict[str, Any] = {"config": {
        "grid": list(GRID), "experts": GRID[0] * GRID[1], "nodes": args.nodes, "hidden": HIDDEN,
        "inner": INNER, "k": K, "beam_size": args.beam_size or 2 * K, "batches": args.batch,
        "steps": args.steps, "train_steps": args.train_steps, "warmup": args.warmup, "event_loops": loops,
        "lookups": lookups, "lookup_timeout": LOOKUP_TIMEOUT,
        "external_swarm": args.swarm, "node_grouping": args.node_grouping,
        "heartbeat_interval": args.heartbeat_interval, "record_ttl": args.record_ttl,
        "torch_threads": args.client_threads, "cpus": os.cpu_count()}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        swarm_addrs, node_pids = args.swarm, []
        if not swarm_addrs:
            swarm_addrs, node_pids = stack.enter_context(local_swarm(
                args.nodes, args.heartbeat_interval, args.record_ttl, Path(tmp), args.node_grouping != "off"))
            out["swarm_start_s"] = time.monotonic() - started
            print(f"coordinator + {args.nodes} nodes up in {out['swarm_start_s']:.1f}s", flush=True)
        swarms: dict[tuple[str, str], dmoe.Swarm] = {}
        for loop in loops:
            for mode, (ttl, breadth) in MODES.items():
                swarms[loop, mode] = stack.enter_context(dmoe.Swarm(dmoe.SwarmConfig(
                    initial_peers=swarm_addrs, cache_ttl=ttl, event_loop=loop,
                    lookup_timeout=LOOKUP_TIMEOUT, lookup_breadth=breadth)))
        probe = swarms[loops[0], "cold-every-peer"]
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
                out["lookup"].update(measure_lookup(layers, loops, lookups, batch, counters, live_mask,
                                                    args.steps, args.warmup))
        out["train"], out["train_ratios"], out["train_cpu_ratios"] = {}, {}, {}
        if args.train_steps > 0:
            cached = {loop: swarms[loop, "cached"] for loop in loops}
            train_layers, endpoints = full_step_layers(cached, loops)
            out["train"] = measure_training(train_layers, endpoints, max(args.batch), args.train_steps,
                                            args.warmup, node_pids)
    if args.train_steps > 0 and args.node_grouping == "both" and not args.swarm:
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
            print("full step again, on nodes without --grouping", flush=True)
            swarm_addrs, node_pids = stack.enter_context(local_swarm(
                args.nodes, args.heartbeat_interval, args.record_ttl, Path(tmp), grouping=False))
            cached = {loop: stack.enter_context(dmoe.Swarm(dmoe.SwarmConfig(
                initial_peers=swarm_addrs, cache_ttl=CACHED_TTL, event_loop=loop,
                lookup_timeout=LOOKUP_TIMEOUT))) for loop in loops}
            wait_for_all(cached[loops[0]], args.discovery_timeout)
            train_layers, endpoints = full_step_layers(cached, loops)
            ungrouped = measure_training(train_layers, endpoints, max(args.batch), args.train_steps,
                                         args.warmup, node_pids)
            for name, result in ungrouped.items():  # "4096 batched uvloop" -> "4096 batched ungrouped uvloop"
                grid, path, *loop = name.split(" ")
                out["train"][" ".join([grid, path, "ungrouped", *loop])] = result
    if out["train"]:
        out["train_ratios"] = training_ratios(out["train"], loops)
        if out["train"][next(iter(out["train"]))]["median_cpu_s"] is not None:
            out["train_cpu_ratios"] = training_ratios(out["train"], loops, "median_cpu_s")

    print_tables(out)
    (RESULTS / "bench_lookup.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'bench_lookup.json'}")


def print_tables(out: dict[str, Any]) -> None:
    cfg = out["config"]
    print(f"\ngating + lookup per step: {cfg['grid'][0]}x{cfg['grid'][1]} grid ({cfg['experts']} experts) "
          f"on {cfg['nodes']} nodes, k={cfg['k']}, beam {cfg['beam_size']}; medians of {cfg['steps']} "
          f"steps (ms)")
    head = (f"{'config':<34} {'gate':>6} {'lookup':>8} {'score':>7} {'total':>8} {'expanded':>8} "
            f"{'DHT keys':>8} {'DHT gets':>8} {'candidates':>10} {'true top-k: tokens':>18} {'pairs':>6}")
    print(head)
    print("-" * len(head))
    for name, r in out["lookup"].items():
        print(f"{name:<34} {r['median_gate_s'] * 1e3:>6.2f} {r['median_lookup_s'] * 1e3:>8.2f} "
              f"{r['median_score_s'] * 1e3:>7.2f} {r['median_route_s'] * 1e3:>8.2f} "
              f"{r['median_expanded_prefixes']:>8g} {r['median_dht_keys_read']:>8g} "
              f"{r['median_dht_traversals']:>8g} {r['median_num_candidates']:>10g} "
              f"{r['fraction_tokens_true_topk']:>18.3f} {r['fraction_pairs_found']:>6.3f}")
    print("(expanded: level-1 prefixes the beam search expands; DHT keys: prefix keys read from the DHT; "
          "DHT gets: DHT traversals;\n true top-k: fraction of tokens / of (token, slot) pairs whose true "
          "top-k among all live experts are candidates)")
    if out["train"]:
        print(f"\nfull training step (forward + backward, Adam on the nodes), cache warm, experts of hidden "
              f"{cfg['hidden']}, inner {cfg['inner']} on {cfg['nodes']} nodes; medians of "
              f"{cfg['train_steps']} steps;\ncalls: expert calls the nodes received (forward + backward), "
              f"goal 2 per node touched; CPU ms: CPU time of the step in this process (client) and the "
              f"nodes, medians")
        head = (f"{'experts / path':<28} {'tokens':>6} {'s/step':>8} {'min':>8} {'max':>8} {'CPU ms':>7} "
                f"{'client':>6} {'nodes':>6} {'experts':>7} {'nodes':>5} {'calls':>6} {'failed':>6}")
        print(head)
        print("-" * len(head))
        for name, r in out["train"].items():
            times = [s["step_s"] for s in r["samples"]]
            print(f"{name:<28} {r['batch']:>6} {r['median_step_s']:>8.3f} {min(times):>8.3f} "
                  f"{max(times):>8.3f} {_ms(r['median_cpu_s']):>7} {_ms(r['median_client_cpu_s']):>6} "
                  f"{_ms(r['median_nodes_cpu_s']):>6} {r['median_experts']:>7g} "
                  f"{r['median_nodes_touched']:>5g} {r['median_calls']:>6g} {r['failed_calls']:>6}")
        cpu = out.get("train_cpu_ratios", {})
        for name, ratio in out["train_ratios"].items():
            print(f"{name}: {ratio:.2f}x" + (f" (CPU per step: {cpu[name]:.2f}x)" if name in cpu else ""))


if __name__ == "__main__":
    main()
