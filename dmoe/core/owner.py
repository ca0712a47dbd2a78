"""Who owns a DHT record: the key that signs a peer's records, the subkeys that name their owner,
and the longest a record may live. (The hivemind validator that enforces this is
:mod:`dmoe.core.recordguard`; this module imports neither hivemind nor torch, so configs can use
its constants.)

Scheme. Every record dmoe stores sits under a subkey ``<name>@ed25519:<owner>`` (:func:`owned_subkey`),
where ``<owner>`` is the owner's Ed25519 public key (32 bytes, base64url without padding: 43
characters) and ``<name>`` tells the record apart among the owner's records under that key (a grid
coordinate, a node id, or nothing). Its value is sealed (:func:`seal`): the msgpack pair
``[value, signature]``, the signature by the owner's key over :func:`record_message` (the key, the
subkey, the value and the expiration time), so a record can be neither changed, moved to another
key or subkey, nor given another expiration by anyone but its owner. A reader without the
validator cannot parse a sealed value, so it skips such records rather than trust them unchecked.

Why Ed25519 and not hivemind's ``RSASignatureValidator`` (the same scheme with an RSA key in the
subkey): measured here per record of a grid prefix (2 CPU cores shared with other work, best of 5
runs), signing took 47 us and checking 137 us with this module and :mod:`dmoe.core.recordguard`
(a check met again is remembered: 2 us); hivemind's validator with its RSA-2048 key took 705 us to
sign and 112 us to check. Checking costs the same; signing is 15 times cheaper, and a node signs
all its records itself, on its DHT thread, on every heartbeat: (1 + grid depth) records per expert
(fewer: a prefix entry is shared), 2081 for 1024 experts of a 32x32 grid, 0.1 s per beat against
1.5 s with RSA (the whole beat, stored on two peers of one process, took 2.5 s signed and 1.5 s
unsigned, most of it hivemind's traversal). The ~5 peers that store a key and the readers check,
each once. Sizes: 55 bytes of subkey and 70 of signature and framing here, 392 and 356 with RSA,
in every entry of every read.
Not the peer's libp2p key either: its private key lives in the libp2p daemon, out of reach, unless
``identity_path`` is given (and then it is RSA).

The owner key of a :class:`dmoe.core.dht.DHTPeer` is fresh on every start, or, with an identity
file (``--identity-path``), derived from it (:meth:`OwnerKey.from_identity_file`), so that a node
that restarts owns its old records again and replaces them instead of leaving a stale replica
until it expires.

Lifetime. No record may expire later than ``MAX_RECORD_TTL`` (10 minutes) from now: a node's
``--record-ttl`` must stay below it, and a record that asks for more (pinned for a year by a
hostile peer) is refused by the DHT peers' validator and dropped by readers. Both allow
``CLOCK_MARGIN`` more, because the validator also runs on what peers answer to reads, where one
refused entry drops the whole answer: a margin well above the clock differences hivemind accepts
(3 s) keeps a record stored at the limit by a peer whose clock runs ahead from costing the readers
behind it every record under that key.
"""

from __future__ import annotations

import base64
import functools
import os
import re

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_RECORD_TTL = 600.0  # seconds: the latest expiration a record may have, from now
CLOCK_MARGIN = 60.0  # seconds the validator and readers allow past MAX_RECORD_TTL (see the docstring)
OWNER_TAG = "@ed25519:"  # between a subkey's name and its owner
SIGNATURE_BYTES = 64
_OWNER_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_MESSAGE_TAG = b"dmoe-record-1"


class OwnerKey:
    """An Ed25519 key that owns DHT records: ``OwnerKey.generate()``, ``.owner_id``, ``.sign(message)``."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.owner_id: str = _encode(private_key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> OwnerKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_secret(cls, secret: bytes) -> OwnerKey:
        """The key derived (HKDF-SHA256) from secret bytes: the same secret, the same owner."""
        if len(secret) < 16:
            raise ValueError("an owner key needs a secret of at least 16 bytes")
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dmoe owner key 1").derive(secret)
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_identity_file(cls, path: str | os.PathLike) -> OwnerKey:
        """The owner key of a peer with this libp2p identity file (its private key; see the module
        docstring): a node restarted with ``--identity-path`` owns its records again."""
        with open(path, "rb") as f:
            return cls.from_secret(f.read())

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"OwnerKey({self.owner_id})"


def owned_subkey(name: str | int, owner_id: str) -> str:
    """The subkey of ``owner_id``'s record called ``name`` (a coordinate, a node id, or "")."""
    name = str(name)
    if OWNER_TAG in name:
        raise ValueError(f"a record name cannot hold {OWNER_TAG!r}: {name!r}")
    if not _OWNER_RE.fullmatch(owner_id):
        raise ValueError(f"not an owner id: {owner_id!r}")
    return f"{name}{OWNER_TAG}{owner_id}"


def claims_owner(subkey: object) -> bool:
    """Whether a subkey says it has an owner (well-formed or not)."""
    return isinstance(subkey, str) and OWNER_TAG in subkey


def parse_owned_subkey(subkey: object) -> tuple[str, str] | None:
    """(name, owner id) of an owned subkey; None for a subkey without an owner (records from before
    owned records, or not dmoe's) or one that claims an owner but is malformed."""
    if not isinstance(subkey, str):
        return None
    name, tag, owner_id = subkey.rpartition(OWNER_TAG)
    if not tag or not _OWNER_RE.fullmatch(owner_id):
        return None
    return name, owner_id


def record_message(key: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    """What the owner signs: the record's key (its DHT id), subkey and value (both serialized) and
    expiration time."""
    return msgpack.packb([_MESSAGE_TAG, key, subkey, value, float(expiration_time)], use_bin_type=True)


def seal(value: bytes, signature: bytes) -> bytes:
    """The stored form of a signed value: the msgpack pair [value, signature]."""
    return msgpack.packb([value, signature], use_bin_type=True)


def unseal(sealed: bytes) -> tuple[bytes, bytes] | None:
    """(value, signature) of a sealed value; None if it is not one."""
    try:
        pair = msgpack.unpackb(sealed, raw=False, use_list=True)
    except Exception:  # msgpack raises several types on garbage, including ValueError and its own
        return None
    if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], bytes)
            or not isinstance(pair[1], bytes) or len(pair[1]) != SIGNATURE_BYTES):
        return None
    return pair[0], pair[1]


def verify(owner_id: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``owner_id``'s signature of ``message``."""
    public_key = _public_key(owner_id)
    if public_key is None:
        return False
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _public_key(owner_id: str) -> Ed25519PublicKey | None:
    if not _OWNER_RE.fullmatch(owner_id):
        return None
    raw = base64.urlsafe_b64decode(owner_id + "=")
    if _encode(raw) != owner_id:  # the last character's two spare bits set: one key, one spelling
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
