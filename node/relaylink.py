"""RelayLink: a node that nobody can dial keeps itself registered with a relay (:mod:`dmoe.relay.server`;
the messages of :mod:`dmoe.relay.protocol`).

It holds one control connection to a relay, answers its pings, and for every client the relay
announces, dials the relay once more (``attach``) and splices that connection to the node's own
gRPC server. The local connection comes from a loopback address that stands for the client's IP
(:func:`dmoe.relay.protocol.loopback_source`), so the node's per-peer limits still tell clients
apart.

When the relay goes away, the link tries the relays it is given again, in order, with capped
back-off, and reports each new public endpoint through ``on_change`` (the node then re-announces).
It runs on a thread and event loop of its own, away from the loop that serves gRPC calls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from dmoe.core.addresses import split_address
from dmoe.core.auth import SwarmKey
from dmoe.core.logsafe import printable
from dmoe.errors import DmoeError
from dmoe.relay.limits import PING_INTERVAL
from dmoe.relay.protocol import (
    MAX_LINE,
    ProtocolError,
    close_quietly,
    loopback_source,
    open_connection,
    read_message,
    register_message,
    send_message,
    splice,
)

logger = logging.getLogger(__name__)

RETRY_MAX = 30.0
# relayed client connections at once; more 'open's are ignored (the relay gives up on them)
MAX_ATTACHING = 256


class RelayLink:
    def __init__(self, relays: Callable[[], list[str]], *, node_id: str, key: SwarmKey | None,
                 target: tuple[str, int], on_change: Callable[[str], None] | None = None,
                 timeout: float = 5.0):
        self.relays = relays  # the relays to try, in order (called again before every round)
        self.node_id, self.key, self.target = node_id, key, target
        self.on_change, self.timeout = on_change, timeout
        self.endpoint = ""  # this node's public host:port on the relay; "" while not registered
        self.relay = ""  # the relay it is registered with
        self.failures: list[str] = []  # why the last round's relays failed
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._main: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._secrets: dict[str, str] = {}  # relay -> the secret of this node's registration there

    def start(self, timeout: float = 60.0) -> RelayLink:
        """Register with the first relay that takes this node; DmoeError if none does in time."""
        from dmoe.core.dht import new_event_loop

        self.loop = new_event_loop("uvloop")
        self._thread = threading.Thread(target=self.loop.run_forever, name="dmoe-relay-link", daemon=True)
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._spawn_main(), self.loop).result()
        if not self._ready.wait(timeout):
            failures = "; ".join(self.failures) or "no relay known"
            self.shutdown()
            raise DmoeError(f"no relay took this node within {timeout:.0f}s ({failures}). Start a "
                            "coordinator (it offers a relay) or a node with --offer-relay, or name one with "
                            "--relay HOST:PORT")
        return self

    async def _spawn_main(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._run(), name="dmoe-relay-link")

    def shutdown(self) -> None:
        if self.loop is None or self.loop.is_closed():
            return

        async def stop() -> None:
            tasks = {t for t in (self._main, *self._tasks) if t is not None}
            while tasks:  # again until they end: a task may start another, or outlive one cancellation
                for task in tasks:
                    task.cancel()
                _, pending = await asyncio.wait(tasks, timeout=0.5)
                tasks = pending | {t for t in self._tasks if not t.done()}

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self.loop.close()

    def _set(self, relay: str, endpoint: str) -> None:
        changed = endpoint != self.endpoint
        self.relay, self.endpoint = relay, endpoint
        if changed and self.on_change is not None:
            try:
                self.on_change(endpoint)
            except Exception:
                logger.exception("relay endpoint change handler failed")

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                candidates = await asyncio.to_thread(self.relays)
            except Exception as e:  # a broken candidate source must not end the link
                logger.warning("could not list relays: %s", printable(e))
                candidates = [self.relay] if self.relay else []
            failures = []
            for relay in candidates:
                quick_losses = 0
                while quick_losses < 3:
                    started = time.monotonic()
                    if not await self._try(relay, failures):
                        break
                    # it took this node, then the channel broke: ask the same relay again at once (the
                    # registration's secret gets the node its old port back, so clients see nothing);
                    # a relay that keeps dropping it is left for the next one
                    delay = 1.0
                    quick_losses = quick_losses + 1 if time.monotonic() - started < 10 else 0
                    logger.warning("lost the control channel to relay %s; registering again", relay)
                    await asyncio.sleep(0.1 * quick_losses)
                if self.endpoint:
                    logger.warning("lost relay %s; looking for one", relay)
                    self._set("", "")
            self.failures = failures or ["no relay known"]
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    async def _try(self, relay: str, failures: list[str]) -> bool:
        """Serve through ``relay`` until its channel ends; True if it registered this node first."""
        registered = False

        def on_registered() -> None:
            nonlocal registered
            registered = True

        try:
            await self._serve(relay, on_registered)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failures.append(f"{relay}: {e or type(e).__name__}")
            logger.debug("relay %s: %s", relay, printable(e))
        return registered

    async def _serve(self, relay: str, on_registered: Callable[[], None]) -> None:
        reader, writer = await open_connection(relay, self.timeout)
        try:
            send_message(writer, register_message(self.node_id, self.key, self._secrets.get(relay)))
            try:
                reply = await read_message(reader, self.timeout)
            except EOFError:
                raise ProtocolError("closed the connection") from None
            if not reply.get("ok") or not isinstance(reply.get("endpoint"), str):
                raise ConnectionRefusedError(f"refused: {str(reply.get('error', 'no endpoint given'))[:200]}")
            split_address(reply["endpoint"])  # ValueError for anything that is not host:port
            if isinstance(reply.get("secret"), str):
                self._secrets[relay] = reply["secret"]
            logger.info("serving through relay %s at %s", relay, printable(reply["endpoint"]))
            self._set(relay, reply["endpoint"])
            on_registered()
            self._ready.set()
            while True:
                try:
                    message = await read_message(reader, 3 * PING_INTERVAL)
                except EOFError:
                    raise ConnectionResetError("the relay closed the control channel") from None
                op = message.get("op")
                if op == "ping":
                    send_message(writer, {"op": "pong"})
                elif op == "open" and isinstance(message.get("conn"), str):
                    if len(self._tasks) >= MAX_ATTACHING:
                        logger.warning("%d relayed connections open already; ignoring one more",
                                       MAX_ATTACHING)
                        continue
                    task = asyncio.get_running_loop().create_task(
                        self._attach(relay, message["conn"], str(message.get("peer", ""))))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    raise ProtocolError(f"unexpected message {op!r} from the relay")
        finally:
            close_quietly(writer)

    async def _attach(self, relay: str, conn: str, peer: str) -> None:
        host, port = self.target
        try:
            relay_side = await open_connection(relay, self.timeout)
        except (OSError, TimeoutError) as e:
            logger.debug("could not attach a relayed connection: %s", printable(e))
            return
        send_message(relay_side[1], {"op": "attach", "conn": conn})
        source = loopback_source(peer) if peer and ":" not in host else None  # IPv4: 127/8 is all local
        try:
            local = await asyncio.open_connection(host, port, limit=MAX_LINE,
                                                  local_addr=(source, 0) if source else None)
        except OSError:
            try:
                local = await asyncio.open_connection(host, port, limit=MAX_LINE)
            except OSError as e:
                logger.warning("relayed client: cannot reach this node's own gRPC server at %s:%d: %s",
                               host, port, e)
                close_quietly(relay_side[1])
                return
        await splice(relay_side, local)
