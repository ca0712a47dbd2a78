"""What the benchmark scripts share: a server process started, awaited and stopped; a timed
RemoteMoE training step; quantiles and their summary; the JSON report written."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmoe.testing.process import stop_process_group, wait_ready_file

START_TIMEOUT_S = 120.0


@contextmanager
def server_process(cmd: list[str], log_path: Path, ready_file: Path) -> Iterator[dict]:
    """A server in its own process group; yields its ready-file JSON; the group is stopped on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            yield wait_ready_file(ready_file, proc, START_TIMEOUT_S, f"server (log: {log_path})")
        finally:
            stop_process_group(proc)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return None
    return plt


def timed_step(layer, x) -> float:
    """Seconds of one forward + backward of a RemoteMoE layer, in which every expert answered."""
    started = time.perf_counter()
    y = layer(x.requires_grad_())
    y.sum().backward()
    assert layer.last_num_failed == 0
    return time.perf_counter() - started


def show_progress(text: str, step: int, total: int, every: int = 25) -> None:
    """A progress line on stderr: rewritten in place on a terminal; in a file or a pipe, one whole line
    every ``every`` steps and at the last, so a log gets no carriage-return updates."""
    if sys.stderr.isatty():
        print(f"\r{text}", end="\n" if step == total else "", file=sys.stderr, flush=True)
    elif step % every == 0 or step == total:
        print(text, file=sys.stderr, flush=True)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    """The median and p90 of some timings, as the reports give them."""
    return {"median": statistics.median(values), "p90": quantile(values, 0.9)}


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
