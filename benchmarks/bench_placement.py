"""Benchmark: placement by demand. How long a volunteer started with only ``--swarm`` takes to serve
its first call, and how evenly the placement covers the demand, against the hand-picked start of
today, side by side in one run.

**Part 1 — join time, measured on processes (127.0.0.1).** Per model size (``--sizes``, hidden x
inner, ``--num-experts`` experts ``ffn.[0:N]``, Adam), two swarms, each a coordinator publishing the
model spec (``dmoe coordinator start --model spec.toml``): in ``trained``, ``--existing`` nodes
started with only ``--swarm`` and ``--max-experts`` host every expert once, and every expert has been
trained ``--train-steps`` Backward calls (version > 0), so a newcomer downloads their state; ``empty``
has no node, so nobody has state to give. Newcomers, one at a time, each stopped (and its records
gone from the DHT) before the next, interleaved run by run (``--configs``, start/swarm):

* ``placed`` — ``dmoe node start --swarm ADDR --max-experts B``: it follows the spec, measures its
  throughput, reads the swarm and picks its experts (:func:`dmoe.core.placement.choose`);
* ``hand-picked`` — ``dmoe node start --swarm ADDR --experts ... --hidden-dim ... --inner-dim ...``
  with the uids the ``placed/trained`` newcomer of the same run picked;

``placed/trained``, ``hand-picked/trained`` (both with the state download) and ``hand-picked/empty``
(the same start without it) by default; ``placed/empty`` too on request. Reported: seconds from the
spawn to the ready file (``ready``) and to the first call served (``first call``: the newcomer's node
record found in the DHT, as a client finds it, then a Forward to one of its experts answered), the
bytes its ready file says it took from replicas (``transferred``) and the version it serves (the
trained one, or 0); from its log, the seconds from the spawn to its DHT peer up (``joined``: imports
and DHT start), to its experts chosen (``placed``: throughput measured, swarm read) and to its server
up (``serving``: experts built, state downloaded), and the tokens/s it measured; medians of
``--runs`` runs. Nodes run with their defaults (CPU threads included); only the coordinators run
without a relay (``--no-offer-relay``), as in the integration tests.

**Part 2 — balance quality, planned by the real planner on a modeled swarm (not measured on
processes).** ``--model-experts`` (64) experts, ``--model-nodes`` (8) nodes of budget
``--model-budget`` (16), each node's measured throughput drawn log-uniform in
``--model-throughput`` (one expert alone, tokens/s; each of its experts gets 1/budget of it, as
:mod:`dmoe.node.placement` counts it), demand ``--model-load`` of the swarm's capacity in all, spread
``uniform``, ``zipf`` (1/rank over a random order: the top expert wants more than a replica on every
node gives), ``hot-25%`` or ``hot-50%`` (4 experts take that share; at 50% they too want more than
every node gives). Layouts:

* ``demand`` — nodes join one by one, each seeing the earlier ones (:func:`choose` on a
  :class:`Picture` of the demand and the other nodes' replicas), then rebalance as the node does
  (:class:`dmoe.node.placement.Rebalancer`: in turns, in random order, a node makes every move that
  covers an expert with no replica, else one move for demand or spread that :func:`plan_moves` finds,
  dropping only what another node still hosts) until a whole round moves nothing;
* ``demand-together`` — the same, but the nodes join together, none seeing the others (as nodes
  started at once do), then rebalance;
* ``late-demand`` — the nodes join and settle with no demand (by fewest replicas), then a trainer
  publishes its demand and they rebalance;
* ``fewest-replicas`` — the same functions given no demand (what nodes do before any trainer
  publishes), then measured against the demand;
* ``hand-blocks`` — the hand-picked layout of today: node i hosts the contiguous block
  ``[i*budget, (i+1)*budget)`` mod the experts (``--experts 'ffn.[0:16]'``, ``'ffn.[16:32]'``...);
* ``hand-same`` — every node hosts the same first block.

Reported, from :func:`dmoe.core.placement.balance`: the worst demand/throughput ratio, worst/mean,
coefficient of variation (all three over the experts with a replica), uncovered experts and the share
of the demand they get, replicas min/max; the moves made and how many of them took back an earlier
move of the same node; the worst ratio right after the joins; and a lower bound of the worst ratio
(all demand over all throughput, and each expert's demand over one replica on every node); medians
over ``--model-seeds`` seeds.

**Part 2 on processes (``--real-swarm``, about a minute or two more).** A coordinator publishing a
16-expert model (hidden 8), 4 nodes started one by one with only ``--swarm``, ``--max-experts 8`` and
short intervals (heartbeat 1 s, record TTL 4 s, ``--rebalance-interval 2``), no demand: their
placement (by fewest replicas) read from their node records once it settled; then ``hot-50%`` demand
published by a :class:`dmoe.core.demand.DemandPublisher` in this process (``--model-load`` of the
throughputs the nodes published) and the nodes' rebalancing left to run until the placement settles
(no change for 8 s). Both measured with :func:`balance` against that demand (replica throughputs as
the nodes published them), the moves counted from the nodes' logs, and beside them the planner on a
modeled swarm with the same throughputs and demand.

Every process started is stopped at the end, also on an error or SIGTERM. Writes
``benchmarks/results/bench_placement.json`` and the processes' logs under
``results/bench_placement_run/``.

Run::

    python benchmarks/bench_placement.py [--runs 3] [--sizes 64x256 256x1024] [--quick]
        [--configs placed/trained hand-picked/trained hand-picked/empty placed/empty]
        [--skip-join] [--skip-model] [--real-swarm]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

from common import write_report

from dmoe.core.placement import Picture, balance, choose, plan_moves
from dmoe.node.placement import designated_dropper
from dmoe.testing.process import spawn_logged, wait_until

RESULTS = Path(__file__).resolve().parent / "results"
RUN_DIR = RESULTS / "bench_placement_run"
START_TIMEOUT_S = 180.0  # a node's start, state download included, on a loaded machine
STOP_GRACE_S = 30.0
GONE_TIMEOUT_S = 45.0  # a stopped node's records leave the DHT (withdrawn; else they expire in 30 s)
PREFIX = "ffn"
MODEL_NAME = "bench"
ALL_CONFIGS = ["placed/trained", "hand-picked/trained", "hand-picked/empty", "placed/empty"]


class Stopped(Exception):
    """SIGTERM arrived: stop every process and write what was measured."""


# ---- processes ---------------------------------------------------------------------------------------
class Processes:
    """Every process the benchmark started, each in its own process group; stop_all() stops them all."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        proc = spawn_logged(cmd, self.logdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """SIGTERM to the process alone (a node then withdraws its records through its DHT daemon, which
        a signal to the whole group would kill first), SIGKILL to what is left of its group after the
        grace."""
        Processes.stop_many([proc])

    @staticmethod
    def stop_many(procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def stop_all(self) -> None:
        self.stop_many([p for p in self.procs if p.returncode is None])


# ---- part 1: join time ---------------------------------------------------------------------------------
class JoinSwarm:
    """One swarm of part 1: a coordinator publishing the spec, maybe nodes hosting (and trained), a
    reader DHT peer in this process (the client that finds newcomers), and the newcomers' runs."""

    def __init__(self, name: str, spec_path: Path, procs: Processes, workdir: Path):
        self.name, self.spec_path, self.procs, self.workdir = name, spec_path, procs, workdir
        self.coordinator: dict = {}
        self.reader = None
        self.existing: list[dict] = []
        self.num_spawned = 0

    def spawn_coordinator(self) -> None:
        self._coordinator_ready = self.workdir / f"{self.name}-coordinator.json"
        cmd = [sys.executable, "-m", "dmoe", "coordinator", "start", "--model", str(self.spec_path),
               "--no-offer-relay", "--ready-file", str(self._coordinator_ready)]
        self._coordinator_proc = self.procs.spawn(cmd, f"{self.name}-coordinator")

    def wait_coordinator(self) -> None:
        """The coordinator serving, and its spec found in the DHT by this process's reader peer."""
        from dmoe.core.dht import DHTPeer
        from dmoe.testing.process import wait_ready_file

        self.coordinator = wait_ready_file(self._coordinator_ready, self._coordinator_proc, START_TIMEOUT_S,
                                           f"{self.name} coordinator")
        self.reader = DHTPeer(initial_peers=self.coordinator["swarm"], client_mode=True).start()
        wait_until(self._spec_found, 30, f"the model spec in the {self.name} swarm", interval=0.2)

    def _spec_found(self) -> bool:
        from dmoe.core.modelspec import find_specs

        return MODEL_NAME in find_specs(self.reader)

    @property
    def address(self) -> str:
        return self.coordinator["swarm"][0]

    def spawn(self, extra: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        ready = self.workdir / f"{self.name}-{name}-{self.num_spawned}.ready.json"
        self.num_spawned += 1
        cmd = [sys.executable, "-m", "dmoe", "node", "start", "--swarm", self.address, *extra,
               "--ready-file", str(ready)]
        return self.procs.spawn(cmd, f"{self.name}-{name}"), ready

    def nodes(self) -> dict:
        from dmoe.core.records import find_nodes

        return find_nodes(self.reader)

    def add_existing(self, budget: int) -> dict:
        """A node started with only --swarm and --max-experts, that stays for the whole part."""
        from dmoe.testing.process import wait_ready_file

        proc, ready_path = self.spawn(["--max-experts", str(budget)], f"existing{len(self.existing)}")
        ready = wait_ready_file(ready_path, proc, START_TIMEOUT_S, f"{self.name} existing node")
        entry = {"proc": proc, "ready": ready}
        self.existing.append(entry)
        wait_until(lambda: ready["node_id"] in self.nodes(), 30, "the existing node's record", interval=0.2)
        return entry

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.shutdown()
            self.reader = None


def expert_stub(endpoint: str):
    import grpc

    from dmoe.proto import expert_pb2_grpc as pbg

    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20),
                                                       ("grpc.max_send_message_length", 64 << 20)])
    return channel, pbg.ExpertServiceStub(channel)


