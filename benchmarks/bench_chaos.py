"""Benchmark: a long chaos run. Training goes on while nodes are killed, frozen, restarted and cut off.

:class:`dmoe.testing.chaos.ChaosRun` runs a coordinator, four nodes (one in a network namespace) and two
trainers that average their client-side parameters, for ``--minutes`` of training. Every
``--fault-interval`` seconds on average a node is killed with SIGKILL (restarted a few seconds
later, from its checkpoints) or frozen with SIGSTOP, in turns; the namespace's link is cut
``--cuts`` times for ``--cut-for`` seconds. The report: steps, faults survived, restarts (did each
resume from the newest checkpoint on disk, and serve again), expert calls lost, step time
(median, p99, max) against the bound the client's deadlines set, held-out loss from start to end,
corrupt checkpoints. Writes ``benchmarks/results/bench_chaos.json`` and a plot ``bench_chaos.png``
(loss over time, faults marked). Needs root (network namespaces).

Run::

    sudo python benchmarks/bench_chaos.py [--minutes 30] [--fault-interval 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from common import pyplot

from dmoe.testing.chaos import ChaosConfig, ChaosRun

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of training")
    parser.add_argument("--calm", type=float, default=60.0, help="seconds with every node back at the end")
    parser.add_argument("--fault-interval", type=float, default=6.0, help="mean seconds between faults")
    parser.add_argument("--cuts", type=int, default=6)
    parser.add_argument("--cut-for", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = ChaosConfig(duration=args.minutes * 60 - args.calm, calm=args.calm,
                         fault_interval=args.fault_interval, cuts=args.cuts, cut_for=args.cut_for, cut_at=0.5,
                         no_kills_for=30.0, seed=args.seed, eval_interval=250, down_time=(2.0, 10.0),
                         stop_time=(1.0, 8.0))
    workdir = RESULTS / "bench_chaos_run"
    shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = ChaosRun(config, workdir).run()
    (RESULTS / "bench_chaos.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {RESULTS / 'bench_chaos.json'} (logs of every process in {workdir})")
    plot(report)


def print_table(report: dict) -> None:
    faults = report["faults"]
    restarts = report["restarts"]
    print(f"\nfaults: {faults['kill -9']} kill -9, {faults['SIGSTOP']} SIGSTOP, {faults['cut off']} cut off; "
          f"{len(restarts)} restarts, {sum(r['ok'] for r in restarts)} resumed from the newest checkpoint, "
          f"{sum(bool(r['served']) for r in restarts)} seen serving again "
          f"(median "
          f"{statistics.median([r.get('served_after_s', 0) for r in restarts if r['served']] or [0]):.1f} s "
          f"after ready); corrupt checkpoints: {len(report['corrupt_checkpoints'])}")
    print(f"step bound by the deadlines: {report['step_bound_s']:.1f} s (+ compute)\n")
    header = ("trainer", "exit", "steps", "calls lost", "median s", "p99 s", "max s", "held-out start", "end",
              "avg rounds")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for t in report["trainers"]:
        print(" | ".join(str(x) for x in (
            t["name"], t["exit_code"], t["steps"], t["failed_calls"], f"{t['median_step_s']:.3f}",
            f"{t['p99_step_s']:.3f}", f"{t['max_step_s']:.3f}", f"{t['heldout'][0][1]:.3f}",
            f"{t['heldout'][-1][1]:.3f}", t["averaging_rounds"])))


def plot(report: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, ax = plt.subplots(figsize=(10, 4))
    start = min(t["loss"][0][2] for t in report["trainers"] if t["loss"])
    for t in report["trainers"]:
        times = [(r[2] - start) / 60 for r in t["loss"]]
        window = 50
        smooth = [statistics.fmean(r[1] for r in t["loss"][max(0, i - window):i + 1])
                  for i in range(len(t["loss"]))]
        ax.plot(times, smooth, label=f"{t['name']} train loss (mean of {window} steps)", linewidth=1)
    colors = {"kill -9": "red", "SIGSTOP": "orange", "cut off": "purple"}
    for kind, color in colors.items():
        times = [report["started_at"] + e["t"] for e in report["events"] if e["kind"] == kind]
        for i, t in enumerate(times):
            ax.axvline((t - start) / 60, color=color, alpha=0.25, linewidth=0.8,
                       label=kind if i == 0 else None)
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / "bench_chaos.png", dpi=110)
    print(f"plot: {RESULTS / 'bench_chaos.png'}")


if __name__ == "__main__":
    main()
