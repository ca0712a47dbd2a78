"""TcpProxy's injected faults, against an echo server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dmoe.testing.netproxy import TcpProxy

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def echo():
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()
    server.close()


def round_trip(port: int, payload: bytes = b"ping") -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - started


def test_delay_and_loss_stall_but_bytes_arrive_unchanged(echo):
    with TcpProxy(echo, delay=0.5) as proxy:
        data, elapsed = round_trip(proxy.port)
        assert data == b"ping" and 1.0 <= elapsed < 1.9  # once each way (twice would be 2 s)
        proxy.delay, proxy.loss, proxy.rto = 0.0, 1.0, 1.0  # every chunk lost once: one RTO per direction
        data, elapsed = round_trip(proxy.port)
        assert data == b"ping" and 2 * 1.0 <= elapsed < 2.9  # (a third RTO would be 3 s)
        assert proxy.num_losses == 2 and proxy.num_bytes == {"up": 8, "down": 8}


def test_an_injected_reset_tears_the_connection_down(echo):
    with TcpProxy(echo, reset=1.0) as proxy:
        try:  # a reset shows as ECONNRESET, or as an empty read when the RST comes first
            data, _ = round_trip(proxy.port)
        except ConnectionResetError:
            data = b""
        assert data == b""
        assert proxy.num_resets == 1 and proxy.num_bytes["down"] == 0


def test_bad_settings_are_refused():
    for bad in ({"loss": 1.5}, {"reset": -0.1}, {"delay": -1}, {"rto": -1}):
        with pytest.raises(ValueError):
            TcpProxy(**bad)