def train(endpoint: str, uids: list[str], hidden: int, steps: int) -> dict[str, int]:
    """``steps`` Backward calls per uid (the node's Adam steps them); returns each uid's version then."""
    import torch

    from dmoe.core.wire import serialize
    from dmoe.proto import expert_pb2 as pb

    channel, stub = expert_stub(endpoint)
    generator = torch.Generator().manual_seed(0)
    try:
        for uid in uids:
            for _ in range(steps):
                x = torch.randn(16, hidden, generator=generator)
                stub.Backward(pb.BackwardRequest(uid=uid, inputs=[serialize(x)],
                                                 grad_outputs=[serialize(1e-2 * x)]), timeout=60)
        return {uid: stub.Info(pb.InfoRequest(uids=[uid]), timeout=30).experts[0].version for uid in uids}
    finally:
        channel.close()


def first_call(swarm: JoinSwarm, node_id: str, hidden: int, timeout: float) -> tuple[str, int]:
    """What a client does to use the newcomer: find its node record in the DHT, then send a Forward to
    the first expert it lists and check the answer's shape. Returns (uid, the version it serves)."""
    import torch

    from dmoe.core.wire import deserialize, serialize
    from dmoe.proto import expert_pb2 as pb

    record = wait_until(lambda: swarm.nodes().get(node_id), timeout, "the newcomer's node record", 0.02)
    uid = sorted(record.experts)[0]
    channel, stub = expert_stub(record.endpoint)
    try:
        x = torch.randn(8, hidden)
        reply = stub.Forward(pb.ForwardRequest(uid=uid, inputs=[serialize(x)]), timeout=60)
        y = deserialize(reply.outputs[0], max_numel=1 << 24)
        if tuple(y.shape) != (8, hidden):
            raise RuntimeError(f"{uid} answered a Forward with shape {tuple(y.shape)}")
        version = stub.Info(pb.InfoRequest(uids=[uid]), timeout=30).experts[0].version
    finally:
        channel.close()
    return uid, version


