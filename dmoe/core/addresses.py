"""Addresses: ``host:port`` (``[v6]:port`` for IPv6) for gRPC and the relay, and libp2p multiaddrs for
the DHT. One spelling each, used by the node, the client, the relay and the coordinator."""

from __future__ import annotations

import ipaddress

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


def address_group(ip: str) -> str:
    """What limits per IP count an address under (the relay's, a node's per-peer ones): the IPv4
    address, or the /64 of an IPv6 address (one host is routinely given a whole /64, so counting its
    addresses apart would give it 2^64 allowances; an IPv4-mapped one gives the IPv4 address; a zone
    index, fe80::1%eth0, is left out). Anything that does not parse counts as itself."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0] if ":" in ip else ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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
