"""Small helpers for processes on this machine: listen addresses and atomic JSON files."""

from __future__ import annotations

import json
import os
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
