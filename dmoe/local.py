"""Small helpers for processes on this machine: listen addresses and atomic JSON files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def listen_maddr(host: str, port: int) -> str:
    """The libp2p multiaddr to listen on host:port (IPv4 or IPv6)."""
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers see either no file or the whole file (temp file + rename)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data))
    os.replace(temp, path)
