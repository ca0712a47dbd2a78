"""dmoe.coordinator: the swarm's bootstrap peer.

- ``config.py``     CoordinatorConfig: its options (CLI, TOML, DMOE_COORDINATOR_* environment)
- ``bootstrap.py``  Coordinator: a DHT peer with an optional persistent identity, so its address is stable
"""

from dmoe.coordinator.bootstrap import Coordinator
from dmoe.coordinator.config import CoordinatorConfig

__all__ = ["Coordinator", "CoordinatorConfig"]
