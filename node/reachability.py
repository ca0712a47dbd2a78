"""Whether others can dial a node's gRPC port, and the relays it may serve through when not.

With ``--reachability auto`` a starting node asks a relay to dial it back
(:func:`dmoe.relay.protocol.probe`): :func:`relay_candidates` lists the relays to ask (``--relay``,
then those announced in the swarm), :func:`dial_back` asks them in turn, and :func:`dialable`
reads the verdict. A node found not dialable serves through a relay
(:class:`~dmoe.node.relaylink.RelayLink`, given the same candidates).
"""

from __future__ import annotations

import logging
from typing import Any

from dmoe.core.auth import SwarmKey
from dmoe.core.dht import DHTPeer
from dmoe.core.records import find_relays
from dmoe.relay.protocol import probe

logger = logging.getLogger(__name__)

MAX_PROBED_RELAYS = 4  # relays asked in turn to dial a starting node back (10 s each: a dial, an Info call)


def relay_candidates(dht: DHTPeer | None, configured: list[str], own: str | None) -> list[str]:
    """The relays to use, in order: ``configured`` (--relay), then those announced in the swarm
    but ``own`` (the relay this node offers, if any). Blocking: it reads the DHT."""
    found: list[str] = []
    if dht is not None:
        try:
            found = [r.address for r in find_relays(dht, timeout=5).values()]
        except Exception as e:
            logger.debug("could not read the swarm's relays: %s", e)
    return list(dict.fromkeys([*configured, *(a for a in found if a != own)]))


async def dial_back(relays: list[str], port: int, *, key: SwarmKey | None, node_id: str,
                    tls: bool) -> dict[str, Any] | None:
    """The first of ``relays`` (at most MAX_PROBED_RELAYS) that dials this host back at ``port``:
    its verdict; None if no relay could be asked."""
    for relay in relays[:MAX_PROBED_RELAYS]:
        try:
            return await probe(relay, port, key=key, node_id=node_id, tls=tls)
        except Exception as e:
            logger.debug("relay %s could not probe this node: %s", relay, e)
    return None


def dialable(verdict: dict[str, Any] | None, endpoint: str | None) -> bool:
    """Whether to announce ``endpoint`` as reachable after a relay's ``verdict`` (logged): yes when
    the relay dialled it, and when no relay could check; no when the dial-back failed."""
    if verdict is None:
        logger.info("no relay could check whether %s can be dialled; announcing it as reachable "
                    "(--reachability relay if this node is behind a NAT)", endpoint)
        return True
    if verdict["reachable"]:
        how = ("and this node answered" if verdict.get("verified") else
               "; it could not check that this node answers there")
        logger.info("%s is reachable (a relay dialled %s back %s)", endpoint, verdict["address"], how)
        return True
    logger.warning("%s cannot be dialled from the swarm (a relay's dial-back to %s failed: %s): serving "
                   "through a relay", endpoint, verdict["address"], verdict["error"])
    return False
