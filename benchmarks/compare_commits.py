"""Two checkouts of dmoe, one benchmark, runs alternated: what a change did to its figures.

Each checkout is a folder with its own ``.venv`` (``bash scripts/setup.sh`` there). The benchmark runs
``--runs`` times in each, alternating, so that whatever else the machine is doing weighs on both alike;
the order flips each run (base first, then head first), so neither always follows the other. Each run's
JSON report is read back, and for every number under the chosen keys the median over the runs is
printed per checkout with the ratio head/base.
Writes ``results/compare_<bench>.json``.

    git worktree add /tmp/base <commit> && (cd /tmp/base && bash scripts/setup.sh)
    python benchmarks/compare_commits.py --base /tmp/base --bench bench_moe -- --steps 10 --skip-hivemind
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# what to compare in each benchmark's report: paths of keys to the numbers (a trailing "*": every key)
FIGURES = {
    "bench_moe": [("median", "*"), ("ratios", "*")],
    "bench_relay": [(size, path, "median") for size in ("small", "large") for path in ("direct", "relayed")]
    + [(size, "ratio_relayed_over_direct") for size in ("small", "large")]
    + [("small", "probe", "*")],
}


def figures(report: dict, paths: list[tuple[str, ...]]) -> dict[str, float]:
    """The numbers of ``report`` under ``paths``, named by their joined keys."""
    found: dict[str, float] = {}
    for path in paths:
        node = report
        for key in path[:-1]:
            node = node[key]
        keys = list(node) if path[-1] == "*" else [path[-1]]
        for key in keys:
            if isinstance(node[key], (int, float)):
                found["/".join([*path[:-1], key])] = float(node[key])
    return found


def run_once(checkout: Path, bench: str, extra: list[str], out: Path) -> dict:
    """One run of the benchmark in ``checkout`` with its own interpreter; its report."""
    python = checkout / ".venv" / "bin" / "python"
    report = checkout / "benchmarks" / "results" / f"{bench}.json"
    report.unlink(missing_ok=True)
    started = time.monotonic()
    with open(out, "w") as log:
        done = subprocess.run([str(python), str(checkout / "benchmarks" / f"{bench}.py"), *extra],
                              cwd=checkout, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{bench} failed in {checkout} (exit {done.returncode}); log: {out}")
    print(f"  {checkout}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--head", type=Path, default=HERE.parent,
                        help="the checkout measured (default: this one)")
    parser.add_argument("--bench", choices=sorted(FIGURES), required=True)
    parser.add_argument("--runs", type=int, default=3, help="runs in each checkout, alternated")
    parser.add_argument("extra", nargs="*", help="arguments for the benchmark (after --)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    seen: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
        for side in ("base", "head") if i % 2 == 0 else ("head", "base"):  # neither always runs second
            checkout = getattr(args, side).resolve()
            log = RESULTS / f"compare_{args.bench}.{side}{i}.log"
            report = run_once(checkout, args.bench, args.extra, log)
            seen[side].append(figures(report, FIGURES[args.bench]))
    names = list(seen["head"][0])
    rows = {}
    print(f"\n{'figure':<40} {'base (median)':>14} {'head (median)':>14} {'head/base':>10}")
    for name in names:
        base = statistics.median(run[name] for run in seen["base"] if name in run)
        head = statistics.median(run[name] for run in seen["head"])
        rows[name] = {"base": base, "head": head, "ratio": head / base if base else None,
                      "base_runs": [run.get(name) for run in seen["base"]],
                      "head_runs": [run[name] for run in seen["head"]]}
        ratio = f"{head / base:>10.3f}" if base else f"{'-':>10}"
        print(f"{name:<40} {base:>14.4f} {head:>14.4f} {ratio}")
    out = RESULTS / f"compare_{args.bench}.json"
    out.write_text(json.dumps({"base": str(args.base), "head": str(args.head), "runs": args.runs,
                               "extra": args.extra, "figures": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
