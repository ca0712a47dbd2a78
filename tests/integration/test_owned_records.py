"""Owned records on real peers (127.0.0.1): replicas of a uid coexist, and a peer without a node's
owner key can neither overwrite, tombstone nor pin its records, nor make them vanish early from
another peer's storage, nor hide them there; readers drop what is not signed by its owner."""

from __future__ import annotations

import pytest
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from swarm_fixtures import wait_for

from dmoe.core.dht import DHTPeer
from dmoe.core.owner import MAX_RECORD_TTL, OwnerKey, owned_subkey, seal
from dmoe.core.records import (
    NODES_KEY,
    ExpertRecord,
    NodeRecord,
    find_experts,
    find_nodes,
    find_under_prefixes,
    store_announcement_async,
)

pytestmark = pytest.mark.timeout(180)
HIDDEN = 8
YEAR = 365 * 86400.0
UIDS = ["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"]


def peer_id_of(maddrs: list[str]) -> PeerID:
    return PeerID.from_base58(maddrs[0].rsplit("/p2p/", 1)[1])


def answer_of(asker: DHTPeer, peer: PeerID, key: str) -> dict | None:
    """What ``peer`` answers (validated by the asker) for ``key``: subkey -> (value, expiration)."""
    key_id = DHTID.generate(source=key)
    found = asker.run(asker.node.protocol.call_find(peer, [key_id]), 30)
    assert found is not None, "the peer did not answer"
    entry = found[key_id][0]
    return None if entry is None else {subkey: tuple(item) for subkey, item in entry.value.items()}


def endpoints(records: dict[str, list[ExpertRecord]]) -> dict[str, set[str]]:
    return {uid: {r.endpoint for r in replicas} for uid, replicas in records.items()}


def test_two_nodes_hosting_the_same_uids_are_both_listed(node_factory, dht_factory):
    first = node_factory("--experts", "ffn.[0:2].[0:2]", "--hidden-dim", str(HIDDEN), name="first")
    second = node_factory("--experts", "ffn.[0:2].[0:2]", "--hidden-dim", str(HIDDEN),
                          "--swarm", first.swarm[0], name="second")
    dht = dht_factory(first.swarm)
    both = {first.endpoint, second.endpoint}
    replicas = wait_for(lambda: (r := find_experts(dht, UIDS)) and endpoints(r) == dict.fromkeys(UIDS, both)
                        and r, 30, "both replicas of every uid")
    assert all(len({r.owner for r in rs}) == 2 for rs in replicas.values())  # one entry per hosting node
    under = find_under_prefixes(dht, ["ffn.", "ffn.0.", "ffn.1."])
    seen = {key: {c: {r.endpoint for r in rs} for c, rs in found.items()} for key, found in under.items()}
    assert seen == {key: {0: both, 1: both} for key in ("ffn.", "ffn.0.", "ffn.1.")}
    assert set(find_nodes(dht)) == {first.ready["node_id"], second.ready["node_id"]}

    assert second.terminate() == 0  # its tombstones are its own: the first node's replicas stay
    wait_for(lambda: endpoints(find_experts(dht, UIDS)) == dict.fromkeys(UIDS, {first.endpoint}), 15,
             "the second node's replicas withdrawn")
    assert set(find_nodes(dht)) == {first.ready["node_id"]}


