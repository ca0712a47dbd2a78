"""Benchmark: does an expert outlive its volunteers? The demo's language model trains while nodes leave
for good and fresh nodes with empty folders take their place.

Three configurations, one after another, each its own swarm on 127.0.0.1 (a coordinator, the nodes
with ``dmoe node start``, one trainer with ``dmoe train --metrics-file``; the same seed, so the same
initial weights, experts included, and the same data order):

* **churn-2** — four nodes, every expert on two of them (``LMConfig`` defaults: 2 layers x 8 experts;
  nodes 0 and 1 host experts 0-3 of each layer, nodes 2 and 3 experts 4-7). Every ``--churn-interval``
  seconds a node leaves for good (SIGKILL to its process group, its checkpoint folder deleted) and a
  fresh node with an empty folder starts with the same experts; it takes their state from the live
  replica before it announces them (:mod:`dmoe.node.joining`). Nodes leave in the order 0, 2, 1, 3, so
  the partner of a node that left is itself replaced only one interval later.
* **no-churn** — the same four nodes, nobody leaves.
* **churn-1** — the same churn with one replica per expert (two nodes, each hosting half the experts):
  the row to beat (``--skip-single`` leaves it out).

How "experts lost" is measured: from the nodes' ready files. The first nodes of a run hold each
expert's trained state. A replacement node holds it for a uid only if its ready file has a
``transferred`` entry for that uid from a node that held it (else it started from the uid's seed,
version 0). After each leave-and-join, a uid is lost when no live node holds its state any more; a
lost expert stays lost (the nodes that hold it later hold a re-seeded expert). The ready file's
version, bytes and seconds per uid give the state-transfer numbers per join.

Also reported: held-out loss (nats per byte) at the largest step every configuration evaluated at
(every ``--eval-interval`` steps), churn-2 and churn-1 against no-churn (goal: churn-2 within 5%);
steps in which some expert call failed (the trainer's ``failed_calls`` > 0: tokens that lost an
expert); replica versions and spread over time from the coordinator's ``/api/swarm`` (the nodes'
``ExpertLoad.version`` and ``ExpertLoad.spread``: how far a replica was from the replica it last
averaged with, before averaging), polled every ``--poll-interval`` seconds. A configuration that
fails is marked (``ok: false`` and its error) and the others still run; every process is stopped at the
end, also on an error or SIGTERM. Writes ``benchmarks/results/bench_churn.json``, the logs under
``results/bench_churn_run/`` and, with matplotlib, ``bench_churn.png``.

Run::

    python benchmarks/bench_churn.py [--minutes 10] [--churn-interval 30] [--steps N] [--skip-single]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

from common import pyplot, show_progress, write_report

from dmoe.lm.config import LMConfig
from dmoe.testing.process import spawn_logged, wait_ready_file

RESULTS = Path(__file__).resolve().parent / "results"
RUN_DIR = RESULTS / "bench_churn_run"
NODE_START_TIMEOUT_S = 180.0  # a node's start, state transfer included, on a loaded machine
STOP_GRACE_S = 20.0


class Stopped(Exception):
    """SIGTERM arrived: stop what runs and write what was measured."""


class Processes:
    """Every process a configuration started (each in its own group), stopped together at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        proc = spawn_logged(cmd, log_path)
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL to the whole group: the node leaves without a word."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop_all(self) -> None:
        """SIGTERM to every group still running, SIGKILL to those not gone after the grace."""
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)


class Monitor(threading.Thread):
    """Polls the coordinator's ``/api/swarm``: per expert, its replicas' versions and spread, over time."""

    def __init__(self, url: str, interval: float, t0: float):
        super().__init__(daemon=True)
        self.url, self.interval, self.t0 = url.rstrip("/") + "/api/swarm", interval, t0
        self.samples: list[dict] = []
        self.errors = 0
        self._done = threading.Event()

    def sample(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=10) as reply:
                view = json.loads(reply.read())
        except (OSError, ValueError):
            self.errors += 1
            return
        experts = {e["uid"]: {"nodes": {r["node_id"]: r["version"] for r in e["replicas"]},
                              "max_spread": e["max_spread"]} for e in view.get("expert_replicas", [])}
        spreads = [e["max_spread"] for e in experts.values() if e["max_spread"] > 0]
        self.samples.append({
            "t": round(time.time() - self.t0, 2), "num_nodes": view.get("num_nodes", 0),
            "num_single_replica": view.get("num_single_replica", 0),
            "max_spread": view.get("max_spread", 0.0),
            "median_spread": statistics.median(spreads) if spreads else 0.0, "experts": experts})

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join(15)


