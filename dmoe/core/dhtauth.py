"""DHTAuthorizer: a private swarm's DHT traffic, every request and response signed with the swarm key
(hivemind's authorizer hook). Apart from :mod:`dmoe.core.auth` because it needs hivemind, which
``dmoe swarm keygen`` does not."""

from __future__ import annotations

import hmac
import logging
import secrets
import time

from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase

from dmoe.core.auth import MAX_CLOCK_SKEW, Nonces, SwarmKey, load_key

logger = logging.getLogger(__name__)


class DHTAuthorizer(AuthorizerBase):
    """Signs and checks every DHT request and response with the swarm key (hivemind's hook)."""

    def __init__(self, key: SwarmKey, max_skew: float = MAX_CLOCK_SKEW):
        self.key, self.max_skew = key, max_skew
        self._seen = Nonces()

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key=None) -> None:
        auth = request.auth
        auth.time = time.time()
        auth.nonce = secrets.token_bytes(12)
        auth.signature = b""
        auth.signature = self.key.tag(b"dht-request", request.SerializeToString(deterministic=True))

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        expected = self.key.tag(b"dht-request", request.SerializeToString(deterministic=True))
        auth.signature = signature
        if not hmac.compare_digest(signature, expected):
            logger.debug("refused a DHT request without this swarm's key")
            return False
        now = time.time()
        if abs(now - auth.time) > self.max_skew:
            return False
        return self._seen.add(auth.nonce, max(auth.time, now) + self.max_skew + 1, now)

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self.key.tag(b"dht-response", response.SerializeToString(deterministic=True))

    async def validate_response(self, response: AuthorizedResponseBase,
                                request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        expected = self.key.tag(b"dht-response", response.SerializeToString(deterministic=True))
        auth.signature = signature
        return hmac.compare_digest(signature, expected) and auth.nonce == request.auth.nonce


def dht_authorizer(path: str | None) -> DHTAuthorizer | None:
    """The DHT authorizer of the swarm key at ``path``, or None for an open swarm."""
    key = load_key(path)
    return DHTAuthorizer(key) if key is not None else None
