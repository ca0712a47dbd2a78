"""SwarmMonitor: reads the nodes' DHT records every few seconds, with the trainers' demand for the
experts (:mod:`dmoe.core.demand`) of the prefixes the nodes host and the published model specs name,
keeps the latest view of the swarm (coverage included) and its throughput history, and logs nodes
joining and leaving."""

from __future__ import annotations

import asyncio
import logging
import time

from dmoe.core.demand import find_demand_async
from dmoe.core.dht import DHTPeer
from dmoe.core.logsafe import printable
from dmoe.core.modelspec import find_specs_async
from dmoe.core.records import find_nodes_async
from dmoe.view.swarmview import SwarmView, ThroughputHistory, summarize

logger = logging.getLogger(__name__)


class SwarmMonitor:
    def __init__(self, peer: DHTPeer, *, poll_interval: float, history: int):
        self.peer, self.poll_interval = peer, poll_interval
        self.view: SwarmView = summarize({})
        self.history = ThroughputHistory(history)
        self.num_polls = 0
        self.last_error: str = ""
        self._task: asyncio.Task | None = None

    async def poll(self) -> SwarmView:
        """Read the records once (on the peer's loop) and update the view and history."""
        node = self.peer.node
        assert node is not None
        records, specs = await asyncio.gather(find_nodes_async(node), find_specs_async(node))
        # demand for what the nodes host, and for the grids of the models (which may have no node at all)
        prefixes = {uid.split(".")[0] for record in records.values() for uid in record.experts}
        prefixes.update(grid.prefix for spec in specs.values() for grid in spec.experts)
        demand = await find_demand_async(node, sorted(prefixes))
        view = summarize(records, time.time(), demand)
        self._log_changes(self.view, view)
        self.view = view
        self.history.add(view)
        self.num_polls += 1
        return view

    def _log_changes(self, old: SwarmView, new: SwarmView) -> None:
        before = {n.node_id: n for n in old.nodes}
        after = {n.node_id: n for n in new.nodes}
        for node_id in after.keys() - before.keys():
            n = after[node_id]
            logger.info("node joined: %s at %s, %d experts (%s) on %s", printable(node_id),
                        printable(n.endpoint), n.num_experts, printable(", ".join(n.expert_prefixes)),
                        printable(n.device))
        for node_id in before.keys() - after.keys():
            logger.info("node gone: %s at %s (its records were withdrawn or expired)", printable(node_id),
                        printable(before[node_id].endpoint))
        for node_id in after.keys() & before.keys():
            if after[node_id].started_at != before[node_id].started_at:
                logger.info("node restarted: %s at %s", printable(node_id),
                            printable(after[node_id].endpoint))
            new_failures = after[node_id].errors - before[node_id].errors
            if new_failures > 0:
                logger.info("node %s failed %d calls since the last view", printable(node_id), new_failures)
        if new.no_replica != old.no_replica and (new.no_replica or old.no_replica):
            shown = ", ".join(new.no_replica[:8]) + (", ..." if len(new.no_replica) > 8 else "")
            logger.info("%d expert(s) of the trainers' grids have no replica%s", len(new.no_replica),
                        printable(f": {shown}" if shown else ""))

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
                self.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the DHT may be unreachable for a while; keep the last view
                self.last_error = f"{type(e).__name__}: {e}"
                logger.warning("could not read the swarm's records: %s", printable(self.last_error))
            await asyncio.sleep(self.poll_interval)

    def start(self) -> None:
        """Start polling on the running loop (the peer's)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dmoe-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
