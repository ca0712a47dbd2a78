"""What every dmoe DHT peer refuses: :class:`OwnedRecordValidator`, the hivemind record validator of
owned records (:mod:`dmoe.core.owner` holds the scheme), and :func:`guard_node`, which keeps a
peer's own storage from losing or hiding live records.

The validator (installed by :class:`dmoe.core.dht.DHTPeer` with ``DHTNode.create(record_validator=...)``;
hivemind runs it on every record a peer asks to store, on every record a peer answers to a read,
and before a peer keeps its own record) refuses:

- a plain value (no subkey): it can have no owner, and one that expires later would replace the
  key's whole dictionary of owned records (one that expires earlier removed it too: see below);
- a record that expires past now + ``MAX_RECORD_TTL`` + ``CLOCK_MARGIN``;
- a record whose subkey names an owner (``...@ed25519:<key>``) but whose value is not sealed with
  that owner's signature of its key, subkey, value and expiration, or whose subkey is malformed.

Records under subkeys without an owner (hivemind's averager keeps its group keys under peer ids)
pass, within the same lifetime; dmoe's readers skip them. A signature checked once is remembered
(the last ``VERIFIED_CACHE`` records), since a read meets the same record in the answers of several
peers and a node keeps what it signed itself.

Storage, two flaws of hivemind 1.1.12 that :func:`guard_node` works around:

- ``TimedStorage.store`` pushes a value's expiration onto the expiry heap before it refuses the value
  for expiring earlier than the one it keeps; when that earlier time comes, the heap entry removes
  the live value. Any peer could so delete another's record on a peer's storage: by re-sending an
  owner's earlier (validly signed) record, or, without the validator, any plain value for the key,
  which drops the key's whole dictionary. A read does it too, honestly: the first candidate of a
  ``get`` is the local storage's own dictionary, and a replica's older entry is merged into it.
  :func:`fix_timed_storage` makes ``store`` refuse such a value before touching the heap (it
  patches the class, once, for the process: every TimedStorage has the flaw, and a DHT value's
  dictionaries are created inside hivemind).
- A peer answers a read from its cache instead of its storage when the cached value of the key
  expires later: anyone can put a dictionary holding one entry of their own, expiring later than
  every owner's, into a peer's cache (``in_cache=True``) and so hide the key's records there. A
  dmoe peer keeps no cache (:class:`_NoCache`); a read of dmoe's records traverses to the latest
  values anyway.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import msgpack
from hivemind.dht import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.storage import DHTLocalStorage
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from dmoe.core.owner import (
    CLOCK_MARGIN,
    MAX_RECORD_TTL,
    OwnerKey,
    claims_owner,
    parse_owned_subkey,
    record_message,
    seal,
    unseal,
    verify,
)

logger = logging.getLogger(__name__)

VERIFIED_CACHE = 16384  # records whose signature was checked, remembered


class OwnedRecordValidator(RecordValidatorBase):
    """Signs this peer's records (those under a subkey naming :attr:`owner`) and checks everyone's."""

    def __init__(self, owner: OwnerKey):
        self.owner = owner
        self._verified: collections.OrderedDict[tuple[bytes, bytes, bytes, float], None] = (
            collections.OrderedDict())

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey == DHTProtocol.IS_REGULAR_VALUE:
            logger.debug("refusing a plain DHT value: dmoe stores only subkeys")
            return False
        now = get_dht_time()
        if not record.expiration_time <= now + MAX_RECORD_TTL + CLOCK_MARGIN:
            logger.debug("refusing a DHT record that expires in %.0fs", record.expiration_time - now)
            return False
        # a record verified before (the same one in the answers of several peers): passed at once, before
        # its subkey is parsed again; only owned records whose signature checked are remembered
        identity = (record.key, record.subkey, record.value, record.expiration_time)
        if identity in self._verified:
            self._verified.move_to_end(identity)
            return True
        subkey = _subkey(record.subkey)
        if not claims_owner(subkey):
            return subkey is not _MALFORMED
        claim = parse_owned_subkey(subkey)
        if claim is None:
            return False
        opened = unseal(record.value)
        if opened is None or not verify(claim[1], record_message(record.key, record.subkey, opened[0],
                                                                 record.expiration_time), opened[1]):
            logger.debug("refusing a DHT record whose signature does not check (owner %s)", claim[1])
            return False
        self._remember(identity)
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        """Seal the value of a record under a subkey of this peer's owner; others pass unchanged (and
        are refused, if they name another owner)."""
        claim = parse_owned_subkey(_subkey(record.subkey))
        if claim is None or claim[1] != self.owner.owner_id:
            return record.value
        message = record_message(record.key, record.subkey, record.value, record.expiration_time)
        sealed = seal(record.value, self.owner.sign(message))
        self._remember((record.key, record.subkey, sealed, record.expiration_time))
        return sealed

    def strip_value(self, record: DHTRecord) -> bytes:
        if parse_owned_subkey(_subkey(record.subkey)) is None:
            return record.value
        opened = unseal(record.value)
        return record.value if opened is None else opened[0]

    def _remember(self, identity: tuple[bytes, bytes, bytes, float]) -> None:
        self._verified[identity] = None
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)

    @property
    def priority(self) -> int:
        return 10  # like hivemind's signature validator: checked before validators that parse values


_MALFORMED = object()


def _subkey(subkey_bytes: bytes) -> object:
    """The subkey, deserialized (hivemind serializes subkeys with msgpack); _MALFORMED if it is not."""
    try:
        return msgpack.unpackb(subkey_bytes, raw=False)
    except Exception:  # msgpack raises several types on garbage
        return _MALFORMED


def owner_of(node: DHTNode) -> OwnerKey:
    """The owner key with which ``node`` signs its records (a node made by DHTPeer)."""
    validator = node.protocol.record_validator
    if not isinstance(validator, OwnedRecordValidator):
        raise TypeError("this DHT node signs no records: create it with dmoe.core.dht.DHTPeer")
    return validator.owner


class _NoCache(DHTLocalStorage):
    """A DHT peer's cache that keeps nothing (see the module docstring)."""

    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        return False

    def store_subkey(self, key: Any, subkey: Any, value: Any, expiration_time: float) -> bool:
        return False


_hivemind_store = TimedStorage.store


def _store_refusing_first(self: TimedStorage, key: Any, value: Any, expiration_time: float) -> bool:
    """TimedStorage.store, except that a value expiring no later than the one kept is refused before
    its expiration goes onto the heap (where it would remove the kept value at that time)."""
    kept = self.data.get(key)
    if kept is not None and kept.expiration_time >= expiration_time:
        return False
    return _hivemind_store(self, key, value, expiration_time)


def fix_timed_storage() -> None:
    """Install the fix of TimedStorage.store (see the module docstring); safe to call again."""
    if TimedStorage.store is not _store_refusing_first:
        assert TimedStorage.store is _hivemind_store, "TimedStorage.store was replaced by someone else"
        TimedStorage.store = _store_refusing_first


def guard_node(node: DHTNode) -> None:
    """Keep ``node``'s cache from hiding live records (see the module docstring). Its storage is kept
    from losing them by :func:`fix_timed_storage`, which the caller runs before it creates the node."""
    node.protocol.cache = _NoCache()

