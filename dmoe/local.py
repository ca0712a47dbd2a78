"""Small helpers for processes on this machine: listen addresses, atomic JSON files, and child
processes that announce themselves with a ready file and are stopped with their process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from dmoe.errors import ConfigError


def listen_maddr(host: str, port: int) -> str:
    """The libp2p multiaddr to listen on host:port (IPv4 or IPv6)."""
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


def check_announce_maddrs(name: str, maddrs: list[str]) -> None:
    """Reject what libp2p would refuse later: not a multiaddr, port 0, or a peer id part."""
    for maddr in maddrs:
        parts = maddr.split("/")
        if (not maddr.startswith("/") or "/tcp/" not in maddr or "/p2p/" in maddr
                or not parts[parts.index("tcp") + 1].isdigit() or int(parts[parts.index("tcp") + 1]) == 0):
            raise ConfigError(f"{name}: {maddr!r} is not an address to announce; "
                              "expected e.g. /ip4/203.0.113.7/tcp/31337 or /dns4/host.example/tcp/31337")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers see either no file or the whole file (temp file + rename)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data))
    os.replace(temp, path)


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