PHASES = {  # what a node logs as it starts, in order: seconds from the spawn to each line
    "joined_s": "dmoe.node.node: joined the swarm",  # imports done, DHT peer up
    "placed_s": "dmoe.node.node: placement:",  # throughput measured, swarm read, experts chosen
    "serving_s": "dmoe.node.node: serving ",  # experts built, state downloaded, gRPC server up
    "announced_s": "dmoe.node.node: announced ",  # records in the DHT
}


def log_phases(log_path: Path, spawned: float) -> dict[str, float]:
    """Seconds from ``spawned`` (wall clock) to the first line of each phase in a node's log."""
    import datetime

    found: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        for phase, marker in PHASES.items():
            if phase not in found and marker in line:
                try:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                found[phase] = round(stamp - spawned, 3)
    return found


def logged_throughput(log_path: Path) -> float | None:
    """The tokens/s a placed node says one of its experts serves (measured at start), from its log."""
    import re

    found = re.search(r"one serves (\d+) tokens/s", log_path.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def logged_moves(logs: dict[Path, int]) -> dict:
    """The moves nodes logged (``moved A -> B (reason)``) past the given offsets of their logs: how many,
    by reason, and how many took back an earlier move of the same node."""
    import re

    moves, by_reason, reverted = 0, {}, 0
    for path, offset in logs.items():
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        made: set[tuple[str, str]] = set()
        for dropped, added, reason in re.findall(r"moved (\S+) -> (\S+) \((\w+)\)", text):
            moves += 1
            by_reason[reason] = by_reason.get(reason, 0) + 1
            reverted += (added, dropped) in made
            made.add((dropped, added))
    return {"moves": moves, "moves_by_reason": by_reason, "reverted": reverted}


def join_once(swarm: JoinSwarm, extra: list[str], name: str, hidden: int) -> dict:
    """Spawn a newcomer, time it to its ready file and to its first call, stop it, wait until its records
    are gone from the DHT; its figures."""
    import json

    spawned, started = time.time(), time.perf_counter()
    proc, ready_path = swarm.spawn(extra, name)
    try:
        while not ready_path.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready "
                                   f"(log: {swarm.procs.logdir}/{swarm.name}-{name}.log)")
            if time.perf_counter() - started > START_TIMEOUT_S:
                raise TimeoutError(f"{name} not ready after {START_TIMEOUT_S:.0f}s")
            time.sleep(0.02)
        ready_s = time.perf_counter() - started
        ready = json.loads(ready_path.read_text())
        uid, version = first_call(swarm, ready["node_id"], hidden, timeout=30)
        first_call_s = time.perf_counter() - started
    finally:
        swarm.procs.stop(proc)
    transferred = ready.get("transferred", {})
    node_id = ready["node_id"]
    wait_until(lambda: node_id not in swarm.nodes(), GONE_TIMEOUT_S, f"{name}'s records to leave", 0.2)
    return {
        "ready_s": round(ready_s, 3), "first_call_s": round(first_call_s, 3),
        "phases": log_phases(swarm.procs.logdir / f"{swarm.name}-{name}.log", spawned),
        "measured_tokens_per_s": logged_throughput(swarm.procs.logdir / f"{swarm.name}-{name}.log"),
        "experts": ready["experts"], "called": uid, "version_served": version,
        "num_transferred": len(transferred),
        "transferred_bytes": sum(t["bytes"] for t in transferred.values()),
        "transfer_s_max": max((t["seconds"] for t in transferred.values()), default=0.0),
        "transferred_versions": sorted({t["version"] for t in transferred.values()}),
    }


