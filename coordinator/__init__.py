"""dmoe.coordinator: the swarm's bootstrap peer, its monitor and dashboard.

- ``config.py``     CoordinatorConfig: its options (CLI, TOML, DMOE_COORDINATOR_* environment)
- ``bootstrap.py``  Coordinator: a DHT peer with an optional persistent identity (a stable address),
                    running the monitor and the dashboard
- ``monitor.py``    SwarmMonitor: reads the nodes' DHT records every few seconds; view, history, join/leave logs
- ``dashboard.py``  Dashboard: the HTTP server (aiohttp): live page, JSON API, /metrics
- ``metrics.py``    SwarmCollector: Prometheus metrics from the monitor's latest view
- ``static/``       the dashboard page (HTML + JavaScript, no external assets)
"""

from dmoe.coordinator.bootstrap import Coordinator
from dmoe.coordinator.config import CoordinatorConfig

__all__ = ["Coordinator", "CoordinatorConfig"]
