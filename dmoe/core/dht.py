"""DHTPeer: a hivemind ``DHTNode`` that lives in this process, on an event loop of its own thread.

Why not ``hivemind.DHT``: that one forks a process and sends every request through a pipe. A fork
taken after grpc or torch started their threads can hang the child, and the child reads its pipe
from uvloop, which makes the pipe non-blocking: a request over 16 KiB (multiprocessing writes its
header and its body separately) can then be read half-way, which kills the DHT process. A node
announcing more than ~100 experts sends such requests on every heartbeat. Here requests are
coroutines scheduled on the peer's loop, so nothing is pickled and no size matters; the libp2p
daemon is still a child process, started by fork + exec, which is safe after threads.

The thread also keeps DHT work (a heartbeat of thousands of records) off the loop that serves
gRPC calls. Other code may schedule its own coroutines on :attr:`DHTPeer.loop` (the client's
dispatcher does).

Every peer owns its records (:mod:`dmoe.core.owner`): it signs them with its :attr:`DHTPeer.owner`
key and checks everyone's with :class:`dmoe.core.recordguard.OwnedRecordValidator`, and its storage
is guarded (:func:`dmoe.core.recordguard.guard_node`: no cache, no early loss of live records).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from hivemind.dht import DHTNode
from hivemind.utils.auth import AuthorizerBase

from dmoe.core.addresses import listen_maddr
from dmoe.core.owner import OwnerKey
from dmoe.core.recordguard import OwnedRecordValidator, fix_timed_storage, guard_node
from dmoe.errors import DmoeError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DHTPeer:
    """``with DHTPeer(initial_peers=[...]) as peer: peer.run(coroutine)``, or start()/shutdown()."""

    def __init__(
        self,
        *,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        identity_path: str | None = None,
        announce_maddrs: Sequence[str] = (),
        event_loop: str = "uvloop",
        client_mode: bool = False,
        authorizer: AuthorizerBase | None = None,
        owner: OwnerKey | None = None,
    ):
        if event_loop not in ("uvloop", "asyncio"):
            raise ValueError(f"event_loop must be uvloop or asyncio, got {event_loop!r}")
        self.initial_peers = list(initial_peers)
        self.host, self.port, self.identity_path, self.client_mode = host, port, identity_path, client_mode
        self.announce_maddrs = list(announce_maddrs)
        self.authorizer = authorizer  # signs and checks every DHT request (a private swarm's key)
        # owner: the key that signs this peer's records; default: derived from identity_path's file
        # once the peer has started (the file may not exist before), else a fresh key
        self._owner_given = owner is not None
        self.validator = OwnedRecordValidator(owner if owner is not None else OwnerKey.generate())
        self.loop = new_event_loop(event_loop)
        self.node: DHTNode | None = None
        self.peer_id: str = ""  # base58 libp2p peer id, once started
        self.visible_maddrs: list[str] = []  # multiaddrs others join with, once started
        self._thread: threading.Thread | None = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the peer's loop and wait for its result (from any other thread); on a
        timeout the coroutine is cancelled and TimeoutError raised."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:  # concurrent.futures' is the builtin since Python 3.11
            future.cancel()
            raise TimeoutError(f"no result in {timeout}s") from None

    async def run_async(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine run on the peer's loop, from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def start(self, timeout: float = 60.0) -> DHTPeer:
        self._thread = threading.Thread(target=self.loop.run_forever, name="dmoe-dht", daemon=True)
        self._thread.start()
        try:
            self.node = self.run(self._create(), timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    async def _create(self) -> DHTNode:
        fix_timed_storage()  # before the node exists: peers may store with it while it bootstraps
        extra: dict[str, Any] = {"identity_path": self.identity_path} if self.identity_path else {}
        if self.announce_maddrs:
            extra["announce_maddrs"] = self.announce_maddrs
        if self.authorizer is not None:
            extra["authorizer"] = self.authorizer
        try:
            node = await DHTNode.create(
                initial_peers=self.initial_peers or None, host_maddrs=[listen_maddr(self.host, self.port)],
                client_mode=self.client_mode, record_validator=self.validator,
                cache_locally=False, cache_nearest=0, cache_on_store=False, **extra,
            )
        except RuntimeError as e:
            if "bootstrap failed" not in str(e):
                raise
            raise DmoeError(f"none of the swarm peers {', '.join(self.initial_peers)} answered: are they up? "
                            "A private swarm answers only peers holding its key (--swarm-key)" +
                            (", and this one's key is not theirs" if self.authorizer else "")) from None
        guard_node(node)
        if self.identity_path and not self._owner_given:
            self.validator.owner = OwnerKey.from_identity_file(self.identity_path)
        self.peer_id = node.peer_id.to_base58()
        self.visible_maddrs = [str(a) for a in await node.get_visible_maddrs()]
        return node

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the DHT node and the loop; safe to call twice."""
        if self._thread is None:
            if not self.loop.is_closed():  # never started: release the loop's descriptors
                self.loop.close()
            return
        for step in (lambda: self.node is not None and self.run(_stop_node(self.node, timeout), timeout + 10),
                     lambda: self.run(_cancel_other_tasks(), timeout)):
            try:
                step()
            except Exception as e:  # each step on its own: one failing must not skip the next
                logger.warning("stopping the DHT peer: %s: %s", type(e).__name__, e)
        self.node = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if self._thread.is_alive():
            logger.warning("the DHT peer's thread did not stop; leaving its event loop open")
        else:
            self.loop.close()
        self._thread = None

    @property
    def owner(self) -> OwnerKey:
        """The key that signs this peer's records (final once the peer has started)."""
        return self.validator.owner

    @property
    def daemon_alive(self) -> bool:
        """False once the libp2p daemon has exited (e.g. a SIGTERM sent to the whole process group)."""
        return self.node is not None and _daemon_alive(self.node)

    @property
    def join_address(self) -> str:
        """The address to hand out: the first visible one that is not loopback, if any."""
        public = [a for a in self.visible_maddrs if not a.startswith(("/ip4/127.", "/ip6/::1/"))]
        return (public or self.visible_maddrs or [""])[0]

    def __enter__(self) -> DHTPeer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _daemon_alive(node: DHTNode) -> bool:
    child = getattr(node.p2p, "_child", None)  # hivemind keeps the daemon's process here
    return child is None or child.returncode is None


async def _stop_node(node: DHTNode, timeout: float) -> None:
    """Stop the node gracefully, unless its libp2p daemon is gone or goes while it stops (a signal
    to the whole process group): a graceful DHTNode.shutdown talks to the daemon and would wait
    forever. Then, or if it fails, stop the client side and the daemon (killed if it lingers)."""
    child = getattr(node.p2p, "_child", None)
    if _daemon_alive(node):
        graceful = asyncio.ensure_future(node.shutdown())
        waiters = {graceful} | ({asyncio.ensure_future(child.wait())} if child is not None else set())
        done, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if graceful in done and graceful.exception() is None:
            return
        reason = "its daemon exited" if not _daemon_alive(node) else (
            f"{graceful.exception()!r}" if graceful in done else f"no answer in {timeout:.0f}s")
        logger.info("stopping the DHT node without a goodbye: %s", reason)
    node.is_alive = False
    try:
        await asyncio.wait_for(node.p2p.shutdown(), 5)
    except (asyncio.TimeoutError, Exception) as e:
        logger.warning("the libp2p daemon did not stop (%r); killing it", e)
        if child is not None and child.returncode is None:
            child.kill()


async def _cancel_other_tasks() -> None:
    """Cancel what the DHT node left running (cache refreshers), so the loop closes cleanly."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
