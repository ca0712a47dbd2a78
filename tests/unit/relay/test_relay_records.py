"""A relay that reads the swarm's node records (Relay.watch_records) against DHT reads that come
back empty or miss a node for a while: it drops nobody on an empty read, keeps a registration a
record backed through a missed read (a node in its shutdown grace has withdrawn its record), and
still drops registrations that no record backs. One DHT peer of its own, on loopback, serves the
module; the records are stored in it by hand.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from hivemind.utils import get_dht_time
from swarm_fixtures import wait_for

from dmoe.core.addresses import split_address
from dmoe.core.dht import DHTPeer
from dmoe.core.records import NodeRecord, find_nodes, store_announcement_async
from dmoe.relay.limits import RelayLimits
from dmoe.relay.server import BACKED_MISSES, BACKED_RECHECK, Relay

pytestmark = pytest.mark.timeout(60)
GRACE = 0.4  # record_grace of the relays here: they read the records every 0.2 s


@pytest.fixture(scope="module")
def dht() -> Iterator[DHTPeer]:
    with DHTPeer() as peer:
        yield peer


def announce(dht: DHTPeer, node_id: str, relay_endpoint: str, state: str = "online", ttl: float = 60) -> None:
    """Store the record of a node served through a relay at ``relay_endpoint`` (or its tombstone)."""
    record = NodeRecord(node_id=node_id, endpoint="127.0.0.1:9", state=state, reachable=False,
                        relay=relay_endpoint, updated_at=time.time())
    assert dht.node is not None
    assert dht.run(store_announcement_async(dht.node, [], record, get_dht_time() + ttl)) == 1


class Registration:
    """A node's registration with a relay, made by hand: the control channel, pings read."""

    def __init__(self, relay: Relay, node_id: str):
        self.conn = socket.create_connection(split_address(relay.address), timeout=5)
        self.conn.sendall(json.dumps({"op": "register", "node_id": node_id}).encode() + b"\n")
        with self.conn.makefile("rb") as file:  # the reply comes alone: no ping before it
            self.reply = json.loads(file.readline() or b"{}")
        assert self.reply.get("ok"), self.reply

    def dropped_within(self, timeout: float) -> bool:
        """Whether the relay closes this control channel within ``timeout`` (its pings are read)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.conn.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.conn.recv(4096):
                    return True
        except TimeoutError:
            pass
        except ConnectionResetError:
            return True
        return False

    def close(self) -> None:
        self.conn.close()


def test_an_empty_read_of_the_records_drops_nobody(dht):
    """A read of the swarm's node records that finds none dropped every registration due a check
    (and put their address on cool-down). Now it drops nobody; once records come back, a
    registration that none of them backs is dropped, and one such drop does not bar its address."""
    assert find_nodes(dht) == {}
    with Relay(limits=RelayLimits(record_grace=GRACE)) as relay:
        relay.watch_records(dht)
        quiet = Registration(relay, "quiet-node")
        try:
            assert not quiet.dropped_within(6 * GRACE)  # read empty every GRACE/4: dropped nobody
            announce(dht, "some-other-node", "127.0.0.1:7")  # the swarm's records read again
            assert quiet.dropped_within(3 * GRACE + 5)
        finally:
            quiet.close()
        again = Registration(relay, "quiet-node-2")  # one drop does not put 127.0.0.1 on cool-down
        again.close()


def test_a_backed_registration_survives_a_missed_read_and_goes_after_several(dht):
    """A registration that a node record backed was dropped by the first read that missed it (a
    partial read, or the node in its shutdown grace, its record withdrawn). Now it stays through
    BACKED_MISSES - 1 checks that miss it, BACKED_RECHECK grace periods apart, and is dropped at the
    BACKED_MISSES-th."""
    announce(dht, "some-other-node", "127.0.0.1:7")  # so that the reads are not empty
    with Relay(limits=RelayLimits(record_grace=GRACE)) as relay:
        relay.watch_records(dht)
        member = Registration(relay, "member")
        try:
            announce(dht, "member", member.reply["endpoint"], ttl=60)
            wait_for(lambda: relay.run(_backed(relay, "member")), 10, "the record to back the registration")
            announce(dht, "member", member.reply["endpoint"], state="stopped", ttl=61)  # withdrawn
            withdrawn = time.monotonic()
            assert not member.dropped_within((BACKED_MISSES - 1) * BACKED_RECHECK * GRACE)
            assert member.dropped_within(2 * BACKED_RECHECK * GRACE + 5)
            assert time.monotonic() - withdrawn >= (BACKED_MISSES - 1) * BACKED_RECHECK * GRACE
        finally:
            member.close()


async def _backed(relay: Relay, node_id: str) -> bool:
    usage = relay._usage.get(node_id)
    return usage is not None and usage.backed