def run_join_size(hidden: int, inner: int, args: argparse.Namespace, procs: Processes, workdir: Path) -> dict:
    """Part 1 for one model size: the swarms, the existing nodes trained, then --runs rounds of the
    newcomer configurations (--configs)."""
    spec_path = workdir / f"spec-{hidden}x{inner}.toml"
    spec_path.write_text(f'name = "{MODEL_NAME}"\nexperts = ["{PREFIX}.[0:{args.num_experts}]"]\n'
                         f'hidden_dim = {hidden}\ninner_dim = {inner}\noptimizer = "adam"\nlr = 0.001\n')
    uids = [f"{PREFIX}.{i}" for i in range(args.num_experts)]
    wanted = {"trained"} | {config.split("/")[1] for config in args.configs}
    swarms = {where: JoinSwarm(f"{where}-{hidden}", spec_path, procs, workdir)
              for where in ("trained", "empty") if where in wanted}
    try:
        for swarm in swarms.values():  # the coordinators start at once
            swarm.spawn_coordinator()
        for swarm in swarms.values():
            swarm.wait_coordinator()
        trained = swarms["trained"]
        per_node = math.ceil(args.num_experts / args.existing)
        for _ in range(args.existing):
            trained.add_existing(per_node)

        def covered():
            hosted = {uid for record in trained.nodes().values() for uid in record.experts}
            return set(uids) <= hosted

        wait_until(covered, 60, "every expert hosted by the existing nodes", interval=0.2)
        versions: dict[str, int] = {}
        for entry in trained.existing:
            versions |= train(entry["ready"]["endpoint"], entry["ready"]["experts"], hidden, args.train_steps)
        print(f"  {hidden}x{inner}: {len(trained.existing)} existing nodes host {len(versions)} experts, "
              f"trained to versions {sorted(set(versions.values()))}", flush=True)
        configs = [tuple(config.split("/")) for config in args.configs]
        runs: dict[str, list[dict]] = {f"{how}/{where}": [] for how, where in configs}
        for run in range(args.runs):
            picked: list[str] = []
            for how, where in configs:
                if how == "placed":
                    extra = ["--max-experts", str(args.budget)]
                else:
                    if not picked:
                        raise RuntimeError("no placed newcomer picked experts to hand-pick")
                    extra = [arg for uid in picked for arg in ("--experts", uid)]
                    extra += ["--hidden-dim", str(hidden), "--inner-dim", str(inner)]
                result = join_once(swarms[where], extra, f"{how}{run}", hidden)
                if how == "placed" and where == "trained":
                    picked = result["experts"]
                runs[f"{how}/{where}"].append(result)
                print(f"  {hidden}x{inner} run {run} {how:<11} {where:<7}: ready {result['ready_s']:6.2f}s, "
                      f"first call {result['first_call_s']:6.2f}s, "
                      f"{result['transferred_bytes'] / 1e6:6.2f} MB ({result['num_transferred']} experts), "
                      f"serves version {result['version_served']}", flush=True)
        medians = {}
        for key, results in runs.items():
            medians[key] = {
                "ready_s": statistics.median(r["ready_s"] for r in results),
                "first_call_s": statistics.median(r["first_call_s"] for r in results),
                "transferred_mb": statistics.median(r["transferred_bytes"] for r in results) / 1e6,
                "num_transferred": statistics.median(r["num_transferred"] for r in results)}
            for phase in PHASES:
                values = [r["phases"][phase] for r in results if phase in r["phases"]]
                if values:
                    medians[key][phase] = statistics.median(values)
        return {"hidden": hidden, "inner": inner, "num_experts": args.num_experts, "budget": args.budget,
                "existing_nodes": [e["ready"]["experts"] for e in trained.existing],
                "trained_versions": versions, "runs": runs, "median": medians}
    finally:
        for swarm in swarms.values():
            swarm.shutdown()
        procs.stop_all()


# ---- part 2: balance quality on a modeled swarm ---------------------------------------------------------
def demand_of(kind: str, uids: list[str], total: float, rng: random.Random,
              zipf_exponent: float) -> dict[str, float]:
    """Tokens/s per uid, ``total`` in all: ``uniform``; ``zipf`` (1/rank^exponent over a random order);
    ``hot-NN%`` (4 random experts take NN% of it, the others share the rest evenly)."""
    if kind == "uniform":
        weights = [1.0] * len(uids)
    elif kind == "zipf":
        ranks = list(range(1, len(uids) + 1))
        rng.shuffle(ranks)
        weights = [1.0 / r**zipf_exponent for r in ranks]
    elif kind.startswith("hot-") and kind.endswith("%"):
        share = float(kind[4:-1]) / 100
        hot = set(rng.sample(range(len(uids)), NUM_HOT))
        num_cold = len(uids) - len(hot)
        weights = [share / len(hot) if i in hot else (1 - share) / num_cold for i in range(len(uids))]
    else:
        raise ValueError(f"unknown demand {kind!r}")
    scale = total / sum(weights)
    return {uid: w * scale for uid, w in zip(uids, weights, strict=True)}


def lower_bound(demand: dict[str, float], own: list[float], budget: int) -> float:
    """A worst ratio no placement goes below: all demand over all throughput, and each uid's demand over
    one replica on every node. (The best fractional placement, found with a max flow, gave the same
    figures on these swarms: the bound is loose only by the placement being integral.)"""
    return max(sum(demand.values()) / (budget * sum(own)), max(demand.values()) / sum(own))


def picture_without(uids: tuple[str, ...], demand: dict[str, float], hosted: list[set[str]],
                    own: list[float], me: int | None) -> Picture:
    """What node ``me`` sees: the demand and every other node's replicas with their throughput."""
    others: dict[str, list[float]] = {}
    for node, experts in enumerate(hosted):
        if node == me:
            continue
        for uid in experts:
            others.setdefault(uid, []).append(own[node])
    return Picture(uids=uids, demand=demand, others=others)


def planner_version() -> dict:
    """Which planner the figures come from: the commit of the checkout dmoe.core.placement is imported
    from, and whether its placement files differ from that commit."""
    import dmoe.core.placement

    root = Path(dmoe.core.placement.__file__).resolve().parents[2]
    version: dict = {"path": str(root)}
    try:
        version["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--",
                                  "dmoe/core/placement.py", "node/placement.py"])
        version["modified"] = changed.returncode != 0
    except (OSError, subprocess.CalledProcessError):
        version["commit"] = None
    return version


def with_dropper(picture: Picture, hosted: list[set[str]], node: int, epoch: int) -> Picture:
    """The picture with the uids node ``node`` may drop in ``epoch``: of those it shares, the ones whose
    designated dropper it is (as dmoe.node.placement.read_picture gives them)."""
    names = [f"node{n}" for n in range(len(hosted))]
    droppable = frozenset(uid for uid in hosted[node] if designated_dropper(
        uid, [names[n] for n, experts in enumerate(hosted) if uid in experts], epoch) == names[node])
    return dataclasses.replace(picture, droppable=droppable)


