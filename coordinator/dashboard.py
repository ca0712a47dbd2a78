"""Dashboard: the coordinator's HTTP server (aiohttp): the live page, its JSON API and /metrics.

- ``GET /``             the dashboard page (``static/dashboard.html``), which polls the API below
- ``GET /api/swarm``    the latest :class:`dmoe.view.swarmview.SwarmView` (nodes, experts, the replicas of
  each expert: versions, spread, experts held by a single node) plus the monitor's status
- ``GET /api/demand``   demand and coverage per expert of each trainers' grid (:func:`demand_json`), for
  the heatmap; the same numbers as ``dmoe swarm status --experts``
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
import math
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dmoe.coordinator.monitor import SwarmMonitor
from dmoe.core.demand import uid_of
from dmoe.view.swarmview import ExpertCoverage, SwarmView, json_safe

logger = logging.getLogger(__name__)
# browsers cannot parse NaN or Infinity: bodies go through json_safe first, and this fails loudly if not
_strict_dumps = functools.partial(json.dumps, allow_nan=False)
MAX_CELLS = 16384  # experts of one grid /api/demand lists (a 128 x 128 grid); the rest are only counted


def _expert(uid: str, c: ExpertCoverage | None) -> dict[str, Any]:
    """One expert's demand and coverage; ``ratio`` is None for demand that no replica serves (infinite)."""
    if c is None:  # the view lists every uid of its grids; an expert missing from it has nothing
        return {"uid": uid, "demand": 0.0, "throughput": 0.0, "replicas": 0, "ratio": 0.0, "uncovered": True}
    return {"uid": uid, "demand": c.demand, "throughput": c.throughput, "replicas": c.num_replicas,
            "ratio": c.ratio, "uncovered": c.num_replicas == 0}


def _in_grid(uid: str, prefix: str, shape: list[int]) -> bool:
    prefix_of, *coords = uid.split(".")
    return (prefix_of == prefix and len(coords) == len(shape)
            and all(c.isdigit() and int(c) < size for c, size in zip(coords, shape)))


def demand_json(view: SwarmView) -> dict[str, Any]:
    """Demand and coverage per expert, from the view (:func:`dmoe.view.swarmview.summarize`, which
    computes them with :func:`dmoe.core.demand.coverage`): per trainers' grid (by prefix) its ``shape``
    and its ``experts`` in flat row-major order (the first ``MAX_CELLS``), each with its ``demand`` and
    ``throughput`` (routed tokens/s), ``replicas``, ``ratio`` (demand / throughput; null for demand and
    no replica) and ``uncovered`` (no replica); the uids with no replica; and ``outside``: hosted experts
    in no trainer's grid. Numbers may still be infinite here: the server passes it through json_safe."""
    covered = {c.uid: c for c in view.coverage}
    grids = []
    for prefix, shape in sorted(view.grids.items()):
        size = math.prod(shape)
        experts = [_expert(uid, covered.get(uid))
                   for uid in (uid_of(prefix, shape, i) for i in range(min(size, MAX_CELLS)))]
        mine = [c for c in view.coverage if _in_grid(c.uid, prefix, shape)]
        ratios = [c.ratio for c in mine if c.ratio is not None]
        grids.append({
            "prefix": prefix, "shape": list(shape), "num_experts": size, "experts": experts,
            "truncated": size > MAX_CELLS, "demand": sum(c.demand for c in mine),
            "throughput": sum(c.throughput for c in mine), "max_ratio": max(ratios, default=0.0),
            "num_unserved": sum(c.ratio is None for c in mine),  # demand and no replica
            "no_replica": [uid for uid in view.no_replica if _in_grid(uid, prefix, shape)],
        })
    outside = [_expert(c.uid, c) for c in view.coverage
               if not any(_in_grid(c.uid, prefix, shape) for prefix, shape in view.grids.items())]
    return {"at": view.at, "num_trainers": view.num_trainers, "demand": sum(c.demand for c in view.coverage),
            "grids": grids, "no_replica": list(view.no_replica), "outside": outside[:MAX_CELLS]}


class Dashboard:
    def __init__(self, monitor: SwarmMonitor, registry: CollectorRegistry, info: dict[str, Any],
                 relay_stats: Callable[[], dict[str, Any]] | None = None):
        self.monitor, self.registry, self.info, self.relay_stats = monitor, registry, info, relay_stats
        self.url: str = ""
        self._runner: web.AppRunner | None = None
        self._page = resources.files("dmoe.coordinator").joinpath("static/dashboard.html").read_bytes()
        self._demand: tuple[SwarmView, bytes] | None = None  # the last view and its /api/demand body

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/", self._index), web.get("/api/swarm", self._swarm),
            web.get("/api/demand", self._demand_api), web.get("/api/history", self._history),
            web.get("/metrics", self._metrics),
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

    async def _demand_api(self, request: web.Request) -> web.Response:
        view = self.monitor.view
        if self._demand is None or self._demand[0] is not view:  # a new view since the last request
            self._demand = (view, _strict_dumps(json_safe(demand_json(view))).encode())
        return web.Response(body=self._demand[1], content_type="application/json")

    async def _history(self, request: web.Request) -> web.Response:
        return web.json_response(json_safe(self.monitor.history.to_json()), dumps=_strict_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")