def test_a_peer_without_the_owner_key_cannot_overwrite_tombstone_or_pin_records(node_factory, dht_factory):
    """Open swarm. The attacker is a DHT peer of its own (its own owner key, not the node's)."""
    node = node_factory("--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), "--heartbeat-interval", "1",
                        "--record-ttl", "4")
    attacker, reader = dht_factory(node.swarm), dht_factory(node.swarm)
    real = wait_for(lambda: (r := find_experts(reader, ["ffn.0", "ffn.1"])) and len(r) == 2 and r, 30,
                    "the node's records")
    node_owner = real["ffn.0"][0].owner
    assert node_owner and node_owner != attacker.owner.owner_id
    fake = ExpertRecord(uid="ffn.0", endpoint="127.0.0.1:9", node_id=node.ready["node_id"], owner=node_owner)
    tombstone = real["ffn.0"][0].model_copy(update={"state": "stopped"})
    now = get_dht_time()

    def store(key: str, value: dict, expiration: float, subkey=None) -> bool:
        return attacker.run(attacker.node.store(key, value, expiration, subkey=subkey), 30)

    # today's attack: a plain value under the uid, pinned for a year (it used to be what every reader got)
    assert not store("ffn.0", fake.model_dump(), now + YEAR)
    assert not store("ffn.0", fake.model_dump(), now + 60)  # nor for a minute: a plain value has no owner
    # under the node's own subkeys (the attacker cannot sign for the node's key)
    assert not store("ffn.0", fake.model_dump(), now + 60, subkey=owned_subkey("", node_owner))
    assert not store("ffn.0", tombstone.model_dump(), now + 60, subkey=owned_subkey("", node_owner))
    assert not store("ffn.", fake.model_dump(), now + 60, subkey=owned_subkey(0, node_owner))
    node_record = find_nodes(reader)[node.ready["node_id"]]
    assert not store(NODES_KEY, node_record.model_copy(update={"state": "stopped"}).model_dump(), now + 60,
                     subkey=owned_subkey(node.ready["node_id"], node_owner))
    # the node's own signed record, replayed with a later expiration, or with a forged signature
    node_peer = peer_id_of(node.swarm)
    key_id = DHTID.generate(source="ffn.0")
    subkey = owned_subkey("", node_owner)
    signed_value, _ = answer_of(attacker, node_peer, "ffn.0")[subkey]
    forged = seal(MSGPackSerializer.dumps(fake.model_dump()), b"\0" * 64)
    for value, expiration in ((signed_value, now + 300), (forged, now + 60)):
        ok = attacker.run(attacker.node.protocol.call_store(node_peer, [key_id], [value], [expiration],
                                                            subkeys=[subkey]), 30)
        assert ok == [False]
    # pinned under its own key: one more replica, but not for a year
    own = fake.model_copy(update={"owner": attacker.owner.owner_id})
    assert not store("ffn.1", own.model_dump(), now + YEAR, subkey=owned_subkey("", attacker.owner.owner_id))
    assert not store("ffn.1", own.model_dump(), now + MAX_RECORD_TTL + 300,
                     subkey=owned_subkey("", attacker.owner.owner_id))

    for _ in range(3):  # and so it stays, beat after beat
        first_seen = answer_of(reader, node_peer, "ffn.0")[subkey][1]
        found = find_experts(reader, ["ffn.0", "ffn.1"])
        assert endpoints(found) == {"ffn.0": {node.endpoint}, "ffn.1": {node.endpoint}}
        assert {r.owner for rs in found.values() for r in rs} == {node_owner}
        assert set(find_nodes(reader)) == {node.ready["node_id"]}
        wait_for(lambda: answer_of(reader, node_peer, "ffn.0")[subkey][1] > first_seen, 10, "the next beat")


def announce(peer: DHTPeer, endpoint: str, expiration: float) -> None:
    record = ExpertRecord(uid="ffn.0", endpoint=endpoint, node_id=peer.peer_id)
    node = NodeRecord(node_id=peer.peer_id, endpoint=endpoint, experts=["ffn.0"])
    assert peer.run(store_announcement_async(peer.node, [record], node, expiration), 30) == 3


def test_no_store_by_another_peer_makes_a_live_record_vanish_early_from_a_peers_storage(dht_factory):
    """hivemind's storage refuses a value that expires before the one it keeps, but (1.1.12) only after
    putting its expiration on the heap that removes expired values: at that time, the live value went.
    An older record of the owner, replayed (its signature checks), or a refused plain value, did it."""
    owner = dht_factory([])
    storage, attacker = dht_factory(owner.visible_maddrs), dht_factory(owner.visible_maddrs)
    storage_peer = peer_id_of(storage.visible_maddrs)
    subkey = owned_subkey("", owner.owner.owner_id)
    early = get_dht_time() + 8
    announce(owner, "10.0.0.1:1", early)
    old_value, old_expiration = answer_of(attacker, storage_peer, "ffn.0")[subkey]  # the attacker keeps it
    live = get_dht_time() + 60
    announce(owner, "10.0.0.1:1", live)
    assert answer_of(attacker, storage_peer, "ffn.0")[subkey][1] == live

    key_id = DHTID.generate(source="ffn.0")
    call_store = attacker.node.protocol.call_store
    replay = attacker.run(call_store(storage_peer, [key_id], [old_value], [old_expiration], subkeys=[subkey]),
                          30)
    plain = attacker.run(call_store(storage_peer, [key_id], [b"\x80"], [early]), 30)
    assert replay == [False] and plain == [False]  # refused (older; plain), and yet ...
    assert get_dht_time() < early - 0.5, "too slow: the replayed record had expired when it was sent"
    wait_for(lambda: get_dht_time() > early + 1, 10, "the replayed record's expiration to pass")
    answer = answer_of(attacker, storage_peer, "ffn.0")
    assert answer is not None and answer[subkey][1] == live, "the owner's live record vanished early"


