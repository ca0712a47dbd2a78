"""Swarm: a client's view of the swarm: a DHT peer, a cache of live experts, and endpoint back-off.

Lookups of live experts are cached for ``cache_ttl`` seconds, so a training step does not wait on
the DHT when nothing changed; a lookup that fails or takes longer than ``lookup_timeout`` (a peer
on the lookup's path frozen, the DHT cut off) leaves the last known experts in use, so a step's
time stays bounded by its deadlines. An endpoint that fails is banned for a capped, exponentially growing
time (``ban_base`` x 2^(failures-1), at most ``ban_max``), then tried again; one success clears it.
Failures reported while the endpoint is banned (the other calls of one step, in flight when it
failed) do not lengthen the ban: a node that fails once per try is avoided 1, 2, 4 ... seconds.

A failure that only a broken or hostile peer causes (see :func:`dmoe.client.dispatch.is_misbehaviour`: a
reply of the wrong shape, NaN or absurd values, an undecodable reply; or the node refusing as
malformed inputs that other nodes accepted) puts that expert at that endpoint in quarantine for
``quarantine_time``, at once: a peer that lies is not retried in seconds. A node that says it does
not host the uid its record names is avoided for ``ban_max`` only: its record may merely be stale
(a node restarted with other experts on the same address).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc

from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import Dispatcher, is_misbehaviour
from dmoe.core.auth import load_key
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import DHTAuthorizer
from dmoe.core.records import ExpertRecord, find_under_prefixes_async

logger = logging.getLogger(__name__)


class Swarm:
    """Join with ``Swarm(SwarmConfig(initial_peers=[...]))``; use as a context manager or start()/shutdown().

    The client's DHT peer is an in-process :class:`dmoe.core.dht.DHTPeer` (why not a forked
    ``hivemind.DHT``: see that module). Expert calls (:class:`dmoe.client.dispatch.Dispatcher`) run on the
    peer's background event loop too.
    """

    def __init__(self, config: SwarmConfig):
        self.config = config
        self.key = load_key(config.swarm_key)
        self.peer = DHTPeer(initial_peers=config.initial_peers, host=config.host, event_loop=config.event_loop,
                            authorizer=DHTAuthorizer(self.key) if self.key else None)
        self.loop = self.peer.loop
        self._started = False
        self._lock = threading.Lock()
        self._prefix_cache: dict[str, tuple[float, dict[int, ExpertRecord]]] = {}  # "ffn.3." -> (at, records)
        self._failures: dict[str, tuple[int, float]] = {}  # endpoint -> (failures, banned until)
        self._quarantine: dict[tuple[str, str], float] = {}  # (endpoint, uid) -> avoided until
        self._dispatchers: list[Dispatcher] = []

    def dispatcher(self, compression: int) -> Dispatcher:
        """A Dispatcher on this swarm's loop; its channels are closed by shutdown()."""
        dispatcher = Dispatcher(self.loop, compression, key=self.key, max_reply_abs=self.config.max_reply_abs)
        self._dispatchers.append(dispatcher)
        return dispatcher

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the swarm's loop and wait for its result."""
        return self.peer.run(coroutine, timeout)

    def start(self, timeout: float = 60.0) -> Swarm:
        self.peer.start(timeout)
        self._started = True
        return self

    def shutdown(self) -> None:
        if not self._started:
            return
        for dispatcher in self._dispatchers:
            dispatcher.close()
        self.peer.shutdown()
        self._started = False

    def __enter__(self) -> Swarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def live_under(self, keys: Sequence[str], *, refresh: bool = False) -> dict[str, dict[int, ExpertRecord]]:
        """For each grid prefix key (``ffn.``, ``ffn.3.``): records by next coordinate, cached like
        ``cache_ttl``, all stale keys read in one DHT traversal. Banned endpoints are left out."""
        assert self.peer.node is not None, "call start() first"
        now = time.monotonic()
        with self._lock:
            stale = [k for k in keys if refresh or k not in self._prefix_cache
                     or now - self._prefix_cache[k][0] > self.config.cache_ttl]
        if stale:
            try:
                found = self.run(find_under_prefixes_async(self.peer.node, stale), self.config.lookup_timeout)
            except Exception as e:  # a slow or broken DHT must not stop a step: keep what was known
                logger.warning("expert lookup of %s failed (%s: %s); using the last known experts for %.0fs",
                               ", ".join(stale), type(e).__name__, e, self.config.cache_ttl)
                with self._lock:
                    found = {key: self._prefix_cache.get(key, (now, {}))[1] for key in stale}
            with self._lock:
                for key in stale:
                    self._prefix_cache[key] = (now, found.get(key, {}))
        with self._lock:
            return {key: {c: r for c, r in self._prefix_cache.get(key, (now, {}))[1].items()
                          if r.dial_endpoint and not self._banned(r.dial_endpoint, r.uid, now)} for key in keys}

    def _banned(self, endpoint: str, uid: str, now: float) -> bool:
        entry = self._failures.get(endpoint)
        if entry is not None and now < entry[1]:
            return True
        return now < self._quarantine.get((endpoint, uid), 0.0)

    def report(self, endpoint: str, uid: str, error: BaseException | None) -> None:
        """What became of one call: None for success, else the error (see dmoe.client.dispatch)."""
        if error is None:
            self.report_success(endpoint)
        elif is_misbehaviour(error):
            not_found = getattr(error, "code", None) is not None and callable(error.code) and \
                error.code() == grpc.StatusCode.NOT_FOUND
            self.quarantine(endpoint, uid, error, self.config.ban_max if not_found else None)
        else:
            self.report_failure(endpoint)

    def quarantine(self, endpoint: str, uid: str, why: BaseException | str, seconds: float | None = None) -> None:
        seconds = self.config.quarantine_time if seconds is None else seconds
        with self._lock:
            self._quarantine[(endpoint, uid)] = time.monotonic() + seconds
            if len(self._quarantine) > 100_000:  # forget the ones that ended
                now = time.monotonic()
                self._quarantine = {k: t for k, t in self._quarantine.items() if t > now}
        logger.warning("%s at %s misbehaved (%s); avoiding it for %.0fs", uid, endpoint, _describe(why), seconds)

    def quarantined(self, endpoint: str, uid: str) -> bool:
        with self._lock:
            return time.monotonic() < self._quarantine.get((endpoint, uid), 0.0)

    def report_failure(self, endpoint: str) -> None:
        now = time.monotonic()
        with self._lock:
            failures, until = self._failures.get(endpoint, (0, 0.0))
            if now < until:  # the other calls of the same outage (in flight when it began) do not add to the ban
                return
            failures += 1
            ban = min(self.config.ban_max, self.config.ban_base * 2 ** (failures - 1))
            self._failures[endpoint] = (failures, now + ban)
        logger.info("avoiding %s for %.1fs after %d failure(s)", endpoint, ban, failures)

    def report_success(self, endpoint: str) -> None:
        with self._lock:
            self._failures.pop(endpoint, None)



def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    details = getattr(error, "details", None)
    if callable(details):  # a grpc.RpcError
        return f"{error.code().name}: {details()}"
    return f"{type(error).__name__}: {error}"
