"""Whether others can dial a node's gRPC port, and the relays it may serve through when not.

With ``--reachability auto`` a starting node asks a relay to dial it back
(:func:`dmoe.relay.protocol.probe`): :func:`relay_candidates` lists the relays to ask (``--relay``,
then those announced in the swarm, trusted ones first), :func:`dial_back` asks them, and
:func:`dialable` reads the verdict. A node found not dialable serves through a relay
(:class:`~dmoe.node.relaylink.RelayLink`, given the same candidates).

Anyone may announce a relay in an open swarm, and a relay that says "cannot be dialled" gets the
node's traffic. So a node believes that verdict from a trusted relay (:func:`trusted_relays`: named
with ``--relay``, or at the address of a ``--swarm`` peer, as the coordinator's is), or from two
relays at distinct addresses; one other relay alone is not believed, and any relay that dialled the
node back outvotes it: the node then announces its own address (and says so in a warning, with
the remedy: ``--relay`` or ``--reachability relay``). In a private swarm (a swarm key) every
announced relay is trusted: only a member, holding the key, can announce one in the swarm's DHT.
A relay that lies "reachable" gains nothing: the node is not on its path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any

from dmoe.core.addresses import address_group, split_address
from dmoe.core.auth import SwarmKey
from dmoe.core.dht import DHTPeer
from dmoe.core.logsafe import printable
from dmoe.core.records import find_relays
from dmoe.relay.protocol import probe

logger = logging.getLogger(__name__)

MAX_PROBED_RELAYS = 4  # relays asked to dial a starting node back (10 s each: a dial, an Info call)
MULTIADDR_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")
RESOLVED_FOR = 600.0  # seconds the --swarm peers' resolved addresses are kept (a start, its relay rounds)
_resolved: dict[tuple[str, ...], tuple[float, frozenset[str]]] = {}  # swarm -> (when, hosts)


def relay_candidates(dht: DHTPeer | None, configured: list[str], own: str | None,
                     swarm: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The relays to use, in order: ``configured`` (--relay), then those announced in the swarm
    but ``own`` (the relay this node offers, if any), those at a ``swarm`` peer's address first.
    Blocking: it reads the DHT."""
    found: list[str] = []
    if dht is not None:
        try:
            found = [r.address for r in find_relays(dht, timeout=5).values()]
        except Exception as e:
            logger.debug("could not read the swarm's relays: %s", printable(e))
    candidates = list(dict.fromkeys([*configured, *(a for a in found if a != own)]))
    trusted = trusted_relays(configured, swarm, candidates)
    return sorted(candidates, key=lambda relay: relay not in trusted)  # stable: the order above within each


def trusted_relays(configured: list[str], swarm: list[str] | tuple[str, ...],
                   candidates: list[str]) -> set[str]:
    """The relays whose "cannot be dialled" a node believes on their word: those named with --relay
    (``configured``), and those of ``candidates`` whose host is the host of a ``swarm`` peer (the
    coordinator's relay), as written or as the swarm peer's host name resolves. A relay's host is
    never resolved (a name announced by anyone could take long to); blocking: it resolves the
    swarm peers' names."""
    hosts = _swarm_hosts(tuple(swarm))
    trusted = set(configured)
    for relay in candidates:
        try:
            host = split_address(relay)[0]
        except ValueError:
            continue
        if host in hosts or _canonical(host) in hosts:
            trusted.add(relay)
    return trusted


def _swarm_hosts(swarm: tuple[str, ...]) -> frozenset[str]:
    """The hosts of the ``swarm`` peers, as written and as they resolve; resolved once per
    RESOLVED_FOR seconds (a node lists its relays at start and at every round of its relay link)."""
    now = time.monotonic()
    cached = _resolved.get(swarm)
    if cached is not None and now - cached[0] < RESOLVED_FOR:
        return cached[1]
    hosts: set[str] = set()
    for maddr in swarm:
        parts = maddr.split("/")
        for protocol, value in zip(parts, parts[1:]):
            if protocol in MULTIADDR_HOSTS:
                hosts |= {value, *_resolve(value)}
    if len(_resolved) >= 16:  # a few swarms per process at most (tests start many nodes)
        _resolved.clear()
    _resolved[swarm] = (now, frozenset(hosts))
    return _resolved[swarm][1]


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _resolve(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return set()


async def dial_back(relays: list[str], port: int, *, key: SwarmKey | None, node_id: str, tls: bool,
                    trusted: set[str] | frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """The verdict on whether this host can be dialled at ``port``, from the first MAX_PROBED_RELAYS of
    ``relays``: the first of the ``trusted`` ones that answers decides (in a private swarm, ``key``
    set, every relay is trusted); without one, the others are asked at once, and "cannot be
    dialled" holds only if none dialled the node back and relays at two distinct addresses
    (address_group) say so. One relay alone saying it is not believed: the verdict is then
    "reachable", with ``overruled`` saying why. None if no relay could be asked."""
    asked = relays[:MAX_PROBED_RELAYS]
    if key is not None:  # a private swarm: its relays were announced by members (holding the key)
        trusted = {*trusted, *asked}

    async def ask(relay: str) -> dict[str, Any] | None:
        try:
            return await probe(relay, port, key=key, node_id=node_id, tls=tls)
        except Exception as e:
            logger.debug("relay %s could not probe this node: %s", relay, printable(e))
            return None

    for relay in asked:
        if relay in trusted and (verdict := await ask(relay)) is not None:
            return verdict
    others = [relay for relay in asked if relay not in trusted]
    verdicts = await asyncio.gather(*map(ask, others))
    answers = [(relay, v) for relay, v in zip(others, verdicts) if v is not None]
    if not answers:
        return None
    reachable = [v for _, v in answers if v.get("reachable")]
    if reachable:
        return max(reachable, key=lambda v: bool(v.get("verified")))
    if len({address_group(split_address(relay)[0]) for relay, _ in answers}) >= 2:
        return answers[0][1]
    relay, verdict = answers[0]
    return {**verdict, "reachable": True, "verified": False,
            "overruled": f"relay {relay} says its dial-back to {verdict.get('address')} failed "
                         f"({verdict.get('error')}), but it is not named with --relay nor at a --swarm "
                         "peer's address, and one such relay is not believed alone"}


def dialable(verdict: dict[str, Any] | None, endpoint: str | None) -> bool:
    """Whether to announce ``endpoint`` as reachable after a relay's ``verdict`` (logged): yes when
    the relay dialled it, and when no relay could check; no when the dial-back failed."""
    if verdict is None:
        logger.info("no relay could check whether %s can be dialled; announcing it as reachable "
                    "(--reachability relay if this node is behind a NAT)", endpoint)
        return True
    if verdict.get("overruled"):
        logger.warning("%s: %s; announcing %s as reachable (name a relay you trust with --relay, or use "
                       "--reachability relay, if this node is behind a NAT)", endpoint,
                       printable(verdict["overruled"]),
                       endpoint)
        return True
    if verdict["reachable"]:
        how = ("and this node answered" if verdict.get("verified") else
               "; it could not check that this node answers there")
        logger.info("%s is reachable (a relay dialled %s back %s)", endpoint, printable(verdict["address"]),
                    how)
        return True
    logger.warning("%s cannot be dialled from the swarm (a relay's dial-back to %s failed: %s): serving "
                   "through a relay", endpoint, printable(verdict["address"]), printable(verdict["error"]))
    return False
