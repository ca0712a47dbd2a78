"""Child processes for tests, benchmarks and the demo: start one in its own process group, wait for
the ready file it writes once it serves, and stop the whole group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


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