def test_a_peers_cache_cannot_hide_the_records_it_stores(dht_factory):
    """A peer answers from its cache when the cached value expires later than the stored one: an entry
    of the attacker's own, put in the cache, used to hide every owner's record of the key there."""
    owner = dht_factory([])
    storage, attacker = dht_factory(owner.visible_maddrs), dht_factory(owner.visible_maddrs)
    storage_peer = peer_id_of(storage.visible_maddrs)
    announce(owner, "10.0.0.1:1", get_dht_time() + 30)
    key_id = DHTID.generate(source="ffn.0")
    own = attacker.run(attacker.node.protocol.call_store(
        storage_peer, [key_id], [MSGPackSerializer.dumps(True)], [get_dht_time() + 120], subkeys=[b"junk"],
        in_cache=True), 30)
    answer = answer_of(attacker, storage_peer, "ffn.0")
    assert answer is not None and owned_subkey("", owner.owner.owner_id) in answer, "hidden by the cache"
    assert own == [False]  # a dmoe peer keeps no cache


def test_readers_drop_a_record_whose_signature_does_not_check(dht_factory):
    """A modified peer keeps (and serves) what its validator would refuse: a record under the owner's
    subkey that the owner did not sign, expiring after the owner's own. Readers never take it."""
    owner = dht_factory([])
    liar, reader = dht_factory(owner.visible_maddrs), dht_factory(owner.visible_maddrs)
    announce(owner, "10.0.0.1:1", get_dht_time() + 30)
    subkey = owned_subkey("", owner.owner.owner_id)
    fake = ExpertRecord(uid="ffn.0", endpoint="127.0.0.1:9", node_id=owner.peer_id,
                        owner=owner.owner.owner_id)
    forged = {"forged signature": seal(MSGPackSerializer.dumps(fake.model_dump()), b"\1" * 64),
              "no signature": MSGPackSerializer.dumps(fake.model_dump())}
    impostor = OwnerKey.generate()  # and one under a key of its own, sealed with another's signature
    other = owned_subkey("", impostor.owner_id)
    key_id = DHTID.generate(source="ffn.0")

    async def keep(value: bytes, subkey: str) -> bool:
        return liar.node.protocol.storage.store(key_id, value, get_dht_time() + 60, subkey=subkey)

    for what, value in forged.items():
        assert liar.run(keep(value, subkey), 10), what
        found = find_experts(reader, ["ffn.0"])
        assert endpoints(found) == {"ffn.0": {"10.0.0.1:1"}}, what
    assert liar.run(keep(forged["forged signature"], other), 10)
    assert endpoints(find_experts(reader, ["ffn.0"])) == {"ffn.0": {"10.0.0.1:1"}}



def test_a_peer_restarted_with_its_identity_file_replaces_its_own_records(dht_factory, tmp_path):
    """The owner key comes from the identity file: after a restart (killed: no tombstones), the new
    records replace the old ones instead of standing beside them as a stale replica."""
    reader = dht_factory([])
    owners = []
    for endpoint in ("10.0.0.1:1", "10.0.0.1:2"):
        peer = DHTPeer(initial_peers=reader.visible_maddrs, identity_path=str(tmp_path / "id")).start()
        try:
            announce(peer, endpoint, get_dht_time() + 60)
            owners.append(peer.owner.owner_id)
        finally:
            peer.shutdown()
    assert owners[0] == owners[1]
    [replica] = find_experts(reader, ["ffn.0"])["ffn.0"]
    assert replica.endpoint == "10.0.0.1:2" and replica.owner == owners[0]
