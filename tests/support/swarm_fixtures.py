"""Fixtures that start real nodes (``python -m dmoe node start``) and DHT peers on 127.0.0.1.

Addresses come from the node's ready file, never from its logs. Every process is killed in
teardown, with its whole process group (the node's DHT peer and libp2p daemon included).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dmoe.core.dht import DHTPeer
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.testing.process import wait_until

HERE = Path(__file__).parent
START_TIMEOUT = 60.0


wait_for = wait_until  # (the name these tests use)


class NodeProcess:
    """A node started through the CLI, in its own process group."""

    def __init__(self, workdir: Path, args: list[str], name: str = "node"):
        self.workdir, self.args, self.name = workdir, args, name
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmoe", "node", "start", "--host", "127.0.0.1", "--port", "0",
                "--device", "cpu", "--ready-file", str(self.ready_file), *self.args]

    def start(self) -> NodeProcess:
        self.ready_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return self.ready_file.exists()

        wait_for(ready, START_TIMEOUT, f"{self.name} to start")
        self.ready = json.loads(self.ready_file.read_text())
        return self

    @property
    def endpoint(self) -> str:
        return self.ready["endpoint"]

    @property
    def swarm(self) -> list[str]:
        return self.ready["swarm"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM to the node alone (as an init system would), then wait for its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def terminate_group(self, timeout: float = 60.0) -> int:
        """SIGTERM to the whole process group (as systemd or docker stop do), then the exit code."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9 of the whole process group: the machine is gone."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.kill()
        if getattr(self, "_log", None):
            self._log.close()


class CoordinatorProcess(NodeProcess):
    """``dmoe coordinator start`` in its own process group; ``ready`` has its swarm and dashboard URL."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dmoe", "coordinator", "start", "--host", "127.0.0.1",
                "--ready-file", str(self.ready_file), *self.args]

    @property
    def dashboard(self) -> str:
        return self.ready["dashboard"]


def _process_factory(cls: type[NodeProcess], workdir: Path, default_name: str) -> Iterator:
    started: list[NodeProcess] = []

    def start(*args: str, name: str = default_name) -> NodeProcess:
        process = cls(workdir, list(args), name)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.cleanup()


@pytest.fixture
def coordinator_factory(tmp_path) -> Iterator:
    """coordinator_factory(*cli_args, name=...) -> a started CoordinatorProcess; killed at teardown."""
    yield from _process_factory(CoordinatorProcess, tmp_path, "coordinator")


@pytest.fixture
def node_factory(tmp_path) -> Iterator:
    """node_factory(*cli_args, name=...) -> a started NodeProcess; all are killed at teardown."""
    yield from _process_factory(NodeProcess, tmp_path, "node")


@pytest.fixture
def dht_factory() -> Iterator:
    """dht_factory(initial_peers) -> a DHT peer on 127.0.0.1 in this process; shut down at teardown.
    (Not a forked hivemind.DHT: a fork taken after this process's grpc threads started can hang the
    child, as one did here, mid-test; see dmoe/core/dht.py.)"""
    peers: list[DHTPeer] = []

    def make(initial_peers: list[str]) -> DHTPeer:
        peer = DHTPeer(initial_peers=initial_peers)
        peers.append(peer)
        return peer.start()

    yield make
    for peer in peers:
        peer.shutdown()


def dht_get(peer: DHTPeer, key: str, timeout: float = 30.0):
    """The latest entry under ``key`` (a hivemind ValueWithExpiration, or None)."""
    assert peer.node is not None
    return peer.run(peer.node.get(key, latest=True), timeout)


def stub(endpoint: str) -> tuple[grpc.Channel, pbg.ExpertServiceStub]:
    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20),
                                                       ("grpc.max_send_message_length", 256 << 20)])
    return channel, pbg.ExpertServiceStub(channel)


def expert_version(service: pbg.ExpertServiceStub, uid: str) -> int:
    return service.Info(pb.InfoRequest(uids=[uid]), timeout=10).experts[0].version


def module_node(*args: str):
    """A module-scoped fixture: one node started with these CLI args for every test of a module."""

    @pytest.fixture(scope="module")
    def node(tmp_path_factory) -> Iterator[NodeProcess]:
        process = NodeProcess(tmp_path_factory.mktemp("node"), list(args))
        try:
            yield process.start()
        finally:
            process.cleanup()

    return node


@pytest.fixture(scope="module")
def channel(node: NodeProcess) -> Iterator[grpc.Channel]:
    """A channel to the module's ``node`` fixture."""
    channel, _ = stub(node.endpoint)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def service(channel: grpc.Channel) -> pbg.ExpertServiceStub:
    return pbg.ExpertServiceStub(channel)
