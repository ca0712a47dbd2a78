"""A userspace TCP proxy that makes a loopback link look like a slow or broken one.

Tests and benchmarks put it in front of a node (which announces the proxy's port with
``--announce-port``) to inject what the kernel's netem would, where netem is not available: a
one-way delay per direction with jitter (order kept, as on one TCP path); packet loss as TCP shows
it to the application, a stall of one retransmission timeout (``loss``: the chance per chunk read,
``rto`` seconds, everything behind it waits too); connection resets (``reset``: the chance per chunk
that the connection is torn down, both ways); and cutting every connection at once. Bytes that
pass arrive unchanged. With ``source`` (127.0.0.N) it dials the target from that address, so a
node's per-peer limits see each proxy as a peer of its own. It runs on its own event loop thread, so it
works from synchronous test code; the settings may be changed while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading

logger = logging.getLogger(__name__)

READ_BYTES = 64 << 10


class TcpProxy:
    """``with TcpProxy(delay=0.05) as proxy: proxy.target = ("127.0.0.1", port); dial proxy.port``."""

    def __init__(self, target: tuple[str, int] | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0, rto: float = 0.2,
                 reset: float = 0.0, seed: int = 0, source: str | None = None):
        if delay < 0 or jitter < 0 or rto < 0 or not (0 <= loss <= 1 and 0 <= reset <= 1):
            raise ValueError("delay, jitter and rto must be >= 0; loss and reset are chances in [0, 1]")
        self.target, self.host = target, host
        self.source = source  # the address it dials the target from (127.0.0.N: another peer to a node)
        self.delay, self.jitter = delay, jitter  # seconds added to each direction; read on every chunk
        self.loss, self.rto, self.reset = loss, rto, reset  # read on every chunk too
        self.num_losses = self.num_resets = 0
        self.port = port
        self.num_connections = 0
        self.num_bytes = {"up": 0, "down": 0}  # bytes relayed towards the target ("up") and back
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread = threading.Thread(target=self._loop.run_forever, name="dmoe-proxy", daemon=True)
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._handle, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def shutdown(self) -> None:
        if self._thread is None:
            return

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            self._cut()
            await self._server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._run(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def cut_connections(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        self._loop.call_soon_threadsafe(self._cut)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    # ---- the proxying ------------------------------------------------------------------------------
    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.target is None:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(
                *self.target, local_addr=(self.source, 0) if self.source else None)
        except OSError as e:
            logger.debug("proxy cannot reach %s: %s", self.target, e)
            client_writer.transport.abort()
            return
        self.num_connections += 1
        self._writers.update((client_writer, server_writer))
        try:
            both = (client_writer, server_writer)
            await asyncio.gather(self._pipe(client_reader, server_writer, "up", both),
                                 self._pipe(server_reader, client_writer, "down", both),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            pass  # shutdown; asyncio's stream server reads this task's outcome, which must not be
                  # a cancellation
        finally:
            for writer in (client_writer, server_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                    both: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        """Copy one direction, each chunk delivered ``delay`` (+ jitter) after it was read, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                writer.write(data)
                await writer.drain()

        delivery = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(READ_BYTES)
                if data and self.reset and self._random.random() < self.reset:
                    self.num_resets += 1
                    for end in both:  # a RST to each side, at once
                        end.transport.abort()
                    return
                self.num_bytes[direction] += len(data)
                due = (loop.time() + self.delay
                       + (self._random.uniform(0, self.jitter) if self.jitter else 0.0))
                if data and self.loss and self._random.random() < self.loss:
                    self.num_losses += 1
                    due += self.rto  # TCP resends the lost segment after its retransmission timeout
                last_due = max(last_due, due)  # jitter never reorders bytes of one stream
                queue.put_nowait((last_due, data))
                if not data:
                    break
            await delivery
        except (ConnectionError, OSError):
            pass
        finally:
            delivery.cancel()
