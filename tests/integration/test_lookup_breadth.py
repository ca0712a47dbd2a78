"""A lookup's breadth (``SwarmConfig.lookup_breadth``) on real DHT peers (127.0.0.1): a client merges
the copies of each prefix key held by the few peers nearest it, not by every peer it can reach, and
still finds every live expert."""

from __future__ import annotations

import pytest
from swarm_fixtures import wait_for

import dmoe

pytestmark = pytest.mark.timeout(120)
GRID = "ffn.[0:4].[0:4]"
KEYS = ["ffn.", "ffn.0.", "ffn.1.", "ffn.2.", "ffn.3."]


def counting_lookup(swarm: dmoe.Swarm) -> tuple[dict[str, set[int]], set]:
    """The coordinates live under each key, read afresh, and the DHT peers asked for them."""
    protocol = swarm.peer.node.protocol
    asked: set = set()
    original = protocol.call_find

    async def call_find(peer, keys):
        asked.add(peer)
        return await original(peer, keys)

    protocol.call_find = call_find
    try:
        found = swarm.live_under(KEYS, refresh=True)
    finally:
        protocol.call_find = original
    return {key: set(coords) for key, coords in found.items()}, asked


def test_a_narrow_lookup_asks_fewer_peers_and_finds_every_expert(node_factory, dht_factory):
    node = node_factory("--experts", GRID, "--hidden-dim", "8", "--heartbeat-interval", "1")
    for _ in range(4):  # peers that hold copies of the keys (the node's heartbeats store to the nearest)
        dht_factory(node.swarm)
    everything = {"ffn.": {0, 1, 2, 3}, **{f"ffn.{row}.": {0, 1, 2, 3} for row in range(4)}}
    narrow = dmoe.Swarm(initial_peers=node.swarm, lookup_breadth=1, cache_ttl=0.0).start()
    wide = dmoe.Swarm(initial_peers=node.swarm, lookup_breadth=0, cache_ttl=0.0).start()
    try:
        for swarm in (narrow, wide):  # both know every peer before they are counted
            wait_for(lambda s=swarm: len(s.peer.node.protocol.routing_table.uid_to_peer_id) >= 6, 30,
                     "the client's routing table")
        wait_for(lambda: counting_lookup(wide)[0] == everything, 30, "every expert's record")
        narrow_found, narrow_asked = counting_lookup(narrow)
        wide_found, wide_asked = counting_lookup(wide)
        assert narrow_found == wide_found == everything
        assert len(wide_asked) == 6  # every other peer: the node, the bystanders and the other client
        assert len(narrow_asked) < len(wide_asked), (narrow_asked, wide_asked)
    finally:
        narrow.shutdown()
        wide.shutdown()

