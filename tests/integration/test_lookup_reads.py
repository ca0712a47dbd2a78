"""How a client reads live experts from the DHT, on real peers (127.0.0.1): it merges the copies of each
prefix key held by the few peers nearest it (``SwarmConfig.lookup_breadth``), not by every peer it can
reach, and still finds every live expert; a node stores its records on peers that join before its next
heartbeat (so that such a narrow read finds them there); and a lookup past ``cache_ttl`` but within
``cache_grace`` is used as it is while a newer one, merging every peer's copy, is read in the
background."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hivemind.dht.routing import DHTID
from swarm_fixtures import wait_for

import dmoe
from dmoe.client import swarm as swarm_module

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



def test_a_node_stores_its_records_on_peers_that_join_before_its_next_heartbeat(node_factory, dht_factory):
    # the next heartbeat 20 s away; an early beat for joined peers may come 5 s after the last one
    node = node_factory("--experts", "ffn.[0:4]", "--hidden-dim", "8", "--heartbeat-interval", "20")
    joined = [dht_factory(node.swarm) for _ in range(2)]
    key = DHTID.generate(source="ffn.")

    def holds(peer) -> bool:  # the key, with every expert's entry, in the peer's own storage
        async def read():
            return peer.node.protocol.storage.get(key)
        entry = peer.run(read(), 10)
        return entry is not None and len(entry.value) == 4

    wait_for(lambda: all(holds(peer) for peer in joined), 12, "the node's records on the peers that joined")


def test_a_lookup_within_its_grace_is_used_while_a_newer_one_is_read_in_the_background(node_factory,
                                                                                        monkeypatch):
    node = node_factory("--experts", "ffn.[0:2]", "--hidden-dim", "8")
    # every lookup is past its ttl and within its grace: once read, a key is only read in the background
    swarm = dmoe.Swarm(initial_peers=node.swarm, cache_ttl=0.0, cache_grace=600.0).start()
    gate = threading.Event()
    try:
        wait_for(lambda: set(swarm.live_under(["ffn."], refresh=True)["ffn."]) == {0, 1}, 30, "both experts")
        reads: list[list[str]] = []
        original = swarm_module.find_under_prefixes_async

        async def held(node, keys, breadth):  # a DHT read that takes as long as the test wants
            reads.append((list(keys), breadth))
            await asyncio.to_thread(gate.wait, 60)
            return await original(node, keys, breadth)

        monkeypatch.setattr(swarm_module, "find_under_prefixes_async", held)
        node_factory("--experts", "ffn.[2:3]", "--hidden-dim", "8", "--swarm", node.swarm[0], name="later")
        # the cached experts, at once, with the newer read held (a lookup that waited for it would hang
        # here until its lookup_timeout, then read again on the second call)
        assert set(swarm.live_under(["ffn."])["ffn."]) == {0, 1}
        assert set(swarm.live_under(["ffn."])["ffn."]) == {0, 1}
        swarm.run(asyncio.sleep(0))  # the loop has started whatever the calls scheduled
        # one read in the background, not one per lookup, merging every peer's copy (no step waits for it)
        assert reads == [(["ffn."], None)]
        gate.set()
        wait_for(lambda: set(swarm.live_under(["ffn."])["ffn."]) == {0, 1, 2}, 30,
                 "the background reads' experts in use")
    finally:
        gate.set()
        swarm.shutdown()


def test_a_background_read_that_fails_keeps_the_cached_experts_and_a_later_lookup_reads_again(node_factory,
                                                                                            monkeypatch,
                                                                                            caplog):
    node = node_factory("--experts", "ffn.[0:2]", "--hidden-dim", "8")
    swarm = dmoe.Swarm(initial_peers=node.swarm, cache_ttl=0.0, cache_grace=600.0).start()
    try:
        wait_for(lambda: set(swarm.live_under(["ffn."], refresh=True)["ffn."]) == {0, 1}, 30, "both experts")
        reads: list[list[str]] = []

        async def broken(node, keys, *args):  # a DHT read that fails (a peer on its path gone)
            reads.append(list(keys))
            raise ConnectionError("the DHT is unreachable")

        monkeypatch.setattr(swarm_module, "find_under_prefixes_async", broken)
        assert set(swarm.live_under(["ffn."])["ffn."]) == {0, 1}
        failed = "background lookup of ffn. failed"
        wait_for(lambda: any(failed in r.getMessage() for r in caplog.records), 30, "the failed read logged")
        assert set(swarm.live_under(["ffn."])["ffn."]) == {0, 1}  # still the cached experts
        wait_for(lambda: swarm.live_under(["ffn."]) and len(reads) >= 2, 30, "a later lookup reading again")
    finally:
        swarm.shutdown()