def rebalance(uids: tuple[str, ...], seen_demand: dict[str, float], hosted: list[set[str]], own: list[float],
              threshold: float, rng: random.Random, max_rounds: int) -> dict:
    """Nodes take turns (random order each round) as the node's Rebalancer does: every move covering an
    expert with no replica, else one move for demand or spread; until a round moves nothing (with a
    designated dropper per uid, a new one each round: until QUIET_ROUNDS rounds in a row move nothing)."""
    quiet_needed = QUIET_ROUNDS
    moves = {"uncovered": 0, "demand": 0, "spread": 0}
    made: list[tuple[int, str, str]] = []  # (node, dropped, added), in order
    reverted = 0  # moves that undo an earlier move of the same node (added back what it dropped)
    rounds = quiet = 0
    settled = False
    while rounds < max_rounds:
        rounds += 1
        moved = False
        order = list(range(len(hosted)))
        rng.shuffle(order)
        for node in order:
            picture = picture_without(uids, seen_demand, hosted, own, node)
            picture = with_dropper(picture, hosted, node, epoch=rounds)
            planned = plan_moves(picture, hosted[node], own[node], threshold=threshold,
                                 max_moves=max(1, len(hosted[node])), rng=rng)
            due = [m for m in planned if m.reason == "uncovered"] or planned[:1]
            for move in due:
                # as move_expert: add, then drop only if another node still hosts the dropped uid
                if not any(move.drop in experts for n, experts in enumerate(hosted) if n != node):
                    continue
                hosted[node].discard(move.drop)
                hosted[node].add(move.add)
                moves[move.reason] += 1
                reverted += (node, move.add, move.drop) in made
                made.append((node, move.drop, move.add))
                moved = True
        quiet = 0 if moved else quiet + 1
        if quiet >= quiet_needed:
            settled = True
            break
    return {"moves": sum(moves.values()), "moves_by_reason": moves, "reverted": reverted, "rounds": rounds,
            "settled": settled}


def model_layout(layout: str, uids: tuple[str, ...], demand: dict[str, float], own: list[float], budget: int,
                 threshold: float, rng: random.Random, max_rounds: int) -> dict:
    """Plan one layout; its balance against the true demand, moves and replica counts."""
    num_nodes = len(own)
    hosted: list[set[str]] = []
    moves: dict = {"moves": 0, "moves_by_reason": {}, "reverted": 0, "rounds": 0, "settled": True}
    if layout in ("demand", "demand-together", "fewest-replicas", "late-demand"):
        seen = {} if layout in ("fewest-replicas", "late-demand") else demand
        for node in range(num_nodes):
            if layout == "demand-together":
                picture = Picture(uids=uids, demand=seen, others={})
            else:
                picture = picture_without(uids, seen, hosted, own, None)
            hosted.append(set(choose(picture, budget, own[node], rng)))
        at_join = balance(picture_without(uids, demand, hosted, own, None))
        if layout == "late-demand":  # placed by fewest replicas, then a trainer publishes its demand
            rebalance(uids, seen, hosted, own, threshold, rng, max_rounds)
            seen = demand
        moves = rebalance(uids, seen, hosted, own, threshold, rng, max_rounds)
    elif layout == "hand-blocks":
        for node in range(num_nodes):
            hosted.append({uids[(node * budget + i) % len(uids)] for i in range(budget)})
        at_join = None
    elif layout == "hand-same":
        hosted = [set(uids[:budget]) for _ in range(num_nodes)]
        at_join = None
    else:
        raise ValueError(layout)
    result = balance(picture_without(uids, demand, hosted, own, None))
    # balance() leaves uncovered experts out of its ratios: the share of the demand they carry says it
    placed = set().union(*hosted)
    uncovered = sum(d for uid, d in demand.items() if uid not in placed)
    result["demand_uncovered"] = uncovered / sum(demand.values())
    return {"balance": result, "at_join": at_join, **moves}


QUIET_ROUNDS = 5
MODEL_LAYOUTS = ("demand", "demand-together", "late-demand", "fewest-replicas", "hand-blocks", "hand-same")
NUM_HOT = 4
# hot-25%: the hot experts' demand fits on a replica on every node (bound 0.8 at load 0.8); hot-50%:
# it does not (each needs 1.6 x the throughput of one replica on every node), as zipf's top expert
MODEL_DEMANDS = ("uniform", "zipf", "hot-25%", "hot-50%")
MODEL_METRICS = ("worst", "worst_over_mean", "cv", "uncovered", "demand_uncovered", "replicas_min",
                 "replicas_max")


def run_model(args: argparse.Namespace) -> dict:
    uids = tuple(f"{PREFIX}.{i}" for i in range(args.model_experts))
    low, high = args.model_throughput
    per_seed: dict[str, dict[str, list[dict]]] = {d: {layout: [] for layout in MODEL_LAYOUTS}
                                                  for d in MODEL_DEMANDS}
    bounds: dict[str, list[float]] = {d: [] for d in MODEL_DEMANDS}
    for seed in range(args.model_seeds):
        setup = random.Random(seed)
        # a node's measured throughput (one expert alone); each of its experts serves 1/budget of it
        node_throughput = [math.exp(setup.uniform(math.log(low), math.log(high)))
                           for _ in range(args.model_nodes)]
        own = [t / args.model_budget for t in node_throughput]
        capacity = sum(node_throughput)
        for kind in MODEL_DEMANDS:
            demand = demand_of(kind, list(uids), args.model_load * capacity, random.Random(seed * 1000 + 7),
                               args.zipf_exponent)
            bounds[kind].append(lower_bound(demand, own, args.model_budget))
            for layout in MODEL_LAYOUTS:
                rng = random.Random(seed * 7919 + zlib.crc32(layout.encode()))
                per_seed[kind][layout].append(model_layout(layout, uids, demand, own, args.model_budget,
                                                           args.model_threshold, rng, args.model_max_rounds))
    summary: dict[str, dict[str, dict]] = {}
    for kind in MODEL_DEMANDS:
        summary[kind] = {}
        for layout in MODEL_LAYOUTS:
            results = per_seed[kind][layout]
            row = {m: statistics.median(r["balance"][m] for r in results) for m in MODEL_METRICS}
            row["moves"] = statistics.median(r["moves"] for r in results)
            row["reverted"] = statistics.median(r["reverted"] for r in results)
            row["settled"] = sum(r["settled"] for r in results)
            if results[0]["at_join"] is not None:
                row["worst_at_join"] = statistics.median(r["at_join"]["worst"] for r in results)
                row["uncovered_at_join"] = statistics.median(r["at_join"]["uncovered"] for r in results)
            summary[kind][layout] = row
        summary[kind]["bound_worst"] = statistics.median(bounds[kind])
    return {
        "note": "planned by the real planner (dmoe.core.placement.choose / plan_moves) on a modeled swarm, "
                "measured with dmoe.core.placement.balance: not measured on processes",
        "planner": planner_version(),
        "config": {"experts": args.model_experts, "nodes": args.model_nodes, "budget": args.model_budget,
                   "throughput_range": list(args.model_throughput), "load": args.model_load,
                   "threshold": args.model_threshold, "seeds": args.model_seeds},
        "median": summary, "per_seed": per_seed,
    }


