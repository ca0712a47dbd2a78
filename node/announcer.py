"""Announcer: keeps a node's expert and node records alive in the DHT (heartbeat), and withdraws them.

Each beat stores every expert record, its grid-prefix entries and the node record with an
expiration ``record_ttl`` seconds ahead (below ``MAX_RECORD_TTL``, the most the DHT accepts), each
under a subkey of the DHT peer's owner key and signed by it (:mod:`dmoe.core.records`). ``withdraw()``
(and ``retire()``, for experts the node stops hosting while it runs) replaces them by tombstones, the
owner's own signed records, that expire a little after any record a beat may have stored, since the DHT
keeps the value that expires last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hivemind.utils import get_dht_time

from dmoe.core.dht import DHTPeer
from dmoe.core.owner import MAX_RECORD_TTL
from dmoe.core.records import ExpertRecord, NodeRecord, store_announcement_async, store_retirement_async

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: DHTPeer,
        make_records: Callable[[], tuple[list[ExpertRecord], NodeRecord]],
        *,
        heartbeat_interval: float,
        record_ttl: float,
    ):
        if not 0 < record_ttl < MAX_RECORD_TTL:
            raise ValueError(f"record_ttl must be positive and below {MAX_RECORD_TTL:.0f}s, got {record_ttl}")
        self.dht, self.make_records = dht, make_records
        self.heartbeat_interval, self.record_ttl = heartbeat_interval, record_ttl
        self.last_expiration = 0.0
        self.num_beats = 0
        self._task: asyncio.Task | None = None

    async def beat(self) -> int:
        experts, node = self.make_records()
        expiration = get_dht_time() + self.record_ttl
        stored = await self._store(experts, node, expiration)
        self.last_expiration = max(self.last_expiration, expiration)
        self.num_beats += 1
        if stored == 0:
            logger.warning("no DHT peer accepted this node's records; will retry in %.0fs",
                           self.heartbeat_interval)
        return stored

    async def _store(self, experts: list[ExpertRecord], node: NodeRecord, expiration: float) -> int:
        assert self.dht.node is not None
        return await self.dht.run_async(store_announcement_async(self.dht.node, experts, node, expiration))

    async def start(self) -> None:
        """Announce once (so that the node is visible when start returns), then keep beating."""
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="dmoe-announcer")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.beat()
            except Exception:
                logger.exception("DHT heartbeat failed; will retry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def retire(self, retired: list[ExpertRecord]) -> None:
        """Withdraw the records of experts no longer hosted (tombstones, as :meth:`withdraw` stores), then
        beat: the node record lists the experts hosted now."""
        experts, node = self.make_records()
        tombstones = [r.model_copy(update={"state": "stopped"}) for r in retired]
        expiration = max(self.last_expiration, get_dht_time() + self.record_ttl) + 1.0
        assert self.dht.node is not None
        stored = await self.dht.run_async(store_retirement_async(self.dht.node, tombstones, experts, node,
                                                                 expiration))
        if not stored:
            logger.warning("no DHT peer accepted the withdrawal of %s: its records expire in %.0fs",
                           ", ".join(r.uid for r in retired), self.record_ttl)
        await self.beat()

    async def withdraw(self) -> None:
        """Stop beating and overwrite the records with tombstones."""
        await self.stop()
        experts, node = self.make_records()
        experts = [r.model_copy(update={"state": "stopped"}) for r in experts]
        node = node.model_copy(update={"state": "stopped"})
        # a beat cancelled mid-store may still land with now + ttl: outlast it
        expiration = max(self.last_expiration, get_dht_time() + self.record_ttl) + 1.0
        await self._store(experts, node, expiration)
