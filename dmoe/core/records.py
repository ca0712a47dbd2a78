"""What nodes announce in the DHT, and reading it back.

Every record is owned (:mod:`dmoe.core.owner`): it sits under a subkey ``<name>@ed25519:<owner>``
that names its owner's public key, its value is signed by that key (the DHT peers' validator,
:mod:`dmoe.core.recordguard`, refuses it otherwise, and checks it again when a peer answers a read),
and its ``owner`` field repeats the subkey's owner. So each key holds one entry per owner, and no
peer can overwrite, tombstone or outlast another's. Keys (all values are msgpack dicts, validated
on read by the pydantic models below, which ignore fields they do not know so that old and new
versions read each other's records):

- ``<uid>`` (e.g. ``ffn.3.5``), subkey ``@ed25519:<owner>`` -> :class:`ExpertRecord`: where to call
  one replica of the expert; every node that hosts the uid has its own entry.
- ``<prefix>.``, subkey ``<next coordinate>@ed25519:<owner>``, for each proper prefix of the uid
  (``ffn.`` / 3, ``ffn.3.`` / 5) -> :class:`ExpertRecord` of the uid: lets a client find live
  experts by a beam search over grid prefixes instead of listing the swarm.
- ``_dmoe.nodes``, subkey ``<node_id>@ed25519:<owner>`` -> :class:`NodeRecord`: hardware, experts, load.
- ``_dmoe.relays``, subkey ``<peer_id>@ed25519:<owner>`` -> :class:`RelayRecord`: relays for nodes
  behind a NAT.

Records expire after a node-chosen TTL (at most ``MAX_RECORD_TTL``) and are refreshed by its
heartbeat; a killed node's records disappear when they expire. A node that stops gracefully
overwrites its records, with a later expiration (the DHT keeps the record that expires last), by
tombstones (``state='stopped'``) that readers treat as absent: its own signed records, under its
own subkeys.

Readers keep a record only if its subkey names an owner, its value is well formed and names the
same owner, and it expires within ``MAX_RECORD_TTL`` (+ ``CLOCK_MARGIN``) from now; the signature
was checked by the validator of the reading peer (a node without it cannot even open a signed
value). Well formed includes the rules of :mod:`dmoe.core.recordrules` for what a peer may say:
endpoints (and relays) that are ``host:port``, uids that are uids, limits no lower than a node can
be started with (higher ones clamped to what gRPC carries), finite numbers within bounds. A record
that breaks one is skipped and the reason logged, with the peer's values escaped: at INFO the first
time a kind of reason is seen (the model, and the field and rule broken, whatever the values and
owner, so that a peer varying them gets one INFO line, not one per record), then at DEBUG. A node's
own records, made in-process from its checked config, are not put through these rules.

Records from before owned records (``record_version`` 1: a plain value under ``<uid>``,
integer coordinates, bare node ids as subkeys) have no owner: readers skip them, and peers of this
version refuse to store plain values.

The blocking readers take a started :class:`dmoe.core.dht.DHTPeer` and run on its event loop; the
``*_async`` ones take its ``DHTNode`` and run on that loop.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import pydantic
from hivemind.dht import DHTNode
from hivemind.utils import get_dht_time

from dmoe.core import recordrules as rules
from dmoe.core.dht import DHTPeer
from dmoe.core.logsafe import printable
from dmoe.core.owner import CLOCK_MARGIN, MAX_RECORD_TTL, owned_subkey, parse_owned_subkey
from dmoe.core.recordguard import owner_of
from dmoe.core.uids import MAX_COORD_DIGITS, UID_DELIMITER, split_uid

logger = logging.getLogger(__name__)

NODES_KEY = "_dmoe.nodes"
RELAYS_KEY = "_dmoe.relays"
RECORD_VERSION = 2  # 2: owned records (see the module docstring)


_COUNT = (0, rules.MAX_COUNT)
_TIME = (0.0, rules.MAX_TIME)
_LATENCY = (0.0, rules.MAX_LATENCY_MS)


class RuleBroken(ValueError):
    """A record read from a peer breaks a rule of :mod:`dmoe.core.recordrules`; ``kind`` names the field
    (``load.latency_p50_ms`` for a nested one) and never holds the peer's values; the message does."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Record(pydantic.BaseModel):
    # extra fields: a newer version's; NaN from a peer: malformed
    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)
    # the rules of dmoe.core.recordrules for records read from a peer: by field name,
    _BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {}  # numbers: [low, high]
    _LIMITS: ClassVar[dict[str, tuple[int, int]]] = {}  # announced limits: (floor, ceiling), 0 allowed
    _ENDPOINTS: ClassVar[dict[str, bool]] = {}  # dialled host:port; True: required, False: "" allowed
    _UIDS: ClassVar[tuple[str, ...]] = ()  # an expert uid, or a list of them
    _NESTED: ClassVar[tuple[str, ...]] = ()  # records (or a dict of them) with rules of their own

    def as_peers_may_say(self) -> _Record:
        """This record as read from a peer: itself, or a copy with limits above their ceilings clamped;
        :class:`RuleBroken` if it breaks a rule of :mod:`dmoe.core.recordrules` (the message says which)."""
        bounds, endpoints, uids, nested_fields, limits = _rules_of(type(self))
        values = self.__dict__  # the fields (read many times per lookup: no per-field attribute lookups)
        for name, low, high in bounds:
            if not low <= values[name] <= high:
                raise RuleBroken(name, f"{name}={values[name]!r} is outside [{low:g}, {high:g}]")
        for name, required in endpoints:
            value = values[name]
            if (value or required) and (reason := rules.check_endpoint(value)) is not None:
                raise RuleBroken(name, f"{name} {printable(value, 80)!r} is no endpoint to dial: {reason}")
        for name in uids:
            value = values[name]
            for uid in value if isinstance(value, list) else [value]:
                if rules.check_uid(uid) is not None:
                    raise RuleBroken(name, f"{name}: {printable(uid, 80)!r} is not an expert uid")
        for name in nested_fields:
            value = values[name]
            for nested in value.values() if isinstance(value, dict) else [] if value is None else [value]:
                try:
                    nested.as_peers_may_say()
                except RuleBroken as e:
                    raise RuleBroken(f"{name}.{e.kind}", str(e)) from None
        clamped = {}
        for name, floor, ceiling in limits:
            try:
                limit = rules.check_limit(name, values[name], floor, ceiling)
            except ValueError as e:
                raise RuleBroken(name, str(e)) from None
            if limit != values[name]:
                clamped[name] = limit
        return self.model_copy(update=clamped) if clamped else self