# ---- part 2 on processes (--real-swarm) -------------------------------------------------------------------
REAL_EXPERTS, REAL_NODES, REAL_BUDGET, REAL_DEMAND = 16, 4, 8, "hot-50%"
# short intervals, so that a few minutes of a real swarm pass in seconds
REAL_NODE_ARGS = ["--heartbeat-interval", "1", "--record-ttl", "4", "--rebalance-interval", "2",
                  "--average-interval", "0"]
REAL_SETTLE_S = 8.0  # the placement is settled once no node record changed for this long
REAL_SETTLE_TIMEOUT_S = 90.0


def placement_of(swarm: JoinSwarm) -> dict[str, tuple[str, ...]]:
    return {node_id: tuple(sorted(record.experts)) for node_id, record in swarm.nodes().items()}


def wait_settled(swarm: JoinSwarm, num_nodes: int, uids: list[str]) -> tuple[dict, int, float]:
    """Poll the node records until all ``num_nodes`` are listed, every uid hosted and nothing changed for
    REAL_SETTLE_S; returns (placement, experts added in between, seconds waited)."""
    began = time.monotonic()
    last, since, added = placement_of(swarm), time.monotonic(), 0
    while True:
        time.sleep(0.5)
        now = placement_of(swarm)
        if now != last:
            added += sum(len(set(now.get(n, ())) - set(last.get(n, ()))) for n in now if n in last)
            last, since = now, time.monotonic()
        hosted = {uid for experts in last.values() for uid in experts}
        if len(last) == num_nodes and set(uids) <= hosted and time.monotonic() - since >= REAL_SETTLE_S:
            return last, added, round(time.monotonic() - began - REAL_SETTLE_S, 1)
        if time.monotonic() - began > REAL_SETTLE_TIMEOUT_S:
            raise TimeoutError(f"the placement did not settle in {REAL_SETTLE_TIMEOUT_S:.0f}s: {last}")


def real_balance(swarm: JoinSwarm, uids: list[str], demand: dict[str, float]) -> dict:
    from dmoe.core.demand import replica_throughputs

    others = replica_throughputs(swarm.nodes())
    result = balance(Picture(uids=tuple(uids), demand=demand, others=others))
    uncovered = sum(d for uid, d in demand.items() if uid not in others)
    result["demand_uncovered"] = uncovered / sum(demand.values())
    return result


def run_real(args: argparse.Namespace, procs: Processes, workdir: Path) -> dict:
    """Part 2 on processes: REAL_NODES nodes started one by one with only --swarm, a budget and short
    intervals, no demand published (placement by fewest replicas); then a trainer's demand published
    (DemandPublisher) and the nodes' rebalancing left to run until the placement settles. Each placement
    read from the node records (find_nodes), measured against the demand; beside it, the planner on a
    modeled swarm with the same throughputs (the nodes' published ones) and demand."""
    import numpy as np

    from dmoe.core.demand import DemandPublisher

    uids = [f"{PREFIX}.{i}" for i in range(REAL_EXPERTS)]
    spec_path = workdir / "spec-real.toml"
    spec_path.write_text(f'name = "{MODEL_NAME}"\nexperts = ["{PREFIX}.[0:{REAL_EXPERTS}]"]\n'
                         'hidden_dim = 8\ninner_dim = 16\noptimizer = "sgd"\nlr = 0.01\n')
    swarm = JoinSwarm("real", spec_path, procs, workdir)
    publisher = None
    try:
        swarm.spawn_coordinator()
        swarm.wait_coordinator()
        from dmoe.testing.process import wait_ready_file

        for i in range(REAL_NODES):  # one by one: each sees the ones before it
            proc, ready = swarm.spawn(["--max-experts", str(REAL_BUDGET), *REAL_NODE_ARGS], f"node{i}")
            node_id = wait_ready_file(ready, proc, START_TIMEOUT_S, f"real node{i}")["node_id"]
            wait_until(lambda: node_id in swarm.nodes(), 30, "the node's record", interval=0.2)
        fewest, _, _ = wait_settled(swarm, REAL_NODES, uids)
        records = swarm.nodes()
        throughput = {n: r.throughput for n, r in records.items()}
        own = [throughput[n] / REAL_BUDGET for n in sorted(throughput)]
        demand = demand_of(REAL_DEMAND, uids, args.model_load * sum(throughput.values()), random.Random(0),
                           args.zipf_exponent)
        at_fewest = real_balance(swarm, uids, demand)
        print(f"  real swarm, no demand: worst {at_fewest['worst']:.3f}; publishing {REAL_DEMAND} demand",
              flush=True)
        rates = np.array([demand[uid] for uid in uids])
        logs = [procs.logdir / f"real-node{i}.log" for i in range(REAL_NODES)]
        offsets = {path: path.stat().st_size for path in logs}  # the moves made for the demand come after
        began = time.monotonic()
        publisher = DemandPublisher(swarm.reader, interval=1.0, time_constant=2.0)
        publisher.add(PREFIX, (REAL_EXPERTS,), lambda: (rates * (time.monotonic() - began)).astype(np.int64))
        publisher.start()
        by_demand, added, settle_s = wait_settled(swarm, REAL_NODES, uids)
        at_demand = real_balance(swarm, uids, demand)
        moves = logged_moves(offsets)
        modeled = {layout: model_layout(layout, tuple(uids), demand, own, REAL_BUDGET, args.model_threshold,
                                        random.Random(1), args.model_max_rounds)
                   for layout in ("late-demand", "demand", "fewest-replicas")}
        return {
            "note": "measured on processes: node records read with find_nodes, throughputs the nodes "
                    "measured and published; modeled: the planner on the same throughputs and demand",
            "experts": REAL_EXPERTS, "nodes": REAL_NODES, "budget": REAL_BUDGET, "demand_kind": REAL_DEMAND,
            "node_args": REAL_NODE_ARGS, "node_throughput": throughput, "demand": demand,
            "fewest_replicas": {"placement": fewest, "balance": at_fewest},
            "demand_rebalanced": {"placement": by_demand, "balance": at_demand, "experts_added": added,
                                  "seconds_to_settle": settle_s, **moves},
            "modeled": {layout: {"balance": r["balance"], "moves": r["moves"], "reverted": r["reverted"]}
                        for layout, r in modeled.items()},
            "bound_worst": lower_bound(demand, own, REAL_BUDGET),
        }
    finally:
        if publisher is not None:
            publisher.stop()
        swarm.shutdown()
        procs.stop_all()


