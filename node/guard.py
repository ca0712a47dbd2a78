"""CallGuard: who may call a node, and how much: the swarm key, and limits per peer.

Checked at the start of every call, before the request is read (ExpertService's handlers call
:meth:`CallGuard.admit`; the health and reflection services pass :meth:`CallGuard.admit_open` in the
server's interceptor, :mod:`dmoe.node.server`):

- the swarm key (:class:`dmoe.core.auth.CallVerifier`), when the node serves a private swarm:
  UNAUTHENTICATED otherwise (ExpertService only: health checks and reflection need no key);
- calls in flight per peer (``max_calls_per_peer``) and requests per second per peer, a
  :class:`~dmoe.core.ratelimit.TokenBucket` of ``peer_rate`` per second with room for
  ``peer_burst``: RESOURCE_EXHAUSTED otherwise, with a message that names the limit. Every chunk
  of a request stream after its first is one more request (:meth:`CallGuard.charge`), so a stream
  of tiny chunks costs what as many calls cost; every part of a batched call (ForwardBatch,
  BackwardBatch) after its first is one more call, in flight and against the rate
  (:meth:`CallGuard.admit_part`), so one call for many experts costs what a call per expert costs.
  The node-wide limits (``max_concurrent_calls``, queued tokens, bytes arriving) stay in force
  beside these.

Who a peer is (:func:`peer_key`): over mutual TLS (a private swarm), its client certificate, so
members behind one address get a budget each; otherwise its IPv4 address, or the /64 network of
its IPv6 address (one host is given a whole /64, so a finer key would give it 2^64 budgets), with
IPv4-mapped IPv6 addresses keyed on the IPv4 address. A member holding the swarm key can make as
many certificates as it likes, hence as many budgets: against members, only the node-wide limits
hold.

The table of peers is bounded (least recently seen peers are forgotten first), so a flood of
addresses or certificates costs a fixed amount of memory.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import grpc

from dmoe.core.addresses import address_group
from dmoe.core.auth import CallVerifier
from dmoe.core.ratelimit import TokenBucket

MAX_PEERS = 10_000


@dataclasses.dataclass(slots=True)
class _Peer:
    requests: TokenBucket  # peer_rate per second, room for peer_burst
    in_flight: int = 0  # calls
    parts_in_flight: int = 0  # parts of batched calls after their first (which is the call itself)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class CallGuard:
    def __init__(self, *, verifier: CallVerifier | None, max_calls_per_peer: int, peer_rate: float,
                 peer_burst: float, max_parts_per_peer: int):
        self.verifier = verifier
        self.max_calls_per_peer, self.peer_rate, self.peer_burst = max_calls_per_peer, peer_rate, peer_burst
        self.max_parts_per_peer = max_parts_per_peer
        self._peers: collections.OrderedDict[str, _Peer] = collections.OrderedDict()
        self.num_unauthenticated = self.num_rate_limited = 0

    @property
    def calls_in_flight(self) -> int:
        """Calls admitted and not ended yet, of every peer."""
        return sum(peer.in_flight for peer in list(self._peers.values()))

    def admit(self, method: str, peer: str, metadata,
              auth_context: Mapping[str, Sequence[bytes]] | None = None) -> str:
        """Raise Refused, or count the call in and return the peer key to pass to :meth:`release`.
        ``peer`` and ``auth_context`` are the call's ``context.peer()`` and ``context.auth_context()``.
        Runs on the server's event loop only (no lock)."""
        if self.verifier is not None:
            why = self.verifier.check(method, metadata)
            if why is not None:
                self.num_unauthenticated += 1
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, why)
        return self.admit_open(peer, auth_context)

    def admit_open(self, peer: str, auth_context: Mapping[str, Sequence[bytes]] | None = None) -> str:
        """:meth:`admit` without the swarm key's check: for the services open to all (health, reflection)."""
        key = peer_key(peer, auth_context)
        state = self._peers.get(key)
        if state is None:  # a new peer starts with a full burst
            state = self._peers[key] = _Peer(TokenBucket(self.peer_rate, self.peer_burst))
            if len(self._peers) > MAX_PEERS:
                self._forget_one()
        else:
            self._peers.move_to_end(key)
        self._enter(key, state)
        return key

    def admit_part(self, key: str) -> None:
        """A part of a batched call of the peer ``key`` returned by :meth:`admit` (a call in flight),
        after its first (which the call's own admission stands for): in flight among the peer's parts
        (``max_parts_per_peer``; give it back with :meth:`release_part`) and a request against its
        rate, as its own call would be. The parts have a limit of their own, far above the calls':
        one step of a model of many small experts sends one node a part per expert, hundreds in one
        call, while the calls' limit bounds the server's slots one peer holds. Raise Refused past
        either limit."""
        state = self._peers.get(key)
        if state is None:  # a peer with a call in flight is never forgotten
            return
        if state.parts_in_flight >= self.max_parts_per_peer:
            self.num_rate_limited += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{state.parts_in_flight} parts of batched calls of yours are in flight already, "
                          f"this node's limit per peer (max_parts_per_peer={self.max_parts_per_peer}); "
                          f"wait for them")
        self._take(key, state)
        state.parts_in_flight += 1

    def release_part(self, key: str) -> None:
        state = self._peers.get(key)
        if state is not None:
            state.parts_in_flight -= 1

    def _enter(self, key: str, state: _Peer) -> None:
        if state.in_flight >= self.max_calls_per_peer:
            self.num_rate_limited += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{state.in_flight} calls of yours are in flight already, this node's limit per "
                          f"peer (max_calls_per_peer={self.max_calls_per_peer}); wait for them")
        self._take(key, state)
        state.in_flight += 1

    def charge(self, key: str) -> None:
        """One more request of the peer ``key`` returned by :meth:`admit` (a call in flight): a chunk
        of a request stream. Raise Refused when the peer's rate is spent."""
        state = self._peers.get(key)
        if state is not None:  # a peer with a call in flight is never forgotten
            self._take(key, state)

    def _take(self, key: str, state: _Peer) -> None:
        if not state.requests.try_take():
            self.num_rate_limited += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"more than {self.peer_rate:g} requests per second from {key} "
                          f"(peer_rate={self.peer_rate:g}, peer_burst={self.peer_burst:g}; every chunk of "
                          f"a stream counts); slow down")

    def release(self, key: str) -> None:
        state = self._peers.get(key)
        if state is not None:
            state.in_flight -= 1

    def _forget_one(self) -> None:
        for key, state in self._peers.items():  # the least recently seen peer with nothing in flight
            if state.in_flight == 0:
                del self._peers[key]
                return


def peer_key(peer: str, auth_context: Mapping[str, Sequence[bytes]] | None = None) -> str:
    """Who a caller is, for the limits per peer: 'cert:<sha256 of its certificate>' over mutual
    TLS; else its IPv4 address ('1.2.3.4'), the /64 of its IPv6 address ('2001:db8:1:2::/64'; an
    IPv4-mapped one gives the IPv4 address); for other transports (unix sockets) the whole string."""
    certificates = auth_context.get("x509_pem_cert") if auth_context else None
    if certificates:
        return "cert:" + hashlib.sha256(certificates[0]).hexdigest()[:32]
    address = peer_address(peer)
    if peer.startswith("ipv6:"):
        group = address_group(address)
        return peer if group == address else group  # an address that does not parse: the whole string
    return address


def peer_address(peer: str) -> str:
    """The address part of grpc's peer string: 'ipv4:1.2.3.4:5678' -> '1.2.3.4',
    'ipv6:[::1]:5' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer  # unix sockets and the like: the whole string
