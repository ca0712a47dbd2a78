"""Private swarms: one shared secret, the swarm key, held by every node, client and coordinator.

A key file (``dmoe swarm keygen FILE``) holds 32 random bytes in hex. Given ``--swarm-key FILE``:

- **data plane (gRPC):** every call carries ``dmoe-auth`` metadata, ``<time>.<nonce>.<tag>`` with
  tag = HMAC-SHA256(key, method | time | nonce). A node answers a call without a valid tag,
  one more than ``MAX_CLOCK_SKEW`` seconds away from its own clock, or a tag it has already
  seen (a replay) with UNAUTHENTICATED, before it reads the request. The health service stays
  open, so that process supervisors can probe the node.
- **DHT:** hivemind's DHT lets a peer sign and check every request and response
  (``hivemind.utils.auth.AuthorizerBase``). :class:`DHTAuthorizer` signs them with the same HMAC,
  so a peer without the key can neither store, find nor answer anything among the swarm's peers.
  hivemind's own ``TokenAuthorizerBase`` needs an authority that issues RSA-signed access tokens;
  a shared secret needs no server, which is what a group of friends running a swarm can keep up.

The calls are also encrypted: nodes of a private swarm serve TLS with certificates that the key
makes (:mod:`dmoe.core.tls`). Anyone holding the key is a full member. See docs/security.md.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from dmoe.errors import ConfigError

logger = logging.getLogger(__name__)

METADATA_KEY = "dmoe-auth"
KEY_BYTES = 32
MAX_CLOCK_SKEW = 60.0  # seconds a token's time may differ from the receiver's clock


class SwarmKey:
    """The secret of a private swarm. ``SwarmKey.load(path)``, or ``SwarmKey.generate(path)`` once."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ConfigError(f"a swarm key needs at least 16 bytes, got {len(secret)}")
        self._secret = secret
        # a short public name for logs, so operators can tell keys apart without showing them
        self.fingerprint = hashlib.sha256(b"dmoe-fingerprint|" + secret).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | os.PathLike) -> SwarmKey:
        path = Path(path)
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the swarm key {path}: {e.strerror}; make one with "
                              f"'dmoe swarm keygen {path}'") from None
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"{path} is not a swarm key "
                              f"(expected hex, as 'dmoe swarm keygen' writes)") from None
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("swarm key %s is readable by other users of this machine: chmod 600 it", path)
        return cls(secret)

    @classmethod
    def generate(cls, path: str | os.PathLike) -> SwarmKey:
        """Write a new random key to ``path`` (mode 600); refuses to overwrite a file."""
        secret = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists already; a swarm key is never overwritten") from None
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
        return cls(secret)

    def tag(self, *parts: bytes) -> bytes:
        return hmac.new(self._secret, b"|".join(parts), hashlib.sha256).digest()

    # ---- gRPC calls ---------------------------------------------------------------------------------
    def call_metadata(self, method: str) -> tuple[tuple[str, str]]:
        """Metadata that authenticates one call of ``method`` (e.g. '/dmoe.ExpertService/Forward')."""
        now, nonce = f"{time.time():.3f}", secrets.token_hex(12)
        tag = self.tag(b"call", method.encode(), now.encode(), nonce.encode()).hex()
        return ((METADATA_KEY, f"{now}.{nonce}.{tag}"),)


def fullmethod(service: str, method: str) -> str:
    return f"/{service}/{method}"


class Nonces:
    """Nonces of accepted tokens, each kept until its token is too old to pass the time check
    anyway; forgetting costs O(1) per nonce (a queue in order of acceptance)."""

    def __init__(self):
        self._seen: dict[str | bytes, float] = {}
        self._expiry: collections.deque[tuple[float, str | bytes]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, nonce: str | bytes, forget_at: float, now: float) -> bool:
        """Remember ``nonce``; False if it is remembered already (a replay)."""
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                _, old = self._expiry.popleft()
                if self._seen.get(old, now + 1) <= now:
                    del self._seen[old]
            if nonce in self._seen:
                return False
            self._seen[nonce] = forget_at
            self._expiry.append((forget_at, nonce))
            return True

    def __len__(self) -> int:
        return len(self._seen)


class CallVerifier:
    """Checks the ``dmoe-auth`` token of incoming calls; remembers the tokens it accepted while
    they are fresh, so that a captured token cannot be used twice."""

    def __init__(self, key: SwarmKey, max_skew: float = MAX_CLOCK_SKEW):
        self.key, self.max_skew = key, max_skew
        self._seen = Nonces()

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None if the call is authentic, else why not (for the UNAUTHENTICATED status)."""
        token = next((v for k, v in metadata or () if k == METADATA_KEY), None)
        if token is None:
            return "this node serves a private swarm: call it with the swarm's key (--swarm-key)"
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        try:
            seconds, fraction, nonce, tag = token.split(".")
            sent = float(f"{seconds}.{fraction}")
            given = bytes.fromhex(tag)
        except ValueError:
            return "malformed dmoe-auth token"
        expected = self.key.tag(b"call", method.encode(), f"{seconds}.{fraction}".encode(), nonce.encode())
        if not hmac.compare_digest(given, expected):
            return "wrong swarm key (the token does not match this node's key)"
        now = time.time()
        if abs(now - sent) > self.max_skew:
            return (f"token time is {now - sent:+.0f}s off this node's clock "
                    f"(more than {self.max_skew:.0f}s): sync clocks")
        # a token passes the time check until sent + max_skew; its nonce is kept a little longer
        if not self._seen.add(nonce, max(sent, now) + self.max_skew + 1, now):
            return "token already used (a replayed call)"
        return None


def load_key(path: str | None) -> SwarmKey | None:
    """The swarm key at ``path``, or None for an open swarm."""
    return SwarmKey.load(path) if path else None