@functools.cache
def _rules_of(model: type[_Record]) -> tuple[tuple, tuple, tuple, tuple, tuple]:
    """A model's rules, flattened once (class attributes of pydantic models are slow to look up)."""
    return (tuple((name, low, high) for name, (low, high) in model._BOUNDS.items()),
            tuple(model._ENDPOINTS.items()), model._UIDS, model._NESTED,
            tuple((name, floor, ceiling) for name, (floor, ceiling) in model._LIMITS.items()))


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
    owner: str = ""  # owner id of the node that hosts this replica (the owner its subkey names)
    record_version: int = RECORD_VERSION
    # class, sizes and dtype (dmoe.core.modelspec.expert_schema, e.g. ffn/h128/i512/float32); "": not said
    expert_schema: str = pydantic.Field("", max_length=200)

    _BOUNDS = {"version": _COUNT, "queued_tokens": _COUNT}
    _LIMITS = {"max_batch_tokens": (rules.MIN_BATCH_TOKENS, rules.MAX_BATCH_TOKENS),
               "max_message_bytes": (rules.MIN_MESSAGE_BYTES, rules.MAX_MESSAGE_BYTES)}
    _ENDPOINTS = {"endpoint": True, "relay": False}
    _UIDS = ("uid",)

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

    _BOUNDS = {"num_cpus": _COUNT, "ram_bytes": _COUNT, "device_memory_bytes": _COUNT}


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

    _BOUNDS = {**{name: _COUNT for name in ("forward_calls", "backward_calls", "tokens", "errors", "rejected",
                                             "queued_tokens", "version")},
               "latency_p50_ms": _LATENCY, "latency_p99_ms": _LATENCY, "spread": (0.0, rules.MAX_SPREAD),
               "averaged_at": _TIME}


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
    owner: str = ""  # owner id whose key signs this node's records
    # routed tokens/s one of its experts serves alone (forward and backward), measured at start; 0: unknown
    throughput: float = 0.0
    record_version: int = RECORD_VERSION

    _BOUNDS = {"started_at": _TIME, "updated_at": _TIME, "throughput": (0.0, rules.MAX_THROUGHPUT)}
    _ENDPOINTS = {"endpoint": True, "relay": False}
    _UIDS = ("experts",)
    _NESTED = ("hardware", "load")


