"""CoordinatorConfig: every setting of a coordinator, as CLI option, TOML key and DMOE_COORDINATOR_*
variable; the swarm it joins or starts is a nested SwarmConfig."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dmoe.client.config import SwarmConfig
from dmoe.config import check_nested, nested, option
from dmoe.core.addresses import check_announce_maddrs, parse_port_range
from dmoe.core.modelspec import ModelSpec
from dmoe.errors import ConfigError
from dmoe.relay.limits import RelayLimits

_RELAY = RelayLimits()  # the relay's defaults, declared once there


@dataclasses.dataclass(kw_only=True, slots=True)
class CoordinatorConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_COORDINATOR_"

    # where the DHT peer and the relay listen, and the swarm to join (no --swarm: this peer starts it);
    # option name -> SwarmConfig field
    swarm: SwarmConfig = nested(SwarmConfig, {"host": "host", "swarm": "initial_peers",
                                              "swarm_key": "swarm_key"})
    dht_port: int = option(0, "DHT (libp2p) port; fix it (and --identity) for an address that survives "
                              "restarts")
    identity: str | None = option(None, "file with the peer's private key (created if missing): a stable "
                                        "peer id")
    dht_announce: list[str] = option([], "multiaddr others dial for this peer, behind a NAT or in a "
                                         "container (repeat), e.g. /dns4/coordinator/tcp/31337")
    http_host: str = option("127.0.0.1", "address the dashboard, JSON API and /metrics listen on")
    http_port: int = option(0, "dashboard port (0: any free port, printed at start)")
    poll_interval: float = option(5.0, "seconds between two reads of the nodes' DHT records")
    history: int = option(360, "views kept for the throughput plots (360 x 5 s = 30 minutes)")
    offer_relay: bool = option(True, "run a relay for nodes that cannot be dialled (behind a NAT), "
                                     "announced in the swarm")
    relay_port: int = option(0, "port of the relay (0: any free port)")
    relay_announce_host: str | None = option(None, "host nodes dial for the relay (default: --host)")
    relay_public_ports: str | None = option(None, "ports the relay opens for the nodes it serves, e.g. "
                                                  "40000-40999, for a firewall (default: any free port)")
    relay_max_nodes: int = option(_RELAY.max_nodes, "nodes the relay serves at once")
    relay_max_nodes_per_ip: int = option(_RELAY.max_nodes_per_ip, "nodes the relay serves from one IP "
                                                                  "address (IPv6: one /64)")
    relay_idle_timeout: float = option(_RELAY.idle_timeout, "seconds a connection through the relay may "
                                                            "carry no byte before the relay closes it")
    relay_record_grace: float = option(_RELAY.record_grace, "seconds a node registered with the relay has "
                                                            "to announce a node record naming its relayed "
                                                            "port, or it is dropped (0: no check)")
    relay_rate_mbit: float = option(_RELAY.rate_mbit, "Mbit/s the relay forwards per node, both directions "
                                                      "together (0: no limit)")
    ready_file: str | None = option(None, "write a JSON file with the swarm address and dashboard URL once "
                                          "up")
    model: str | None = option(None, "TOML file of a model spec to publish in the swarm, re-stored while "
                                     "the coordinator runs: nodes started with --model NAME build its "
                                     "experts (format: README.md, 'The model spec')")

    def __post_init__(self) -> None:
        check_nested(self)
        for name in ("dht_port", "http_port", "relay_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        check_announce_maddrs("dht_announce", self.dht_announce)
        if self.poll_interval <= 0:
            raise ConfigError(f"poll_interval must be > 0, got {self.poll_interval}")
        self.relay_limits()  # rejects bad values
        if self.relay_public_ports is not None:
            try:
                parse_port_range(self.relay_public_ports)
            except ValueError as e:
                raise ConfigError(f"relay_public_ports: {e}") from None
        if self.offer_relay and self.swarm.host in ("0.0.0.0", "::") and not self.relay_announce_host:
            raise ConfigError(f"a relay listening on {self.swarm.host} needs --relay-announce-host, the "
                              "address nodes dial")
        if self.history < 2:
            raise ConfigError(f"history must be at least 2 views, got {self.history}")
        if self.model is not None:
            try:
                ModelSpec.from_toml(self.model)
            except ValueError as e:
                raise ConfigError(f"model: {e}") from None

    def relay_limits(self) -> RelayLimits:
        return RelayLimits(max_nodes=self.relay_max_nodes, max_nodes_per_ip=self.relay_max_nodes_per_ip,
                           rate_mbit=self.relay_rate_mbit, idle_timeout=self.relay_idle_timeout,
                           record_grace=self.relay_record_grace)
