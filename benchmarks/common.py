"""What the benchmark scripts share: a server process started, awaited and stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 120.0


@contextmanager
def server_process(cmd: list[str], log_path: Path, ready_file: Path) -> Iterator[dict]:
    """A server in its own process group; yields its ready-file JSON; the group is killed on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready_file.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready after {START_TIMEOUT_S}s; see {log_path}")
                time.sleep(0.2)
            yield json.loads(ready_file.read_text())
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass
