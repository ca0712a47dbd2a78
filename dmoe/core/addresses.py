"""Addresses: ``host:port`` (``[v6]:port`` for IPv6) for gRPC and the relay, and libp2p multiaddrs for
the DHT. One spelling each, used by the node, the client, the relay and the coordinator."""

from __future__ import annotations

from dmoe.errors import ConfigError


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError if it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def host_port(host: str, port: int) -> str:
    """'host:port' ('[v6]:port' for IPv6), the form gRPC and the relay dial. (A peer's ``join_address``
    is something else: the multiaddr others join its swarm with.)"""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_port_range(text: str) -> tuple[int, int]:
    """(first, last) of 'FIRST-LAST' (or one port); ValueError otherwise."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"expected a port range such as 40000-40999, got {text!r}") from None
    if not 0 < low <= high < 65536:
        raise ValueError(f"expected a port range within 1-65535, got {text!r}")
    return low, high


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
