"""RelayLimits: what one relay serves at most, and the timers of its protocol (its limits per IP count
under :func:`dmoe.core.addresses.address_group`). Plain values (no sockets, no hivemind), so the
coordinator's options take their defaults from here.
"""

from __future__ import annotations

import dataclasses

from dmoe.errors import ConfigError

PING_INTERVAL = 10.0  # seconds between a node's pings on its control channel
PROBE_REPLY_TIMEOUT = 10.0  # seconds a node waits for a relay's verdict on its probe (dial + Info call)


@dataclasses.dataclass(kw_only=True, slots=True)
class RelayLimits:
    max_nodes: int = 256  # nodes registered at once
    max_nodes_per_ip: int = 16  # nodes registered from one IP (a household behind one NAT)
    max_connections_per_node: int = 64  # client connections spliced to one node
    max_connections_per_client: int = 16  # client connections from one IP, all nodes together
    max_control_connections_per_ip: int = 64  # connections from one IP on the relay's own port
    rate_mbit: float = 0.0  # bytes forwarded per node, both directions together (0: no limit)
    first_line_timeout: float = 5.0  # seconds a new connection on the relay's port has to say what it wants
    attach_timeout: float = 10.0  # seconds a client connection waits for its node to attach
    probes_per_minute: float = 30.0  # probes one IP may ask for
    probe_timeout: float = 3.0  # seconds a probe's dial may take
    probe_call_timeout: float = 5.0  # seconds the Info call that checks who answers may take
    control_timeout: float = 3 * PING_INTERVAL  # a control channel silent this long is dropped
    # a spliced client connection with no byte either way for this long is closed (both ends). Far
    # above any call's deadline and a node's --receive-timeout (60 s), so no call in progress is cut;
    # gRPC channels send nothing between calls, and a channel cut while idle dials again at its next call
    idle_timeout: float = 300.0
    # seconds a registered node has to announce a node record that names its port on this relay; a
    # registration no record backs then is dropped (0: no check). Checked only by a relay that reads
    # the swarm's DHT (one announced in it): Relay.watch_records
    record_grace: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_nodes_per_ip", "max_connections_per_node",
                     "max_connections_per_client", "max_control_connections_per_ip", "first_line_timeout",
                     "attach_timeout",
                     "probes_per_minute", "probe_timeout", "probe_call_timeout", "control_timeout",
                     "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"relay {name} must be > 0, got {getattr(self, name)}")
        for name in ("rate_mbit", "record_grace"):
            if getattr(self, name) < 0:
                raise ConfigError(f"relay {name} must be >= 0, got {getattr(self, name)}")
        if self.probe_timeout + self.probe_call_timeout >= PROBE_REPLY_TIMEOUT:
            raise ConfigError(f"relay probe_timeout + probe_call_timeout must stay under the "
                              f"{PROBE_REPLY_TIMEOUT:g} s a node waits for the verdict")
        if self.control_timeout <= PING_INTERVAL:
            raise ConfigError(f"relay control_timeout must be longer than the ping interval "
                              f"({PING_INTERVAL:g} s)")