class RelayRecord(_Record):
    """A relay (dmoe.relay.server) that serves nodes nobody can dial; under ``_dmoe.relays`` / its peer id."""
    address: str  # host:port nodes dial to probe and register
    peer_id: str
    updated_at: float = 0.0
    owner: str = ""
    record_version: int = RECORD_VERSION

    _BOUNDS = {"updated_at": _TIME}
    _ENDPOINTS = {"address": True}


def prefix_entries(uid: str) -> list[tuple[str, int]]:
    """(key, coordinate) of every grid prefix under which ``uid`` is announced:
    ffn.3.5 -> [(ffn., 3), (ffn.3., 5)]."""
    prefix, coords = split_uid(uid)
    entries = []
    for i, coord in enumerate(coords):
        key = UID_DELIMITER.join([prefix, *map(str, coords[:i])]) + UID_DELIMITER
        entries.append((key, coord))
    return entries


def announcement(
    experts: Sequence[ExpertRecord], node: NodeRecord, owner: str
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Keys, subkeys and values with which ``owner`` announces ``experts`` and ``node`` (or their
    tombstones); each value names ``owner``. A grid prefix entry is announced once, with the first
    of the experts under it (ffn.3.5 and ffn.3.6 share ``ffn.`` / 3)."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for record in experts:
        value = _owned_value(record, owner)
        entries.setdefault((record.uid, owned_subkey("", owner)), value)
        for key, coord in prefix_entries(record.uid):
            entries.setdefault((key, owned_subkey(coord, owner)), value)
    entries[NODES_KEY, owned_subkey(node.node_id, owner)] = _owned_value(node, owner)
    return [key for key, _ in entries], [subkey for _, subkey in entries], list(entries.values())


def _owned_value(record: _Record, owner: str) -> dict[str, Any]:
    value = record.model_dump()
    if value.get("owner") not in ("", owner):
        raise ValueError(f"a record of owner {value['owner']} cannot be announced by {owner}")
    value["owner"] = owner
    return value


async def store_announcement_async(
    node: DHTNode, experts: Sequence[ExpertRecord], record: NodeRecord, expiration_time: float
) -> int:
    """Store the records in the DHT, owned (and signed) by ``node``'s owner key; returns how many
    keys were accepted."""
    keys, subkeys, values = announcement(experts, record, owner_of(node).owner_id)
    ok = await node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return sum(bool(v) for v in ok.values())


async def store_retirement_async(node: DHTNode, retired: Sequence[ExpertRecord], live: Sequence[ExpertRecord],
                                 record: NodeRecord, expiration_time: float) -> int:
    """Withdraw ``retired`` (expert records marked stopped) that ``node``'s owner announced, keeping
    what it still announces (``live`` and ``record``): a grid prefix entry that a live expert shares is
    not touched. Returns how many keys were accepted."""
    owner = owner_of(node).owner_id
    keys, subkeys, _ = announcement(live, record, owner)
    kept = set(zip(keys, subkeys))
    chosen = [(key, subkey, value) for key, subkey, value in zip(*announcement(retired, record, owner))
              if (key, subkey) not in kept]
    if not chosen:
        return 0
    keys, subkeys, values = (list(column) for column in zip(*chosen))
    ok = await node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return sum(bool(v) for v in ok.values())


async def store_relay_async(node: DHTNode, record: RelayRecord, expiration_time: float) -> bool:
    """Store a relay's record, owned by ``node``'s owner key."""
    owner = owner_of(node).owner_id
    return bool(await node.store(RELAYS_KEY, _owned_value(record, owner), expiration_time,
                                 subkey=owned_subkey(record.peer_id, owner)))


# ---- reading -------------------------------------------------------------------------------------
# the kinds of reason logged at INFO (model, field, rule: never a peer's values), the least recently seen
# forgotten past _MAX_LOGGED_REASONS (far more than the fields and rules can make)
_logged_reasons: collections.OrderedDict[str, None] = collections.OrderedDict()
_logged_lock = threading.Lock()  # several DHT peers (threads) of one process read records
_MAX_LOGGED_REASONS = 1024


def _reason_kind(model: type[_Record], error: ValueError) -> str:
    """What a skipped record broke, without the values it broke it with (the key of the once-per-reason
    log): the model, and the field and rule of the first error (a pydantic error type, or RuleBroken's)."""
    if isinstance(error, pydantic.ValidationError):
        first = error.errors()[0] if error.error_count() else {"loc": (), "type": "?"}
        field = first["loc"][0] if first["loc"] else ""  # a field of the model; the rest may be a peer's keys
        if isinstance(field, str) and field in model.model_fields:
            return f"{model.__name__}.{field}: {first['type']}"
        return f"{model.__name__}: {first['type']}"
    if isinstance(error, RuleBroken):
        return f"{model.__name__}.{error.kind}: recordrules"
    return f"{model.__name__}: {type(error).__name__}"


# records parsed, by their content (the model, and the raw value's field names, types and values): a
# lookup reads the same thousands of records again and again (a node's change only when it announces new
# values), and a record is the same whatever read it. At most _MAX_PARSED, the oldest forgotten first; a
# value holding a list or a dict (a node record) is parsed every time, and so is one that failed.
_parsed: dict[tuple, Any] = {}
_parsed_lock = threading.Lock()
_MAX_PARSED = 16384


def _parse(model: type[_Record], raw: Any, owner: str = "") -> Any:
    """The record ``raw`` read from a peer, or None (the reason logged) if it is malformed or breaks
    a rule of :mod:`dmoe.core.recordrules`."""
    try:
        content: tuple | None = (model, tuple(raw), tuple(map(type, raw.values())), tuple(raw.values()))
        with _parsed_lock:
            record = _parsed.get(content)  # type: ignore[arg-type]
        if record is not None:
            return record
    except (AttributeError, TypeError):  # not a dict, or a value that cannot be a key (a list, a dict)
        content = None
    record = _parse_anew(model, raw, owner)
    if record is not None and content is not None:
        with _parsed_lock:
            _parsed[content] = record
            if len(_parsed) > _MAX_PARSED:
                del _parsed[next(iter(_parsed))]
    return record


def _parse_anew(model: type[_Record], raw: Any, owner: str) -> Any:
    try:
        return model.model_validate(raw).as_peers_may_say()
    except (pydantic.ValidationError, ValueError) as e:
        reasons = ("; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in e.errors())
                   if isinstance(e, pydantic.ValidationError) else str(e))
        reason = printable(f"{model.__name__} of owner {owner[:8] or '?'}: {reasons}", 300)
        kind = _reason_kind(model, e)
        with _logged_lock:
            fresh = kind not in _logged_reasons
            _logged_reasons[kind] = None
            _logged_reasons.move_to_end(kind)
            while len(_logged_reasons) > _MAX_LOGGED_REASONS:
                _logged_reasons.popitem(last=False)
        logger.log(logging.INFO if fresh else logging.DEBUG, "skipping a record: %s", reason)
        return None


def _node(peer: DHTPeer) -> DHTNode:
    assert peer.node is not None, "start the DHT peer first"
    return peer.node


async def _get_many(node: DHTNode, keys: list[str], breadth: int | None = None) -> dict[str, Any]:
    """Each key's latest value: every subkey's latest copy among the peers the search visits, which are
    those nearest the key (where stores go) that it keeps in view (``breadth``; None: hivemind's default,
    its bucket size, every peer of a small swarm)."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"), beam_size=breadth)
    return {key: (None if entry is None else entry.value) for key, entry in found.items()}


def _owned_records(value: Any, model: type[_Record], now: float) -> list[tuple[str, Any, float]]:
    """(name, record, expiration) of each well-formed owned record in a key's dictionary, latest
    expiration first (then by owner); see the module docstring for what is skipped."""
    if not isinstance(value, dict):  # a plain value: from before owned records
        return []
    latest = now + MAX_RECORD_TTL + CLOCK_MARGIN
    found = []
    for subkey, entry in value.items():
        claim = parse_owned_subkey(subkey)
        expiration = getattr(entry, "expiration_time", None)
        if claim is None or not isinstance(expiration, (int, float)) or not expiration <= latest:
            continue
        record = _parse(model, getattr(entry, "value", None), claim[1])
        if record is not None and record.owner == claim[1]:
            found.append((claim[0], record, float(expiration)))
    found.sort(key=lambda item: (-item[2], item[1].owner))
    return found


def _experts_from(found: dict[str, Any], now: float) -> dict[str, list[ExpertRecord]]:
    result = {}
    for uid, value in found.items():
        replicas = [record for name, record, _ in _owned_records(value, ExpertRecord, now)
                    if name == "" and record.uid == uid and record.state == "online"]
        if replicas:
            result[uid] = replicas
    return result


async def find_experts_async(node: DHTNode, uids: Sequence[str]) -> dict[str, list[ExpertRecord]]:
    """Every live replica (online, unexpired, well-formed and owned; one per hosting node, the latest
    refreshed first) of the given uids; uids without one are left out."""
    return _experts_from(await _get_many(node, list(uids)), get_dht_time())


def find_experts(peer: DHTPeer, uids: Sequence[str]) -> dict[str, list[ExpertRecord]]:
    """Every live replica of the given uids (blocking; see :func:`find_experts_async`)."""
    return peer.run(find_experts_async(_node(peer), uids))


async def find_under_prefixes_async(node: DHTNode, keys: Sequence[str], breadth: int | None = None
                                    ) -> dict[str, dict[int, list[ExpertRecord]]]:
    """For each grid prefix key (``ffn.``, ``ffn.3.``): by next coordinate, the live records of every
    node that announced one there (one per node, the latest refreshed first). A record under
    ``ffn.3.`` / 5 names ``ffn.3.5`` or an expert deeper in the grid (``ffn.3.5.1``). ``breadth``: how
    many of the peers nearest each key the search keeps in view (see :func:`_get_many`)."""
    found = await _get_many(node, list(keys), breadth)
    now = get_dht_time()
    result: dict[str, dict[int, list[ExpertRecord]]] = {}
    for key, value in found.items():
        entries: dict[int, list[ExpertRecord]] = {}
        for name, record, _ in _owned_records(value, ExpertRecord, now):
            coord = _coordinate(name)
            if (coord is None or record.state != "online"
                    or not (record.uid == f"{key}{coord}" or record.uid.startswith(f"{key}{coord}."))):
                continue
            entries.setdefault(coord, []).append(record)
        result[key] = entries
    return result


def find_under_prefixes(peer: DHTPeer, keys: Sequence[str], breadth: int | None = None
                        ) -> dict[str, dict[int, list[ExpertRecord]]]:
    """:func:`find_under_prefixes_async`, blocking."""
    return peer.run(find_under_prefixes_async(_node(peer), keys, breadth))


def _coordinate(name: str) -> int | None:
    """The grid coordinate a prefix entry's name spells (a non-negative integer of at most MAX_COORD_DIGITS
    digits, as uids write it); None for any other name (anyone may file one)."""
    if not (0 < len(name) <= MAX_COORD_DIGITS and name.isdecimal() and name.isascii()):
        return None
    return int(name) if str(int(name)) == name else None


async def _records_by_name(node: DHTNode, key: str, model: type[_Record], names: str,
                           keep: Callable[[Any], bool]) -> dict[str, Any]:
    """The well-formed owned records under ``key`` that ``keep`` accepts, each naming its subkey's
    name in its field ``names`` (a record filed under another name is ignored), by name. A name
    claimed by several owners (a node restarted without its identity file, before its old records
    expire; or a peer claiming another's name) is no one's: each claim is listed as
    ``<name>@<first 8 characters of its owner>``, so none hides another."""
    entry = await node.get(key, latest=True)
    claims: dict[str, list[Any]] = {}
    for name, record, _ in _owned_records(None if entry is None else entry.value, model, get_dht_time()):
        if getattr(record, names) == name and keep(record):
            claims.setdefault(name, []).append(record)
    found = {}
    for name, records in claims.items():
        if len(records) == 1:
            found[name] = records[0]
        else:
            found.update({f"{name}@{record.owner[:8]}": record for record in records})
    return found


async def find_nodes_async(node: DHTNode) -> dict[str, NodeRecord]:
    """Every live node record in the swarm, by node id (see :func:`_records_by_name` for a node id
    that several owners claim)."""
    return await _records_by_name(node, NODES_KEY, NodeRecord, "node_id", lambda r: r.state == "online")


def find_nodes(peer: DHTPeer) -> dict[str, NodeRecord]:
    """Every live node record in the swarm, by node id (blocking)."""
    return peer.run(find_nodes_async(_node(peer)))


async def find_relays_async(node: DHTNode) -> dict[str, RelayRecord]:
    """Every live relay announced in the swarm, by peer id."""
    return await _records_by_name(node, RELAYS_KEY, RelayRecord, "peer_id", lambda r: True)


def find_relays(peer: DHTPeer, timeout: float | None = None) -> dict[str, RelayRecord]:
    """Every live relay announced in the swarm, by peer id (blocking; TimeoutError after ``timeout``)."""
    return peer.run(find_relays_async(_node(peer)), timeout)
