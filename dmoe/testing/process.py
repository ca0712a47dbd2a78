"""Child processes for tests, benchmarks and the demo: start one in its own process group, wait for
the ready file it writes once it serves, and stop the whole group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """``predicate()``'s first true value, polled every ``interval`` seconds; TimeoutError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def spawn_logged(cmd: list[str], log_path: str | os.PathLike) -> subprocess.Popen:
    """Start ``cmd`` in a session (process group) of its own, its output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_ready_file(path: str | os.PathLike, proc: subprocess.Popen, timeout: float, what: str) -> dict:
    """The JSON that ``proc`` writes to ``path`` once it serves; raises if it exits or times out first."""
    path, deadline = Path(path), time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.1)
    return json.loads(path.read_text())


def stop_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the process group of ``proc`` (started with start_new_session=True); SIGKILL after
    ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass
