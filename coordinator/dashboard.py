"""Dashboard: the coordinator's HTTP server (aiohttp): the live page, its JSON API and /metrics.

- ``GET /``             the dashboard page (``static/dashboard.html``), which polls the API below
- ``GET /api/swarm``    the latest :class:`dmoe.view.swarmview.SwarmView` (nodes, experts, the replicas of
  each expert: versions, spread, experts held by a single node) plus the monitor's status
- ``GET /api/history``  throughput over time, per node and for the swarm
- ``GET /metrics``      Prometheus text format
- ``GET /healthz``      ``ok`` while the server runs

aiohttp because it serves from the asyncio loop the coordinator's DHT peer already runs, binds
port 0 and reports the port it got, with no second server process or thread.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dmoe.coordinator.monitor import SwarmMonitor
from dmoe.view.swarmview import json_safe

logger = logging.getLogger(__name__)
# browsers cannot parse NaN or Infinity: bodies go through json_safe first, and this fails loudly if not
_strict_dumps = functools.partial(json.dumps, allow_nan=False)


class Dashboard:
    def __init__(self, monitor: SwarmMonitor, registry: CollectorRegistry, info: dict[str, Any],
                 relay_stats: Callable[[], dict[str, Any]] | None = None):
        self.monitor, self.registry, self.info, self.relay_stats = monitor, registry, info, relay_stats
        self.url: str = ""
        self._runner: web.AppRunner | None = None
        self._page = resources.files("dmoe.coordinator").joinpath("static/dashboard.html").read_bytes()

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/", self._index), web.get("/api/swarm", self._swarm),
            web.get("/api/history", self._history), web.get("/metrics", self._metrics),
            web.get("/healthz", self._healthz),
        ])
        return app

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0: any free port); returns the URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]  # the port really bound, also for port 0
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/"
        logger.info("dashboard at %s (JSON at %sapi/swarm, Prometheus metrics at %smetrics)",
                    self.url, self.url, self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def _swarm(self, request: web.Request) -> web.Response:
        monitor = self.monitor
        body = {**monitor.view.model_dump(), "coordinator": self.info, "poll_interval": monitor.poll_interval,
                "num_polls": monitor.num_polls, "last_error": monitor.last_error,
                "relay": self.relay_stats() if self.relay_stats is not None else None}
        return web.json_response(json_safe(body), dumps=_strict_dumps)

    async def _history(self, request: web.Request) -> web.Response:
        return web.json_response(json_safe(self.monitor.history.to_json()), dumps=_strict_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")
