"""dmoe.coordinator: the swarm's bootstrap peer, its monitor and dashboard.

- ``config.py``     CoordinatorConfig: its options (CLI, TOML, DMOE_COORDINATOR_* environment)
- ``bootstrap.py``  Coordinator: a DHT peer with an optional persistent identity (a stable address),
                    running the monitor and the dashboard
- ``monitor.py``    SwarmMonitor: reads the nodes' DHT records every few seconds; view, history,
                    join/leave logs
- ``dashboard.py``  Dashboard: the HTTP server (aiohttp): live page, JSON API, /metrics
- ``metrics.py``    SwarmCollector: Prometheus metrics from the monitor's latest view
- ``static/``       the dashboard page (HTML + JavaScript, no external assets)
"""

from __future__ import annotations

import importlib
from typing import Any

# imported on first use, so that the CLI can read a config without starting torch or hivemind
_LAZY = {
    "Coordinator": "dmoe.coordinator.bootstrap",
    "CoordinatorConfig": "dmoe.coordinator.config",
}

__all__ = ["Coordinator", "CoordinatorConfig"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
