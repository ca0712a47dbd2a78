"""NetLab: a namespace behind a veth link shaped by tc tbf, removed afterwards."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from markers import needs_root
from swarm_fixtures import wait_for

from dmoe.testing.netlab import NetLab

pytestmark = [pytest.mark.timeout(60), needs_root]
SINK = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
total = 0
while data := conn.recv(1 << 16):
    total += len(data)
print(total, flush=True)
"""


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_a_shaped_link_to_a_namespace_and_nothing_left_after():
    size, mbit = 2_000_000, 8
    with NetLab() as lab:
        assert lab.name in namespaces()
        lab.shape(mbit)
        sink = lab.popen([sys.executable, "-c", SINK, lab.inner_ip], stdout=subprocess.PIPE, text=True)
        port = int(sink.stdout.readline())
        started = time.monotonic()
        with socket.create_connection((lab.inner_ip, port), timeout=30) as conn:
            conn.sendall(b"x" * size)
        assert int(sink.stdout.readline()) == size
        elapsed = time.monotonic() - started
        ideal = size * 8 / (mbit * 1e6)  # 2 s
        assert 0.8 * ideal < elapsed < 2.5 * ideal, elapsed
        name = lab.name
    wait_for(lambda: name not in namespaces(), 10, "the namespace to be removed")
    assert sink.poll() is not None


def test_a_cut_off_namespace_is_unreachable_until_its_link_is_back():
    with NetLab() as lab, socket.create_server((lab.outer_ip, 0)) as server:
        port = server.getsockname()[1]
        dial = [sys.executable, "-c",
                f"import socket; socket.create_connection(('{lab.outer_ip}', {port}), timeout=3)"]

        def reachable() -> bool:
            return subprocess.run(["ip", "netns", "exec", lab.name, *dial],
                                  capture_output=True).returncode == 0

        assert reachable()
        lab.set_link(False)
        assert not reachable()
        with pytest.raises(OSError):  # and from the host side, packets to it are lost: a timeout
            socket.create_connection((lab.inner_ip, 9), timeout=1)
        lab.set_link(True)
        wait_for(reachable, 10, "the link to come back")
