"""What nodes announce in the DHT, and reading it back.

Keys (all values are msgpack dicts, validated on read by the pydantic models below, which ignore
fields they do not know so that old and new versions read each other's records):

- ``<uid>`` (e.g. ``ffn.3.5``) -> :class:`ExpertRecord`: where to call the expert.
- ``<prefix>.`` with subkey ``<next coordinate>`` for each proper prefix of the uid (``ffn.`` / 3,
  ``ffn.3.`` / 5) -> :class:`ExpertRecord` of the uid: lets a client find live experts by a beam
  search over grid prefixes instead of listing the swarm.
- ``_dmoe.nodes`` with subkey ``<node_id>`` -> :class:`NodeRecord`: hardware, experts and load.
- ``_dmoe.relays`` with subkey ``<peer_id>`` -> :class:`RelayRecord`: relays for nodes behind a NAT.

Records expire after a node-chosen TTL and are refreshed by its heartbeat; a killed node's records
disappear when they expire. A node that stops gracefully overwrites its records, with a later
expiration (the DHT keeps the record that expires last), by tombstones (``state='stopped'``) that
readers treat as absent.

The blocking readers take a started :class:`dmoe.core.dht.DHTPeer` and run on its event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import pydantic
from hivemind.dht import DHTNode

from dmoe.core.dht import DHTPeer
from dmoe.core.uids import UID_DELIMITER, split_uid

logger = logging.getLogger(__name__)

NODES_KEY = "_dmoe.nodes"
RELAYS_KEY = "_dmoe.relays"
RECORD_VERSION = 1


class _Record(pydantic.BaseModel):
    # extra fields: a newer version's; NaN from a peer: malformed
    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class ExpertRecord(_Record):
    uid: str
    endpoint: str  # host:port of the node's gRPC ExpertService
    node_id: str
    state: Literal["online", "stopped"] = "online"
    expert_cls: str = ""
    version: int = 0  # optimizer steps applied
    queued_tokens: int = 0
    max_batch_tokens: int = 0  # most tokens per request (0: not said; the client uses its default)
    max_message_bytes: int = 0  # largest unary message; bigger requests go through the streams
    tls: bool = False  # the endpoint speaks TLS with a certificate of the private swarm's CA (dmoe.core.tls)
    reachable: bool = True  # others can dial endpoint; False: the node is behind a NAT, dial relay instead
    relay: str = ""  # host:port on a relay (dmoe.relay.server) that forwards to this node's gRPC server
    record_version: int = RECORD_VERSION

    @property
    def dial_endpoint(self) -> str:
        """Where a client connects: the node itself, or the relay that serves it (same gRPC either way);
        "" for a node that cannot be dialled and has lost its relay (for the moment, nowhere)."""
        return self.endpoint if self.reachable else self.relay


class Hardware(_Record):
    device: str
    device_name: str = ""
    num_cpus: int = 0
    ram_bytes: int = 0
    device_memory_bytes: int = 0


class ExpertLoad(_Record):
    forward_calls: int = 0
    backward_calls: int = 0
    tokens: int = 0
    errors: int = 0
    rejected: int = 0
    queued_tokens: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    version: int = 0
    # replicas: how far this replica was from the last replica it averaged with, before averaging
    # (|theirs - ours| / |ours| over the parameters; 0: not measured yet), and when (the node's clock)
    spread: float = 0.0
    averaged_at: float = 0.0


class NodeRecord(_Record):
    node_id: str
    endpoint: str
    state: Literal["online", "stopped"] = "online"
    dmoe_version: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0  # the node's wall clock when it made this record (its heartbeat)
    hardware: Hardware | None = None
    experts: list[str] = []
    load: dict[str, ExpertLoad] = {}
    reachable: bool = True
    relay: str = ""
    record_version: int = RECORD_VERSION


class RelayRecord(_Record):
    """A relay (dmoe.relay.server) that serves nodes nobody can dial; under ``_dmoe.relays`` / its peer id."""
    address: str  # host:port nodes dial to probe and register
    peer_id: str
    updated_at: float = 0.0
    record_version: int = RECORD_VERSION


def prefix_entries(uid: str) -> list[tuple[str, int]]:
    """(key, subkey) of every grid prefix under which ``uid`` is announced:
    ffn.3.5 -> [(ffn., 3), (ffn.3., 5)]."""
    prefix, coords = split_uid(uid)
    entries = []
    for i, coord in enumerate(coords):
        key = UID_DELIMITER.join([prefix, *map(str, coords[:i])]) + UID_DELIMITER
        entries.append((key, coord))
    return entries


def announcement(
    experts: Sequence[ExpertRecord], node: NodeRecord
) -> tuple[list[str], list[int | str | None], list[dict[str, Any]]]:
    """Keys, subkeys and values that announce ``experts`` and ``node`` (or their tombstones)."""
    keys: list[str] = []
    subkeys: list[int | str | None] = []
    values: list[dict[str, Any]] = []
    for record in experts:
        value = record.model_dump()
        keys.append(record.uid)
        subkeys.append(None)
        values.append(value)
        for key, subkey in prefix_entries(record.uid):
            keys.append(key)
            subkeys.append(subkey)
            values.append(value)
    keys.append(NODES_KEY)
    subkeys.append(node.node_id)
    values.append(node.model_dump())
    return keys, subkeys, values


async def store_announcement_async(
    node: DHTNode, experts: Sequence[ExpertRecord], record: NodeRecord, expiration_time: float
) -> int:
    """Store the records in the DHT; returns how many keys were accepted."""
    keys, subkeys, values = announcement(experts, record)
    ok = await node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return sum(bool(v) for v in ok.values())


def _parse(model: type[_Record], raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as e:
        logger.debug("ignoring a malformed %s: %s", model.__name__, e)
        return None


def _node(peer: DHTPeer) -> DHTNode:
    assert peer.node is not None, "start the DHT peer first"
    return peer.node


async def _get_many(node: DHTNode, keys: list[str]) -> dict[str, Any]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # the latest value
    return {key: (None if entry is None else entry.value) for key, entry in found.items()}


def find_experts(peer: DHTPeer, uids: Sequence[str]) -> dict[str, ExpertRecord]:
    """Live (online, unexpired, well-formed) records of the given uids; absent uids are left out."""
    return _experts_from(peer.run(_get_many(_node(peer), list(uids))))


async def find_under_prefixes_async(node: DHTNode, keys: Sequence[str]
                                    ) -> dict[str, dict[int, ExpertRecord]]:
    """For each grid prefix key (``ffn.``, ``ffn.3.``): live records by next coordinate. A record
    under ``ffn.3.`` / 5 names ``ffn.3.5`` or an expert deeper in the grid (``ffn.3.5.1``)."""
    found = await _get_many(node, list(keys))
    result: dict[str, dict[int, ExpertRecord]] = {}
    for key, value in found.items():
        entries: dict[int, ExpertRecord] = {}
        for coord, sub in (value.items() if hasattr(value, "items") else []):
            record = _parse(ExpertRecord, getattr(sub, "value", None))
            if (record is None or record.state != "online" or not isinstance(coord, int)
                    or not (record.uid == f"{key}{coord}" or record.uid.startswith(f"{key}{coord}."))):
                continue
            entries[coord] = record
        result[key] = entries
    return result


def _experts_from(found: dict[str, Any]) -> dict[str, ExpertRecord]:
    result = {}
    for uid, value in found.items():
        if value is None:
            continue
        record = _parse(ExpertRecord, value)
        if record is not None and record.state == "online" and record.uid == uid:
            result[uid] = record
    return result


async def _records_by_subkey(node: DHTNode, key: str, model: type[_Record], names_subkey: str
                             ) -> dict[str, Any]:
    """The well-formed records stored under ``key``, by subkey, each naming its own subkey in its
    field ``names_subkey`` (a record filed under another's name is ignored)."""
    entry = await node.get(key, latest=True)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    found = {}
    for subkey, sub in entry.value.items():
        record = _parse(model, getattr(sub, "value", None))
        if record is not None and getattr(record, names_subkey) == subkey:
            found[subkey] = record
    return found


async def find_nodes_async(node: DHTNode) -> dict[str, NodeRecord]:
    """Every live node record in the swarm, by node id."""
    found = await _records_by_subkey(node, NODES_KEY, NodeRecord, "node_id")
    return {node_id: record for node_id, record in found.items() if record.state == "online"}


def find_nodes(peer: DHTPeer) -> dict[str, NodeRecord]:
    """Every live node record in the swarm, by node id (blocking)."""
    return peer.run(find_nodes_async(_node(peer)))


async def store_relay_async(node: DHTNode, record: RelayRecord, expiration_time: float) -> bool:
    return bool(await node.store(RELAYS_KEY, record.model_dump(), expiration_time, subkey=record.peer_id))


async def find_relays_async(node: DHTNode) -> dict[str, RelayRecord]:
    """Every live relay announced in the swarm, by peer id."""
    return await _records_by_subkey(node, RELAYS_KEY, RelayRecord, "peer_id")


def find_relays(peer: DHTPeer, timeout: float | None = None) -> dict[str, RelayRecord]:
    """Every live relay announced in the swarm, by peer id (blocking; TimeoutError after ``timeout``)."""
    return peer.run(find_relays_async(_node(peer)), timeout)