def node_groups(model: LMConfig, num_groups: int) -> list[list[str]]:
    """The --experts patterns of each group: group g hosts experts [g*n/G, (g+1)*n/G) of every layer."""
    size = model.num_experts // num_groups
    return [[f"{model.layer_prefix(layer)}.[{g * size}:{(g + 1) * size}]"
             for layer in range(model.num_layers)] for g in range(num_groups)]


def expand(patterns: list[str]) -> list[str]:
    from dmoe.core.uids import expand_patterns

    return sorted(expand_patterns(patterns))


class Swarm:
    """One configuration's coordinator and nodes: slots, each hosting one group of experts."""

    def __init__(self, args: argparse.Namespace, model: LMConfig, workdir: Path, logdir: Path,
                 procs: Processes, groups: list[list[str]], slot_groups: list[int]):
        self.args, self.model, self.workdir, self.logdir, self.procs = args, model, workdir, logdir, procs
        self.groups, self.slot_groups = groups, slot_groups
        self.coordinator: dict = {}
        self.nodes: list[dict | None] = [None] * len(slot_groups)  # slot -> live node
        self.all_nodes: list[dict] = []  # every node started, by start order
        self.num_started = 0

    def start_coordinator(self) -> None:
        ready = self.workdir / "coordinator.json"
        cmd = [sys.executable, "-m", "dmoe", "coordinator", "start", "--ready-file", str(ready),
               "--poll-interval", str(self.args.poll_interval)]
        proc = self.procs.start(cmd, self.logdir / "coordinator.log")
        self.coordinator = wait_ready_file(ready, proc, NODE_START_TIMEOUT_S, "coordinator")

    def spawn_node(self, slot: int) -> dict:
        """Start a node with an empty folder in ``slot``; returns its entry (not ready yet)."""
        index = self.num_started
        self.num_started += 1
        folder = self.workdir / f"node{index}"
        folder.mkdir()
        patterns = self.groups[self.slot_groups[slot]]
        cmd = [sys.executable, "-m", "dmoe", "node", "start", "--swarm", self.coordinator["swarm"][0],
               "--device", "cpu", "--num-threads", "1", "--hidden-dim", str(self.model.d_model),
               "--inner-dim", str(self.model.expert_inner), "--lr", "1e-3", "--seed", str(self.args.seed),
               "--checkpoint-dir", str(folder / "checkpoints"), "--ready-file", str(folder / "ready.json"),
               "--average-interval", str(self.args.average_interval)]
        for pattern in patterns:
            cmd += ["--experts", pattern]
        proc = self.procs.start(cmd, self.logdir / f"node{index}.log")
        entry = {"index": index, "slot": slot, "proc": proc, "folder": folder, "uids": expand(patterns),
                 "spawned_at": time.time(), "ready": None, "holds": {}}
        self.all_nodes.append(entry)
        self.nodes[slot] = entry
        return entry

    def wait_node(self, entry: dict) -> dict:
        ready = wait_ready_file(entry["folder"] / "ready.json", entry["proc"], NODE_START_TIMEOUT_S,
                                f"node{entry['index']} (log: {self.logdir}/node{entry['index']}.log)")
        entry["ready"], entry["ready_s"] = ready, time.time() - entry["spawned_at"]
        return ready

    def start_nodes(self) -> None:
        entries = [self.spawn_node(slot) for slot in range(len(self.slot_groups))]
        for entry in entries:
            self.wait_node(entry)
            entry["holds"] = {uid: True for uid in entry["uids"]}  # the run's first nodes: the seed state

    def holder_of(self, endpoint: str) -> dict | None:
        for entry in self.all_nodes:
            if entry["ready"] is not None and entry["ready"]["endpoint"] == endpoint:
                return entry
        return None

    def churn(self, slot: int, t0: float) -> dict:
        """The node in ``slot`` leaves for good; a fresh node with an empty folder takes its experts."""
        old = self.nodes[slot]
        assert old is not None
        event = {"t": round(time.time() - t0, 2), "slot": slot, "left": old["index"],
                 "left_node_id": (old["ready"] or {}).get("node_id", "")}
        Processes.kill(old["proc"])
        shutil.rmtree(old["folder"], ignore_errors=True)
        self.nodes[slot] = None
        new = self.spawn_node(slot)
        event["joined"] = new["index"]
        try:
            ready = self.wait_node(new)
        except (RuntimeError, TimeoutError) as e:
            event.update(error=str(e), ready_s=None, transferred={})
            new["holds"] = {uid: False for uid in new["uids"]}
            self.nodes[slot] = None  # counted as gone: it never served
            return event
        transferred = ready.get("transferred", {})
        for uid in new["uids"]:
            t = transferred.get(uid)
            donor = self.holder_of(t["endpoint"]) if t else None
            new["holds"][uid] = bool(t) and (donor["holds"].get(uid, False) if donor else t["version"] > 0)
        event.update(ready_s=round(new["ready_s"], 2), joined_node_id=ready.get("node_id", ""),
                     transferred=transferred,
                     not_transferred=[uid for uid in new["uids"] if uid not in transferred],
                     transfer_bytes=sum(t["bytes"] for t in transferred.values()),
                     transfer_s_max=max((t["seconds"] for t in transferred.values()), default=0.0),
                     transfer_s_sum=round(sum(t["seconds"] for t in transferred.values()), 3))
        return event

    def held(self) -> set[str]:
        """uids whose trained state some live node holds."""
        return {uid for e in self.nodes if e is not None for uid, h in e["holds"].items() if h}


