"""Announcer: keeps a node's expert and node records alive in the DHT (heartbeat), and withdraws them.

Each beat stores every expert record, its grid-prefix entries and the node record with an
expiration ``record_ttl`` seconds ahead (below ``MAX_RECORD_TTL``, the most the DHT accepts), each
under a subkey of the DHT peer's owner key and signed by it (:mod:`dmoe.core.records`). ``withdraw()``
(and ``retire()``, for experts the node stops hosting while it runs) replaces them by tombstones, the
owner's own signed records, that expire a little after any record a beat may have stored, since the DHT
keeps the value that expires last.

A beat stores each record on the DHT peers nearest its key at that moment. A peer that joins later and is
among the nearest holds none of them until the next beat, and a lookup that reads only the few peers
nearest a key (``SwarmConfig.lookup_breadth``) would miss them. So the announcer looks at its DHT peer's
routing table every ``join_look`` seconds and beats early when a peer it did not know has joined, at
most once every quarter of the heartbeat interval (a swarm where peers join all the time costs at most
four extra beats per interval).
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

JOIN_LOOK = 1.0  # seconds between looks at the DHT peer's routing table for peers that joined


class Announcer:
    def __init__(
        self,
        dht: DHTPeer,
        make_records: Callable[[], tuple[list[ExpertRecord], NodeRecord]],
        *,
        heartbeat_interval: float,
        record_ttl: float,
        join_look: float = JOIN_LOOK,
    ):
        if not 0 < record_ttl < MAX_RECORD_TTL:
            raise ValueError(f"record_ttl must be positive and below {MAX_RECORD_TTL:.0f}s, got {record_ttl}")
        self.dht, self.make_records = dht, make_records
        self.heartbeat_interval, self.record_ttl = heartbeat_interval, record_ttl
        self.join_look = min(join_look, heartbeat_interval)
        self.last_expiration = 0.0
        self.num_beats = 0
        self.num_early_beats = 0  # of num_beats: beaten early, for peers that joined
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
        known = await self._peers()
        await self.beat()
        self._task = asyncio.create_task(self._loop(known), name="dmoe-announcer")

    async def _peers(self) -> frozenset:
        """The DHT ids in the peer's routing table (read on the peer's own loop, where it changes)."""
        async def read() -> frozenset:
            assert self.dht.node is not None
            return frozenset(self.dht.node.protocol.routing_table.uid_to_peer_id)
        return await self.dht.run_async(read())

    async def _loop(self, known: frozenset) -> None:
        """Beat every heartbeat interval, and early when peers not in ``known`` (the routing table at
        the last beat) have joined. A failed look at the routing table only means no early beat."""
        clock = asyncio.get_running_loop().time
        last = clock()  # of the last beat (or failed one)
        while True:
            await asyncio.sleep(max(0.0, min(self.join_look, last + self.heartbeat_interval - clock())))
            try:
                peers = await self._peers()
            except Exception as e:
                peers = known
                logger.debug("could not read the DHT routing table (%s: %s)", type(e).__name__, e)
            now = clock()
            early = not peers <= known and now >= last + self.heartbeat_interval / 4
            if now < last + self.heartbeat_interval and not early:
                continue
            if early and now < last + self.heartbeat_interval:
                self.num_early_beats += 1
                logger.debug("%d DHT peers joined: beating early", len(peers - known))
            known, last = peers, now
            try:
                await self.beat()
            except Exception:
                logger.exception("DHT heartbeat failed; will retry in %.0fs", self.heartbeat_interval)

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