def print_real(real: dict) -> None:
    print(f"\nPart 2 on processes: {real['nodes']} nodes (budget {real['budget']}) started one by one with "
          f"only --swarm, --max-experts and short intervals, {real['experts']} experts, "
          f"{real['demand_kind']} demand published after they settled (placement read from the node records)")
    print(f"{'layout':<34} {'worst':>7} {'worst/mean':>10} {'cv':>6} {'uncov':>6} {'rep min':>7} "
          f"{'rep max':>7} {'moves':>6} {'undone':>6}")
    rebalanced, modeled = real["demand_rebalanced"], real["modeled"]
    rows = [("processes: fewest replicas", real["fewest_replicas"]["balance"], "-", "-"),
            ("processes: demand (rebalanced)", rebalanced["balance"], rebalanced["moves"],
             rebalanced["reverted"]),
            ("modeled, same inputs: late-demand", modeled["late-demand"]["balance"],
             modeled["late-demand"]["moves"], modeled["late-demand"]["reverted"]),
            ("modeled, same inputs: demand", modeled["demand"]["balance"], modeled["demand"]["moves"],
             modeled["demand"]["reverted"]),
            ("modeled, same inputs: fewest", modeled["fewest-replicas"]["balance"],
             modeled["fewest-replicas"]["moves"], modeled["fewest-replicas"]["reverted"])]
    for name, b, moves, undone in rows:
        print(f"{name:<34} {b['worst']:>7.3f} {b['worst_over_mean']:>10.2f} {b['cv']:>6.2f} "
              f"{b['uncovered']:>6g} {b['replicas_min']:>7g} {b['replicas_max']:>7g} {moves:>6} {undone:>6}")
    throughput = ", ".join(f"{t:.0f}" for t in sorted(real["node_throughput"].values()))
    print(f"tokens/s the nodes measured (one expert): {throughput}")
    print(f"{'(lower bound)':<34} {real['bound_worst']:>7.3f}; settled "
          f"{real['demand_rebalanced']['seconds_to_settle']:.1f}s after the demand was published")


# ---- the report ----------------------------------------------------------------------------------------
def print_join(sizes: list[dict]) -> None:
    print("\nPart 1: join time, measured on processes on 127.0.0.1 (medians)")
    print("seconds from the spawn: joined (imports, DHT peer up), placed (throughput measured, experts "
          "chosen), serving (experts built, state downloaded), ready (ready file), first call (found in the "
          "DHT, a Forward answered)")
    print(f"{'model':<10} {'start':<12} {'swarm':<8} {'joined':>7} {'placed':>7} {'serving':>8} {'ready':>7} "
          f"{'1st call':>8} {'MB taken':>9} {'experts taken':>14}")

    def cell(m: dict, phase: str, width: int) -> str:
        return f"{m[phase]:>{width}.2f}" if phase in m else f"{'-':>{width}}"

    for size in sizes:
        for key, m in size["median"].items():
            how, where = key.split("/")
            print(f"{size['hidden']}x{size['inner']:<6} {how:<12} {where:<8} {cell(m, 'joined_s', 7)} "
                  f"{cell(m, 'placed_s', 7)} {cell(m, 'serving_s', 8)} {m['ready_s']:>7.2f} "
                  f"{m['first_call_s']:>8.2f} {m['transferred_mb']:>9.2f} {m['num_transferred']:>14g}")


