"""Coordinator: the swarm's well-known first peer. It holds no experts and nothing depends on it
after joining: nodes and clients may join through any peer and keep working without it."""

from __future__ import annotations

import logging
import os
import signal
import threading

from dmoe.coordinator.config import CoordinatorConfig
from dmoe.local import write_json_atomic
from dmoe.peer import DHTPeer

logger = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.dht: DHTPeer | None = None
        self.swarm_addresses: list[str] = []

    def start(self) -> Coordinator:
        self.dht = DHTPeer(
            initial_peers=self.config.swarm, host=self.config.host, port=self.config.dht_port,
            identity_path=self.config.identity,
        ).start()
        self.swarm_addresses = list(self.dht.visible_maddrs)
        logger.info("coordinator up as %s", self.dht.peer_id)
        if self.config.ready_file:
            write_json_atomic(self.config.ready_file, {"swarm": self.swarm_addresses, "pid": os.getpid()})
        return self

    def shutdown(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

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
