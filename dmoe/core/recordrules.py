"""What a DHT record read from a peer may say: endpoints a client may dial, the floors and ceilings
of the limits a node announces, and the bounds of the numbers it reports. :mod:`dmoe.core.records`
applies them to every record it reads (a record that breaks one is skipped, with the reason
logged); node configs use the floors, so that no node announces a limit readers refuse. Imports
neither hivemind nor torch.

Why each rule:

- **Endpoints** are ``host:port`` or ``[v6]:port``, the port in 1..65535, the host an IP literal or a
  DNS name. gRPC would also dial ``unix:/path``, ``dns:///...`` or ``ipv4:...`` targets, so a record
  could otherwise point every client of the swarm at a local socket or service of its machine.
- **Limits below a floor** (``max_batch_tokens`` < :data:`MIN_BATCH_TOKENS`, ``max_message_bytes`` <
  :data:`MIN_MESSAGE_BYTES`): a client cuts its requests to what a node announces, so a record of
  1 token or 1 byte per request would turn one call into one per token or one stream chunk per
  byte, from every client, against that node. No node can be started with less (its config
  refuses), so such a record is not a node's. 0 means "not said" (the client's defaults).
- **Limits above a ceiling** are clamped to it: gRPC cannot carry a message above 2^31 - 1 bytes
  whatever a node says.
- **Uids** are uids (``prefix.i[.j...]``, nothing after), as a node's config only makes them.
- **Numbers** (latencies, counters, times, spread) must be finite and within bounds that no honest
  node reaches, so that sums and means of them in the swarm view stay finite.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from dmoe.core.uids import UID_RE

MIN_BATCH_TOKENS = 16  # fewest tokens per request a node may announce (and be started with)
MIN_MESSAGE_BYTES = 1 << 10  # smallest unary message limit a node may announce (and be started with)
MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC's largest message: larger announced limits are clamped to it
MAX_BATCH_TOKENS = (1 << 31) - 1  # larger announced limits are clamped to it
MAX_COUNT = (1 << 63) - 1  # counters, versions and token counts: 0..MAX_COUNT (msgpack's signed range)
MAX_LATENCY_MS = 1e9  # 11.6 days per call: no node waits so long
MAX_SPREAD = 1e6  # |theirs - ours| / |ours|; replica averaging refuses anything beyond a few
MAX_TIME = 1e11  # unix seconds (the year 5138): started_at, updated_at, averaged_at
MAX_THROUGHPUT = 1e9  # tokens/s a node may say one expert serves

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@functools.lru_cache(maxsize=4096)  # every record of a node names the same endpoint
def check_endpoint(endpoint: str) -> str | None:
    """None if ``endpoint`` is ``host:port`` or ``[v6]:port`` with a port in 1..65535 and a host that
    is an IP literal or a DNS name; else why not."""
    if not isinstance(endpoint, str) or not endpoint.isascii() or not endpoint.isprintable():
        return "not printable ASCII"
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        return "not host:port"
    if not (port.isdigit() and port.isascii() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return f"port {port[:8]!r} is not in 1..65535"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "not an IPv6 address in brackets"
        return None
    try:
        ipaddress.IPv4Address(host)
        return None
    except ValueError:
        pass
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return "host is neither an IP address nor a DNS name (IPv6 goes in brackets: [::1]:port)"
    return None


def check_uid(uid: str) -> str | None:
    """None if ``uid`` is an expert uid and nothing else (no trailing newline either); else why not."""
    return None if isinstance(uid, str) and UID_RE.fullmatch(uid) else "not an expert uid (prefix.i[.j...])"


def check_limit(name: str, value: int, floor: int, ceiling: int) -> int:
    """The announced limit ``value`` (0: not said), clamped to ``ceiling``; ValueError below ``floor``."""
    if value == 0:
        return 0
    if value < floor:
        raise ValueError(f"{name}={value} is below the floor of {floor} that readers accept")
    return min(value, ceiling)
