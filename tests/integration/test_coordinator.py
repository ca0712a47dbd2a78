"""The coordinator: a bootstrap peer whose address survives restarts, and that nodes join through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dmoe.records import find_experts

from conftest import wait_for

pytestmark = pytest.mark.timeout(120)


def start_coordinator(tmp_path, *args: str) -> tuple[subprocess.Popen, dict]:
    ready = tmp_path / "coordinator.json"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "dmoe", "coordinator", "start", "--ready-file", str(ready), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the coordinator")
    assert proc.poll() is None, "coordinator exited"
    return proc, json.loads(ready.read_text())


def test_address_is_stable_and_nodes_join_through_it(tmp_path, node_factory, dht_factory):
    identity = tmp_path / "coordinator.key"
    procs = []
    try:
        proc, first = start_coordinator(tmp_path, "--identity", str(identity))
        procs.append(proc)
        address = first["swarm"][0]
        port = address.split("/tcp/")[1].split("/")[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

        proc, second = start_coordinator(tmp_path, "--identity", str(identity), "--dht-port", port)
        procs.append(proc)
        assert second["swarm"][0] == address

        node = node_factory("--swarm", address, "--experts", "ffn.[0:2]", "--hidden-dim", "8")
        client = dht_factory([address])
        records = wait_for(lambda: find_experts(client, ["ffn.0", "ffn.1"]), 30, "records via the coordinator")
        assert {r.endpoint for r in records.values()} == {node.endpoint}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
