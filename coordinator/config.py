"""CoordinatorConfig: every setting of a coordinator, as CLI option, TOML key and DMOE_COORDINATOR_* variable."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dmoe.config import option
from dmoe.errors import ConfigError


@dataclasses.dataclass(kw_only=True, slots=True)
class CoordinatorConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_COORDINATOR_"

    host: str = option("127.0.0.1", "address the DHT peer listens on")
    dht_port: int = option(0, "DHT (libp2p) port; fix it (and --identity) for an address that survives restarts")
    identity: str | None = option(None, "file with the peer's private key (created if missing): a stable peer id")
    swarm: list[str] = option([], "other swarm peers to join (repeat); none: this peer starts the swarm")
    ready_file: str | None = option(None, "write a JSON file with the swarm address once up")

    def __post_init__(self) -> None:
        if not 0 <= self.dht_port <= 65535:
            raise ConfigError(f"dht_port must be in 0..65535, got {self.dht_port}")