def read_metrics(path: Path) -> tuple[list[dict], list[tuple[int, float]]]:
    steps, evals = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if "heldout_loss" in record:
                evals.append((record["step"], record["heldout_loss"]))
            elif "loss" in record:
                steps.append(record)
    return steps, evals


def run_config(name: str, args: argparse.Namespace, model: LMConfig, replicas: int, churn: bool) -> dict:
    """One configuration from start to end; its measurements, also the partial ones on an error."""
    logdir = RUN_DIR / name
    logdir.mkdir(parents=True)
    result: dict = {"ok": False, "error": None, "replicas": replicas, "churn": churn, "events": [],
                    "lost": [], "samples": []}
    procs = Processes()
    monitor = None
    num_groups = 2
    slot_groups = [g for g in range(num_groups) for _ in range(replicas)]  # slot -> expert group
    # leave order: one slot of each group in turn, so a slot's partner leaves an interval after it
    order = [slot_groups.index(g) + r for r in range(replicas) for g in range(num_groups)]
    metrics = logdir / "metrics.jsonl"
    with tempfile.TemporaryDirectory(prefix=f"dmoe-churn-{name}-") as tmp:
        swarm = Swarm(args, model, Path(tmp), logdir, procs, node_groups(model, num_groups), slot_groups)
        try:
            print(f"[{name}] starting a coordinator and {len(slot_groups)} nodes", file=sys.stderr,
                  flush=True)
            swarm.start_coordinator()
            swarm.start_nodes()
            every_uid = set(expand(model.expert_patterns()))
            cmd = [sys.executable, "-m", "dmoe", "train", "--swarm", swarm.coordinator["swarm"][0],
                   "--seed", str(args.seed), "--batch-size", str(args.batch_size),
                   "--eval-interval", str(args.eval_interval), "--eval-batches", str(args.eval_batches),
                   "--metrics-file", str(metrics)]
            cmd += ["--steps", str(args.steps)] if args.steps else ["--steps", str(10**9),
                                                                      "--max-time", str(args.minutes * 60)]
            trainer = procs.start(cmd, logdir / "trainer.log")
            started = time.time()
            limit = started + args.timeout
            while not read_metrics(metrics)[0]:  # training starts with its first step
                if trainer.poll() is not None:
                    raise RuntimeError(f"trainer exited with {trainer.returncode} "
                                       f"(log: {logdir}/trainer.log)")
                if time.time() > started + NODE_START_TIMEOUT_S:
                    raise TimeoutError("trainer made no step in time")
                time.sleep(0.5)
            t0 = time.time()
            result["t0"] = t0
            monitor = Monitor(swarm.coordinator["dashboard"], args.poll_interval, t0)
            monitor.start()
            next_churn, turn, shown = t0 + args.churn_interval, 0, 0
            while trainer.poll() is None:
                if time.time() > limit:
                    raise TimeoutError(f"the configuration ran past --timeout {args.timeout:.0f}s")
                # with --minutes, no leave once the trainer's time is up (it is only evaluating then)
                in_time = args.steps or time.time() < t0 + args.minutes * 60
                if churn and in_time and time.time() >= next_churn:
                    slot = order[turn % len(order)]
                    turn += 1
                    held_before = swarm.held()
                    event = swarm.churn(slot, t0)
                    event["lost"] = sorted(held_before - swarm.held())
                    result["lost"] += event["lost"]
                    result["events"].append(event)
                    print(f"[{name}] t={event['t']:.0f}s node{event['left']} left, node{event['joined']} "
                          f"ready in {event['ready_s']} s, took {len(event.get('transferred', {}))} "
                          f"experts ({event.get('transfer_bytes', 0) / 1e6:.1f} MB), "
                          f"lost {len(event['lost'])}", file=sys.stderr, flush=True)
                    next_churn = max(next_churn + args.churn_interval, time.time() + 5.0)
                steps, _ = read_metrics(metrics)
                if steps and steps[-1]["step"] != shown:
                    shown = steps[-1]["step"]
                    show_progress(f"[{name}] step {shown} loss {steps[-1]['loss']:.3f}", shown,
                                  args.steps or shown + 1, every=25)
                time.sleep(1.0)
            result["trainer_exit"] = trainer.returncode
            result["ok"] = trainer.returncode == 0
            if trainer.returncode != 0:
                result["error"] = f"trainer exited with {trainer.returncode} (log: {logdir / 'trainer.log'})"
            result["held_at_end"] = sorted(swarm.held())
            result["never_lost"] = len(every_uid - set(result["lost"]))
        except (Exception, Stopped) as e:
            result["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            try:
                if monitor is not None:
                    monitor.stop()
                    monitor.sample()  # might fail if the coordinator is gone: counted in errors
            finally:
                procs.stop_all()  # also when the monitor's end raised
    steps, evals = read_metrics(metrics)
    if monitor is not None:
        result["samples"], result["monitor_errors"] = monitor.samples, monitor.errors
    result["num_steps"] = steps[-1]["step"] if steps else 0
    result["heldout"] = evals
    result["steps_with_failed_calls"] = sum(1 for r in steps if r.get("failed_calls", 0) > 0)
    result["failed_calls"] = sum(r.get("failed_calls", 0) for r in steps)
    result["median_step_s"] = statistics.median(r["seconds"] for r in steps) if steps else None
    result["step_times"] = [(r["step"], round(r["time"] - result.get("t0", r["time"]), 2)) for r in steps]
    joins = [e for e in result["events"] if e.get("ready_s") is not None]
    result["joins"] = {
        "num": len(result["events"]), "failed": len(result["events"]) - len(joins),
        "median_ready_s": statistics.median(e["ready_s"] for e in joins) if joins else None,
        "median_transfer_mb": statistics.median(e["transfer_bytes"] / 1e6 for e in joins) if joins else None,
        "median_transfer_s": statistics.median(e["transfer_s_max"] for e in joins) if joins else None,
        "experts_taken": sum(len(e["transferred"]) for e in joins),
        "experts_not_taken": sum(len(e["not_transferred"]) for e in joins)}
    return result


def compare(results: dict[str, dict]) -> dict:
    """Held-out loss at the largest step that every configuration evaluated at, against no-churn."""
    curves = {name: dict(r["heldout"]) for name, r in results.items() if r.get("heldout")}
    if "no-churn" not in curves:
        return {"common_step": None}
    common = set.intersection(*(set(c) for c in curves.values()))
    common.discard(0)
    if not common:
        return {"common_step": None}
    step = max(common)
    base = curves["no-churn"][step]
    out = {"common_step": step, "heldout": {name: c[step] for name, c in curves.items()}}
    out["vs_no_churn"] = {name: c[step] / base - 1 for name, c in curves.items() if name != "no-churn"}
    if "churn-2" in out["vs_no_churn"]:
        out["goal_churn2_within_5pct"] = out["vs_no_churn"]["churn-2"] <= 0.05
    return out


def print_table(results: dict[str, dict], comparison: dict) -> None:
    step = comparison.get("common_step")
    header = ("config", "ok", "steps", "leaves", "experts lost", "re-seeded at join", f"held-out @ {step}",
              "vs no-churn",
              "steps w/ failed calls", "failed calls", "join s", "MB/join", "transfer s", "max spread")
    print("\n" + " | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, r in results.items():
        j = r.get("joins", {})
        spread = max((s["max_spread"] for s in r.get("samples", [])), default=0.0)
        loss = comparison.get("heldout", {}).get(name)
        vs = comparison.get("vs_no_churn", {}).get(name)
        cells = (name, "yes" if r["ok"] else "FAILED", r.get("num_steps", 0), len(r["events"]),
                 f"{len(r['lost'])}", j.get("experts_not_taken", "-"),
                 f"{loss:.4f}" if loss is not None else "-",
                 f"{100 * vs:+.2f}%" if vs is not None else "-", r.get("steps_with_failed_calls", "-"),
                 r.get("failed_calls", "-"), _num(j.get("median_ready_s")), _num(j.get("median_transfer_mb")),
                 _num(j.get("median_transfer_s")), f"{spread:.2%}")
        print(" | ".join(str(c) for c in cells))
    for name, r in results.items():
        if r["error"]:
            print(f"{name}: {r['error']}")
    if "goal_churn2_within_5pct" in comparison:
        print(f"goals: churn-2 experts lost {len(results['churn-2']['lost'])} (goal 0); held-out vs no-churn "
              f"{100 * comparison['vs_no_churn']['churn-2']:+.2f}% (goal within +5%)")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (ax_loss, ax_spread) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        if r.get("heldout"):
            steps, losses = zip(*r["heldout"])
            ax_loss.plot(steps, losses, marker="o", markersize=3, label=name)
        at_step = dict((round(t), s) for s, t in r.get("step_times", []))
        for i, e in enumerate(r["events"]):  # a leave, at the step the trainer was at then
            near = min(at_step, key=lambda t: abs(t - e["t"]), default=None)
            if near is not None and name != "no-churn":
                ax_loss.axvline(at_step[near], color="red" if e["lost"] else "grey", alpha=0.3, linewidth=0.8)
        samples = [s for s in r.get("samples", []) if s["max_spread"] > 0]
        if samples:
            minutes = [s["t"] / 60 for s in samples]
            ax_spread.plot(minutes, [s["max_spread"] for s in samples], label=f"{name} max")
            ax_spread.plot(minutes, [s["median_spread"] for s in samples], linestyle="--",
                           label=f"{name} median")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("held-out loss (nats/byte)")
    ax_loss.set_title("held-out loss; lines: a node left (red: experts lost)")
    ax_spread.set_xlabel("minutes of training")
    ax_spread.set_ylabel("replica spread (|theirs - ours| / |ours|)")
    ax_spread.set_title("replica spread before averaging")
    for ax in (ax_loss, ax_spread):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of training per configuration")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps per "
                        "configuration instead")
    parser.add_argument("--churn-interval", type=float, default=30.0, help="seconds between two leaves")
    parser.add_argument("--skip-single", action="store_true",
                        help="leave out churn-1 (one replica per expert)")
    parser.add_argument("--average-interval", type=float, default=30.0, help="the nodes' replica averaging")
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds between "
                        "reads of /api/swarm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a configuration may train before it is stopped and marked failed "
                             "(default: the minutes plus 10 minutes; with --steps, 2 hours)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.churn_interval <= 0 or args.steps < 0:
        parser.error("--minutes and --churn-interval must be > 0, --steps >= 0")
    if args.timeout is None:
        args.timeout = 7200.0 if args.steps else args.minutes * 60 + 600
    model = LMConfig()

    def on_sigterm(signum, frame):
        raise Stopped("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    configs = [("churn-2", 2, True), ("no-churn", 2, False)]
    if not args.skip_single:
        configs.append(("churn-1", 1, True))
    results: dict[str, dict] = {}
    nodes = {"churn-2": 4, "no-churn": 4, "churn-1": 2}
    report = {"config": {**vars(args), **model.to_dict(), "nodes": nodes}, "results": results}
    try:
        for name, replicas, churn in configs:
            results[name] = run_config(name, args, model, replicas, churn)
            if results[name]["error"] and results[name]["error"].startswith("Stopped"):
                break
    finally:
        report["comparison"] = compare(results)
        print_table(results, report["comparison"])
        RESULTS.mkdir(exist_ok=True)
        write_report(RESULTS / "bench_churn.json", report)
        print(f"logs: {RUN_DIR}")
        plot(results, RESULTS / "bench_churn.png")


if __name__ == "__main__":
    main()