def print_model(model: dict) -> None:
    config = model["config"]
    print(f"\nPart 2: balance quality, PLANNED by the real planner on a MODELED swarm (not processes): "
          f"{config['experts']} experts, {config['nodes']} nodes of budget {config['budget']}, node "
          f"throughput {config['throughput_range'][0]:g}-{config['throughput_range'][1]:g} tokens/s, demand "
          f"{config['load']:g} of capacity; medians of {config['seeds']} seeds")
    planner = model["planner"]
    print(f"planner: {planner['path']} at {planner['commit']}"
          f"{' with uncommitted changes' if planner.get('modified') else ''}")
    print("worst, worst/mean, cv: demand/throughput ratios of the experts with a replica; uncov: experts "
          "with none, uncov%: the share of the demand they get; undone: moves that took back an earlier move "
          "of the same node; worst@join: before any rebalancing move")
    print(f"{'demand':<8} {'layout':<16} {'worst':>7} {'worst/mean':>10} {'cv':>6} {'uncov':>6} "
          f"{'uncov%':>6} {'rep min':>7} {'rep max':>7} {'moves':>6} {'undone':>6} {'worst@join':>10}")
    for kind, rows in model["median"].items():
        for layout in MODEL_LAYOUTS:
            r = rows[layout]
            at_join = f"{r['worst_at_join']:>10.3f}" if "worst_at_join" in r else f"{'-':>10}"
            print(f"{kind:<8} {layout:<16} {r['worst']:>7.3f} {r['worst_over_mean']:>10.2f} {r['cv']:>6.2f} "
                  f"{r['uncovered']:>6g} {100 * r['demand_uncovered']:>6.1f} {r['replicas_min']:>7g} "
                  f"{r['replicas_max']:>7g} {r['moves']:>6g} {r['reverted']:>6g} {at_join}")
        print(f"{kind:<8} {'(lower bound)':<16} {rows['bound_worst']:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="newcomers per configuration and size (medians)")
    parser.add_argument("--sizes", nargs="+", default=["64x256", "256x1024"], help="hidden x inner of the "
                        "experts, one model per size")
    parser.add_argument("--num-experts", type=int, default=16, help="experts of the model in part 1")
    parser.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, default=ALL_CONFIGS[:3],
                        help="newcomers of part 1 (start/swarm); hand-picked ones take the experts the "
                        "placed/trained one of the same run picked")
    parser.add_argument("--existing", type=int, default=2, help="nodes hosting the model before a newcomer")
    parser.add_argument("--budget", type=int, default=8, help="--max-experts of a placed newcomer")
    parser.add_argument("--train-steps", type=int, default=3, help="Backward calls per expert before "
                        "the newcomers")
    parser.add_argument("--model-experts", type=int, default=64)
    parser.add_argument("--model-nodes", type=int, default=8)
    parser.add_argument("--model-budget", type=int, default=16)
    parser.add_argument("--model-throughput", type=float, nargs=2, default=[1000.0, 8000.0],
                        metavar=("LOW", "HIGH"), help="a node's throughput, tokens/s, drawn log-uniform")
    parser.add_argument("--model-load", type=float, default=0.8, help="total demand over total throughput")
    parser.add_argument("--model-threshold", type=float, default=0.75,
                        help="the nodes' --rebalance-threshold")
    parser.add_argument("--zipf-exponent", type=float, default=1.0, help="zipf demand: 1/rank^exponent")
    parser.add_argument("--model-seeds", type=int, default=5)
    parser.add_argument("--model-max-rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="one run, the small size only, 3 seeds")
    parser.add_argument("--skip-join", action="store_true", help="part 2 only (no processes)")
    parser.add_argument("--skip-model", action="store_true", help="no part 2 on the modeled swarm")
    parser.add_argument("--real-swarm", action="store_true", help=f"also part 2 on processes: "
                        f"{REAL_NODES} nodes, demand published (about 2 minutes more)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_placement.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.sizes, args.model_seeds = 1, args.sizes[:1], min(args.model_seeds, 3)
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    if any(c.startswith("hand-picked") for c in args.configs) and "placed/trained" not in args.configs:
        parser.error("hand-picked newcomers need placed/trained among --configs (they take its experts)")
    args.configs = [c for c in ALL_CONFIGS if c in args.configs]  # placed/trained first
    RESULTS.mkdir(exist_ok=True)
    report: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    if not args.skip_model:
        started = time.perf_counter()
        report["balance_modeled"] = run_model(args)
        report["balance_modeled"]["seconds"] = round(time.perf_counter() - started, 2)

    def on_sigterm(signum, frame):
        raise Stopped("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    procs = Processes(RUN_DIR)
    errors: list[str] = []
    try:
        if not args.skip_join:
            report["join"] = {"sizes": []}
            started = time.perf_counter()
            print("\nPart 1: join time (processes on 127.0.0.1)", flush=True)
            for hidden, inner in sizes:
                workdir = RUN_DIR / f"{hidden}x{inner}"
                workdir.mkdir()
                try:
                    report["join"]["sizes"].append(run_join_size(hidden, inner, args, procs, workdir))
                except Exception as e:  # noqa: BLE001 - reported; the next size still runs
                    traceback.print_exc()
                    errors.append(f"part 1, {hidden}x{inner}: {type(e).__name__}: {e}")
            report["join"]["seconds"] = round(time.perf_counter() - started, 1)
        if args.real_swarm:
            started = time.perf_counter()
            print("\nPart 2 on processes (--real-swarm)", flush=True)
            workdir = RUN_DIR / "real"
            workdir.mkdir()
            try:
                report["balance_processes"] = run_real(args, procs, workdir)
                report["balance_processes"]["seconds"] = round(time.perf_counter() - started, 1)
            except Exception as e:  # noqa: BLE001 - reported with the rest
                traceback.print_exc()
                errors.append(f"part 2 on processes: {type(e).__name__}: {e}")
    except Stopped as e:
        errors.append(str(e))
    finally:
        procs.stop_all()
    report["errors"] = errors
    if "join" in report:
        print_join(report["join"]["sizes"])
    if "balance_modeled" in report:
        print_model(report["balance_modeled"])
    if "balance_processes" in report:
        print_real(report["balance_processes"])
    for error in errors:
        print(f"error: {error}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
