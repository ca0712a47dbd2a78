"""TcpProxy's injected faults, against a server on 127.0.0.1; its delays on a manual clock."""

from __future__ import annotations

import asyncio
import select
import socket
import threading

import pytest
from swarm_fixtures import wait_for

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


def round_trip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return data


class ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it (:meth:`advance`): the proxy's
    delays and retransmission timeouts are timers of its loop, so they fire at exact clock values."""

    now = 0.0

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on, in the loop's thread (which wakes it to run the timers now due)."""
        moved = threading.Event()

        def move() -> None:
            self.now += seconds
            moved.set()

        self.call_soon_threadsafe(move)
        assert moved.wait(10)


def manual_clock_proxy(target, **settings) -> tuple[TcpProxy, ManualClockLoop]:
    proxy = TcpProxy(target, **settings)
    proxy._loop.close()
    proxy._loop = loop = ManualClockLoop()  # before start: the proxy runs on this loop
    return proxy, loop


def settle(proxy: TcpProxy) -> None:
    """Let the proxy's loop run whatever is ready (a chunk with no delay would be written now)."""

    async def turns() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    proxy._run(turns())


def pending(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def arrive(sock: socket.socket, size: int) -> bytes:
    data = b""
    sock.settimeout(10)
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


@pytest.fixture
def server():
    listening = socket.create_server(("127.0.0.1", 0))
    yield listening
    listening.close()


@pytest.mark.parametrize("fault", ["delay", "loss"])
def test_delay_and_loss_stall_each_direction_once_and_bytes_arrive_unchanged(server, fault):
    """On a manual clock: a chunk is held exactly the delay (or one RTO when it is lost) in each
    direction, not less (nothing has arrived a quarter before), not more (it has arrived at that time)."""
    settings = {"delay": {"delay": 0.5}, "loss": {"loss": 1.0, "rto": 0.5}}[fault]
    proxy, clock = manual_clock_proxy(server.getsockname(), **settings)
    with proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        server.settimeout(10)
        upstream, _ = server.accept()
        with upstream:
            for sender, receiver, direction, payload in ((client, upstream, "up", b"ping"),
                                                         (upstream, client, "down", b"pong!")):
                sent_at = clock.now
                sender.sendall(payload)
                wait_for(lambda: proxy.num_bytes[direction] == len(payload), 10,
                         f"the proxy to read {direction}")
                settle(proxy)
                assert not pending(receiver)
                clock.advance(0.25)
                settle(proxy)
                assert not pending(receiver)
                clock.advance(0.25)
                assert arrive(receiver, len(payload)) == payload
                assert clock.now - sent_at == 0.5
    assert proxy.num_losses == (2 if fault == "loss" else 0)
    assert proxy.num_bytes == {"up": 4, "down": 5}


def test_an_injected_reset_tears_the_connection_down(echo):
    with TcpProxy(echo, reset=1.0) as proxy:
        try:  # a reset shows as ECONNRESET, or as an empty read when the RST comes first
            data = round_trip(proxy.port)
        except ConnectionResetError:
            data = b""
        assert data == b""
        assert proxy.num_resets == 1 and proxy.num_bytes["down"] == 0


def test_bad_settings_are_refused():
    for bad in ({"loss": 1.5}, {"reset": -0.1}, {"delay": -1}, {"rto": -1}):
        with pytest.raises(ValueError):
            TcpProxy(**bad)
