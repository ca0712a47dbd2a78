"""Swarm: a client's view of the swarm: a DHT peer, a cache of live experts, and endpoint back-off.

Lookups of live experts are cached for ``cache_ttl`` seconds, so a training step does not wait on
the DHT when nothing changed. An endpoint that fails is banned for a capped, exponentially growing
time (``ban_base`` x 2^(failures-1), at most ``ban_max``), then tried again; one success clears it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

import hivemind

from dmoe.config import option
from dmoe.errors import ConfigError
from dmoe.local import listen_maddr
from dmoe.records import ExpertRecord, find_experts

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True, slots=True)
class SwarmConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_SWARM_"

    initial_peers: list[str] = option([], "multiaddrs of swarm peers to join (any live peer will do)")
    host: str = option("127.0.0.1", "address this client's DHT peer listens on")
    cache_ttl: float = option(5.0, "seconds a lookup of live experts is reused")
    ban_base: float = option(1.0, "seconds a failing endpoint is avoided after its first failure")
    ban_max: float = option(60.0, "longest time a failing endpoint is avoided")

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError("no swarm address: give the address a coordinator or node printed")
        if self.cache_ttl < 0 or self.ban_base <= 0 or self.ban_max < self.ban_base:
            raise ConfigError("need cache_ttl >= 0 and 0 < ban_base <= ban_max")


class Swarm:
    """Join with ``Swarm(SwarmConfig(initial_peers=[...]))``; use as a context manager or start()/shutdown()."""

    def __init__(self, config: SwarmConfig):
        self.config = config
        self.dht: hivemind.DHT | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, ExpertRecord | None]] = {}  # uid -> (looked up at, record)
        self._failures: dict[str, tuple[int, float]] = {}  # endpoint -> (failures, banned until)

    def start(self) -> Swarm:
        self.dht = hivemind.DHT(initial_peers=self.config.initial_peers, start=True,
                                host_maddrs=[listen_maddr(self.config.host, 0)])
        return self

    def shutdown(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def __enter__(self) -> Swarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def live_experts(self, uids: Sequence[str], *, refresh: bool = False) -> dict[str, ExpertRecord]:
        """Records of the uids that are announced and whose endpoint is not banned right now."""
        assert self.dht is not None, "call start() first"
        now = time.monotonic()
        with self._lock:
            stale = [u for u in uids if refresh or u not in self._cache or now - self._cache[u][0] > self.config.cache_ttl]
        if stale:
            found = find_experts(self.dht, stale)
            with self._lock:
                for uid in stale:
                    self._cache[uid] = (now, found.get(uid))
        with self._lock:
            records = {u: self._cache[u][1] for u in uids}
            return {u: r for u, r in records.items() if r is not None and not self._banned(r.endpoint, now)}

    def _banned(self, endpoint: str, now: float) -> bool:
        entry = self._failures.get(endpoint)
        return entry is not None and now < entry[1]

    def report_failure(self, endpoint: str) -> None:
        with self._lock:
            failures = self._failures.get(endpoint, (0, 0.0))[0] + 1
            ban = min(self.config.ban_max, self.config.ban_base * 2 ** (failures - 1))
            self._failures[endpoint] = (failures, time.monotonic() + ban)
        logger.info("avoiding %s for %.1fs after %d failure(s)", endpoint, ban, failures)

    def report_success(self, endpoint: str) -> None:
        with self._lock:
            self._failures.pop(endpoint, None)
