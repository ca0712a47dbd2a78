"""Readers parse a record once per content: a lookup that reads the same thousands of records again gets
the records it parsed before, and only the same content does (the same field names, types and values);
what is malformed is checked, and logged, every time."""

from __future__ import annotations

import logging

import pytest
from hivemind.utils import ValueWithExpiration, get_dht_time

from dmoe.core import records
from dmoe.core.owner import OwnerKey, owned_subkey
from dmoe.core.records import ExpertRecord, NodeRecord, _owned_records

pytestmark = pytest.mark.timeout(30)
OWNER = OwnerKey.from_secret(b"an owner of records, parsed once" * 2)


def read(*values: dict, model: type = ExpertRecord) -> list:
    """The records of a key holding ``values`` (one per coordinate), as a reader parses them."""
    now = get_dht_time()
    found = {owned_subkey(i, OWNER.owner_id): ValueWithExpiration(value, now + 30)
             for i, value in enumerate(values)}
    return [record for _, record, _ in sorted(_owned_records(found, model, now), key=lambda item: item[0])]


def expert(uid: str, **fields) -> dict:
    made = ExpertRecord(uid=uid, endpoint="127.0.0.1:1", node_id="n", owner=OWNER.owner_id, **fields)
    return made.model_dump()


def test_the_same_content_is_the_same_record_and_other_content_another():
    first = read(expert("ffn.0.1"), expert("ffn.0.2"))
    again = read(expert("ffn.0.1"), expert("ffn.0.2"))  # other dicts, other strings: the same content
    assert [a is b for a, b in zip(first, again)] == [True, True]
    changed = read(expert("ffn.0.1", version=3), expert("ffn.0.2"))
    assert changed[0] is not first[0] and changed[0].version == 3 and changed[1] is first[1]


def test_equal_values_of_another_type_are_parsed_for_themselves():
    """True == 1 and 1.0 == 1 in Python; a record saying them is not the record saying 1."""
    base = read(expert("ffn.0.3", version=1))[0]
    for odd in (True, 1.0):
        value = {**expert("ffn.0.3"), "version": odd}
        [record] = read(value)
        assert record is not base and record == ExpertRecord.model_validate(value)


def test_malformed_records_are_checked_and_logged_every_time(caplog):
    caplog.set_level(logging.DEBUG, logger="dmoe.core.records")
    bad = {**expert("ffn.0.4"), "endpoint": "unix:/tmp/socket"}
    for _ in range(3):
        assert read(bad) == []
    assert sum("skipping a record" in r.getMessage() for r in caplog.records) == 3


def test_values_holding_lists_or_dicts_are_parsed_every_time():
    node = NodeRecord(node_id="n", endpoint="127.0.0.1:1", owner=OWNER.owner_id, experts=["ffn.0.1"])
    node = node.model_dump()
    first, again = read(node, model=NodeRecord), read(node, model=NodeRecord)
    assert first == again and first[0] is not again[0]


def test_the_records_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(records, "_parsed", {})
    monkeypatch.setattr(records, "_MAX_PARSED", 4)
    made = read(*(expert(f"ffn.1.{i}") for i in range(6)))
    assert len(records._parsed) == 4
    again = read(*(expert(f"ffn.1.{i}") for i in range(2, 6)))
    assert [a is b for a, b in zip(made[2:], again)] == [True] * 4
    assert read(expert("ffn.1.0"))[0] is not made[0]  # the oldest, forgotten
