"""CallGuard: who may call a node, and how much: the swarm key, and limits per peer.

Checked at the start of every ExpertService call, before the request is read:

- the swarm key (:class:`dmoe.core.auth.CallVerifier`), when the node serves a private swarm:
  UNAUTHENTICATED otherwise;
- calls in flight per peer (``max_calls_per_peer``) and requests per second per peer, a
  :class:`~dmoe.core.ratelimit.TokenBucket` of ``peer_rate`` per second with room for
  ``peer_burst``: RESOURCE_EXHAUSTED otherwise, with a message that names the limit. A peer is
  its IP address (the port changes with every connection); the node-wide limits
  (``max_concurrent_calls``, queued tokens, bytes arriving) stay in force beside these.

The table of peers is bounded (least recently seen peers are forgotten first), so a flood of
addresses costs a fixed amount of memory.
"""

from __future__ import annotations

import collections
import dataclasses

import grpc

from dmoe.core.auth import CallVerifier
from dmoe.core.ratelimit import TokenBucket

MAX_PEERS = 10_000


@dataclasses.dataclass(slots=True)
class _Peer:
    requests: TokenBucket  # peer_rate per second, room for peer_burst
    in_flight: int = 0


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class CallGuard:
    def __init__(self, *, verifier: CallVerifier | None, max_calls_per_peer: int, peer_rate: float,
                 peer_burst: float):
        self.verifier = verifier
        self.max_calls_per_peer, self.peer_rate, self.peer_burst = max_calls_per_peer, peer_rate, peer_burst
        self._peers: collections.OrderedDict[str, _Peer] = collections.OrderedDict()
        self.num_unauthenticated = self.num_rate_limited = 0

    def admit(self, method: str, peer: str, metadata) -> str:
        """Raise Refused, or count the call in and return the peer key to pass to :meth:`release`.
        Runs on the server's event loop only (no lock)."""
        if self.verifier is not None:
            why = self.verifier.check(method, metadata)
            if why is not None:
                self.num_unauthenticated += 1
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, why)
        key = peer_address(peer)
        state = self._peers.get(key)
        if state is None:  # a new peer starts with a full burst
            state = self._peers[key] = _Peer(TokenBucket(self.peer_rate, self.peer_burst))
            if len(self._peers) > MAX_PEERS:
                self._forget_one()
        else:
            self._peers.move_to_end(key)
        if state.in_flight >= self.max_calls_per_peer:
            self.num_rate_limited += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{state.in_flight} calls of yours are in flight already, this node's limit per "
                          f"peer (max_calls_per_peer={self.max_calls_per_peer}); wait for them")
        if not state.requests.try_take():
            self.num_rate_limited += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"more than {self.peer_rate:g} requests per second from {key} "
                          f"(peer_rate={self.peer_rate:g}, peer_burst={self.peer_burst:g}); slow down")
        state.in_flight += 1
        return key

    def release(self, key: str) -> None:
        state = self._peers.get(key)
        if state is not None:
            state.in_flight -= 1

    def _forget_one(self) -> None:
        for key, state in self._peers.items():  # the least recently seen peer with nothing in flight
            if state.in_flight == 0:
                del self._peers[key]
                return


def peer_address(peer: str) -> str:
    """The address part of grpc's peer string: 'ipv4:1.2.3.4:5678' -> '1.2.3.4',
    'ipv6:[::1]:5' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer  # unix sockets and the like: the whole string
