"""StatusConfig: the options of ``dmoe swarm status`` (the swarm to read, a nested SwarmConfig).
Apart from :mod:`dmoe.view.status` so the CLI builds its options without importing hivemind."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dmoe.client.config import SwarmConfig
from dmoe.config import check_nested, nested, option
from dmoe.errors import ConfigError


@dataclasses.dataclass(kw_only=True, slots=True)
class StatusConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_STATUS_"

    # the swarm to read (this command's short-lived DHT peer): option name -> SwarmConfig field
    swarm: SwarmConfig = nested(SwarmConfig, {"swarm": "initial_peers", "swarm_key": "swarm_key",
                                              "host": "host"})
    json: bool = option(False, "print the view as JSON (for scripts) instead of tables")
    experts: bool = option(False, "also list every expert (one row per uid: replicas, versions, spread)")
    wait_nodes: int = option(0, "wait until at least this many nodes are seen (up to --timeout)")
    timeout: float = option(30.0, "seconds to join the swarm and to wait for --wait-nodes")

    def __post_init__(self) -> None:
        check_nested(self)
        self.swarm.require_peers("give --swarm with the address a coordinator or node printed")
        if self.timeout <= 0 or self.wait_nodes < 0:
            raise ConfigError("need --timeout > 0 and --wait-nodes >= 0")
