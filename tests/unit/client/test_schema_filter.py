"""Swarm.of_schema: replicas announced with another schema than the caller expects are left out, their
node warned about once and listed by skipped_nodes; records with no schema (older nodes) are kept."""

import logging
import time

import pytest

import dmoe.client.swarm as swarm_module
from dmoe.client.swarm import SKIPPED_WITHIN, SchemaMismatch, Swarm
from dmoe.core.modelspec import expert_schema
from dmoe.core.records import ExpertRecord

pytestmark = pytest.mark.timeout(30)
PEERS = ["/ip4/127.0.0.1/tcp/1/p2p/x"]  # never dialled: nothing here starts the swarm
OURS, OTHER = expert_schema("ffn", 16, 32), expert_schema("ffn", 8, 32)


def record(node: str, schema: str, uid: str = "ffn.1", port: int = 1) -> ExpertRecord:
    return ExpertRecord(uid=uid, endpoint=f"127.0.0.1:{port}", node_id=node, expert_schema=schema)


@pytest.fixture
def swarm():
    swarm = Swarm(initial_peers=PEERS)
    yield swarm
    swarm.loop.close()


def skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "replicas are skipped" in r.getMessage()]


def test_replicas_of_another_schema_are_left_out_and_those_without_one_kept(swarm, caplog):
    caplog.set_level(logging.WARNING, logger="dmoe.client.swarm")
    good, old, bad = record("good", OURS, port=1), record("old", "", port=2), record("bad", OTHER, port=3)
    assert swarm.of_schema([bad, good, old], OURS, now=100.0) == [good, old]
    assert swarm.skipped_nodes(within=1e12) == {"bad": SchemaMismatch(
        node_id="bad", endpoint="127.0.0.1:3", uid="ffn.1", theirs=OTHER, ours=OURS, seen=100.0)}
    [warning] = skip_warnings(caplog)
    assert warning.startswith(f"node bad at 127.0.0.1:3 serves ffn.1 as {OTHER}, but this client expects "
                              f"{OURS}: its replicas are skipped")


def test_a_node_is_warned_about_once_not_per_lookup(swarm, caplog):
    caplog.set_level(logging.WARNING, logger="dmoe.client.swarm")
    for _ in range(50):  # every step's lookups meet it again, and its other uids
        assert swarm.of_schema([record("bad", OTHER), record("bad", OTHER, uid="ffn.2")], OURS) == []
    assert len(skip_warnings(caplog)) == 1
    assert swarm.of_schema([record("bad", expert_schema("transformer", 16, 32))], OURS) == []
    assert len(skip_warnings(caplog)) == 2  # it serves yet another schema now: that is news
    assert set(swarm.skipped_nodes()) == {"bad"}


def test_skipped_nodes_are_those_left_out_lately(swarm):
    long_ago = time.monotonic() - SKIPPED_WITHIN - 1
    swarm.of_schema([record("a", OTHER)], OURS, now=long_ago)
    swarm.of_schema([record("b", OTHER)], OURS)
    assert set(swarm.skipped_nodes()) == {"b"}
    assert set(swarm.skipped_nodes(within=SKIPPED_WITHIN + 60)) == {"a", "b"}
    swarm.of_schema([record("a", OTHER)], OURS)  # met again now
    assert set(swarm.skipped_nodes()) == {"a", "b"}


def test_records_of_many_node_ids_are_left_out_but_not_remembered_past_the_bound(swarm, caplog, monkeypatch):
    monkeypatch.setattr(swarm_module, "MAX_SKIPPED_NODES", 3)
    caplog.set_level(logging.WARNING, logger="dmoe.client.swarm")
    many = [record(f"n{i}", OTHER, port=i + 1) for i in range(10)]
    assert swarm.of_schema(many, OURS) == []
    assert set(swarm.skipped_nodes()) == {"n0", "n1", "n2"}
    assert len(skip_warnings(caplog)) == 3
    # once the remembered ones have gone quiet, others take their places
    swarm.of_schema(many[5:6], OURS, now=swarm.skipped_nodes()["n0"].seen + SKIPPED_WITHIN + 1)
    assert set(swarm.skipped_nodes(within=1e12)) == {"n5"}
