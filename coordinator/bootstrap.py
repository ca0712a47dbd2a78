"""Coordinator: the swarm's well-known first peer and its monitor. It holds no experts and nothing
depends on it after joining: nodes and clients may join through any peer and keep working without it.

It runs a DHT peer (a stable address with ``--identity`` and ``--dht-port``), a
:class:`~dmoe.coordinator.monitor.SwarmMonitor` that reads the nodes' records, and the
:class:`~dmoe.coordinator.dashboard.Dashboard` HTTP server, all on the DHT peer's event loop; and,
unless ``--no-offer-relay``, a :class:`~dmoe.relay.server.Relay` (on a thread of its own) for nodes that
cannot be dialled, announced in the DHT.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from dmoe.coordinator.config import CoordinatorConfig
from dmoe.coordinator.dashboard import Dashboard
from dmoe.coordinator.metrics import make_registry
from dmoe.coordinator.monitor import SwarmMonitor
from dmoe.core.addresses import parse_port_range
from dmoe.core.auth import load_key
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import dht_authorizer
from dmoe.core.files import write_json_atomic
from dmoe.core.modelspec import ModelSpec, SpecPublisher
from dmoe.relay.server import Relay

logger = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.dht: DHTPeer | None = None
        self.monitor: SwarmMonitor | None = None
        self.dashboard: Dashboard | None = None
        self.swarm_addresses: list[str] = []
        self.join_address: str = ""  # the address to hand out (not loopback, if there is one)
        self.peer_id: str = ""
        self.dashboard_url: str = ""
        self.relay: Relay | None = None  # serves nodes that cannot be dialled (--offer-relay, on by default)
        self.spec_publisher: SpecPublisher | None = None  # re-stores the --model spec

    def start(self) -> Coordinator:
        config, swarm = self.config, self.config.swarm
        try:
            self.dht = DHTPeer(
                initial_peers=swarm.initial_peers, host=swarm.host, port=config.dht_port,
                identity_path=config.identity, announce_maddrs=config.dht_announce,
                authorizer=dht_authorizer(swarm.swarm_key),
            ).start()
            self.swarm_addresses = list(self.dht.visible_maddrs)
            self.join_address, self.peer_id = self.dht.join_address, self.dht.peer_id
            logger.info("coordinator up as %s", self.dht.peer_id)
            if config.offer_relay:
                limits = config.relay_limits()
                self.relay = Relay(host=swarm.host, port=config.relay_port,
                                   announce_host=config.relay_announce_host, key=load_key(swarm.swarm_key),
                                   limits=limits, public_ports=parse_port_range(config.relay_public_ports)
                                   if config.relay_public_ports else None)
                self.relay.start()
                self.relay.announce(self.dht, self.peer_id)
            if config.model is not None:
                self.spec_publisher = SpecPublisher(self.dht, ModelSpec.from_toml(config.model)).start()
            self.monitor = SwarmMonitor(self.dht, poll_interval=config.poll_interval, history=config.history)
            info = {"peer_id": self.dht.peer_id, "swarm": self.swarm_addresses, "join": self.join_address}
            relay_stats = self.relay.stats if self.relay is not None else None
            registry = make_registry(self.monitor, relay_stats)
            self.dashboard = Dashboard(self.monitor, registry, info, relay_stats)
            self.dashboard_url = self.dht.run(self._start_serving(), 60)
        except BaseException:
            self.shutdown()
            raise
        if config.ready_file:
            write_json_atomic(config.ready_file, {"swarm": self.swarm_addresses, "join": self.join_address,
                                                  "peer_id": self.peer_id, "dashboard": self.dashboard_url,
                                                  "relay": self.relay.address if self.relay else "",
                                                  "pid": os.getpid()})
        return self

    async def _start_serving(self) -> str:
        assert self.monitor is not None and self.dashboard is not None
        self.monitor.start()
        return await self.dashboard.start(self.config.http_host, self.config.http_port)

    async def _stop_serving(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.monitor is not None:
            await self.monitor.stop()

    def shutdown(self) -> None:
        if self.spec_publisher is not None:
            self.spec_publisher.stop()
            self.spec_publisher = None
        if self.relay is not None:
            self.relay.shutdown()
            self.relay = None
        if self.dht is not None:
            try:
                self.dht.run(self._stop_serving(), 30)
            finally:
                self.dht.shutdown()
                self.dht = None
            logger.info("coordinator stopped")

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        self.shutdown()
