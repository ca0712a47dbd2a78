"""Node: the daemon a volunteer runs. Lifecycle of the DHT peer, experts, runtime and gRPC server.

The DHT peer is an in-process :class:`dmoe.core.dht.DHTPeer` on a thread of its own, so that a
heartbeat of thousands of records never runs on the loop that serves gRPC calls. Shutdown
(SIGINT/SIGTERM or ``shutdown()``): withdraw the DHT records, stop taking calls and let in-flight
ones finish (``server.stop(grace)``), drain the runtime, write a last checkpoint, stop the DHT peer.

Reachability (``--reachability``): a node that others cannot dial (a relay's dial-back fails, or
the user says so) joins the DHT as a client and serves its experts through a relay
(:class:`~dmoe.node.relaylink.RelayLink`); its records name the relay's port for it.

Start-up is a list of named steps (:meth:`Node._start_up`); the gRPC server, the dial-back check,
the checkpoints and the state transfer from live replicas have modules of their own (``server.py``,
``reachability.py``, ``checkpoints.py``, ``joining.py``). An expert alive on other nodes takes a
replica's state (or a newer one than its checkpoint's) before the node serves or announces it.

Use it from Python as a context manager (``with Node(config) as node: node.endpoint``), which runs
it on a background thread with its own event loop, or from the CLI through :meth:`Node.run`.
``--num-threads`` sets torch's thread count for the whole process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import torch

import dmoe
from dmoe.core.addresses import host_port
from dmoe.core.auth import CallVerifier, load_key
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import DHTAuthorizer
from dmoe.core.files import write_json_atomic
from dmoe.core.logsafe import printable
from dmoe.core.modelspec import ModelSpec, expert_schema, find_specs
from dmoe.core.modelspec import resolve as resolve_spec
from dmoe.core.placement import Move, choose
from dmoe.core.records import ExpertRecord, Hardware, NodeRecord, find_experts
from dmoe.errors import ConfigError, DmoeError
from dmoe.node.announcer import Announcer
from dmoe.node.averaging import ReplicaAverager
from dmoe.node.backend import ExpertBackend
from dmoe.node.checkpoints import ExpertCheckpoints
from dmoe.node.config import NodeConfig, explicit_fields
from dmoe.node.experts import build_backend, read_hardware, resolve_device, sized_batch_config
from dmoe.node.guard import CallGuard
from dmoe.node.influence import InfluenceLimits
from dmoe.node.joining import TransferPolicy, Transferred, replicas_of, take_live_states
from dmoe.node.placement import (
    Rebalancer,
    expert_bytes,
    free_memory,
    measure_throughput,
    memory_budget,
    read_picture,
)
from dmoe.node.reachability import dial_back, dialable, relay_candidates, trusted_relays
from dmoe.node.relaylink import RelayLink
from dmoe.node.runtime import Runtime
from dmoe.node.server import NodeServer
from dmoe.node.service import ExpertServicer
from dmoe.node.stats import ExpertCounters
from dmoe.node.transfer import NotNewer, TransferError, fetch_expert_state
from dmoe.proto import expert_pb2 as pb
from dmoe.relay.server import Relay

logger = logging.getLogger(__name__)


def _log_failure(task: asyncio.Task) -> None:
    """A background task's failure, logged when it ends (nothing else awaits it)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("%s failed: %s", task.get_name(), error, exc_info=error)


class Node:
    def __init__(self, config: NodeConfig, given: Collection[str] | None = None):
        self.config = config
        # the options set explicitly (CLI, TOML, environment); None: those that differ from the defaults
        self.given = frozenset(given) if given is not None else explicit_fields(config)
        self.model: ModelSpec | None = None  # the model spec followed (--model, or the swarm's only one)
        self.uids = config.uids
        self.endpoint: str | None = None  # host:port others dial for the gRPC server, once started
        # the port the gRPC server listens on (the endpoint's may differ: --announce-port)
        self.port: int | None = None
        self.swarm_addresses: list[str] = []  # multiaddrs others join with
        self.join_address: str = ""  # the one of them to hand out (not loopback, if there is one)
        self.node_id: str | None = None
        self.backends: dict[str, ExpertBackend] = {}
        self.counters = {uid: ExpertCounters() for uid in self.uids}
        self.started_at = time.time()
        self._dht: DHTPeer | None = None
        self.device: torch.device | None = None  # where the experts run, once built
        self._hardware: Hardware | None = None
        self._server: NodeServer | None = None
        self._runtime: Runtime | None = None
        self._announcer: Announcer | None = None
        self.tls = False  # whether the gRPC server speaks TLS (a private swarm's, unless --no-tls)
        self.reachable = True  # whether others can dial self.endpoint (--reachability; probed by a relay)
        self.relay_endpoint = ""  # when not reachable: this node's public host:port on a relay
        self.relay: Relay | None = None  # the relay this node offers (--offer-relay)
        self._relay_link: RelayLink | None = None
        self.swarm_key = load_key(config.swarm_key)  # None: an open swarm
        self.guard = CallGuard(verifier=CallVerifier(self.swarm_key) if self.swarm_key else None,
                               max_calls_per_peer=config.max_calls_per_peer, peer_rate=config.peer_rate,
                               max_parts_per_peer=config.max_parts_per_peer,
                               peer_burst=config.peer_burst)
        # each peer's optimizer steps per expert: --peer-steps-per-minute, --max-peer-step-share
        self.influence = InfluenceLimits(steps_per_minute=config.peer_steps_per_minute,
                                         max_share=config.max_peer_step_share)
        self._checkpoints = (ExpertCheckpoints(config.checkpoint_dir, keep=config.keep_checkpoints,
                                               backends=self.backends) if config.checkpoint_dir else None)
        self.transfer_policy = TransferPolicy()
        self.transferred: dict[str, Transferred] = {}  # uid -> the state it took from a replica at start
        self._tasks: list[asyncio.Task] = []
        self.averager: ReplicaAverager | None = None  # replica averaging, once started
        # placement by demand (following a model without --experts): the budget, the routed tokens/s one
        # expert serves (measured at start; 0: not measured), and the loop that moves experts
        self.budget: int | None = None
        self.throughput = 0.0
        self.rebalancer: Rebalancer | None = None
        self._moving: asyncio.Lock | None = None  # one move at a time (made on the node's loop)
        self._retiring: set[str] = set()  # experts being let go of: still served, no longer announced
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.shutdown_errors: list[str] = []  # the steps of the last shutdown that failed, and why

    # ---- Python API: run on a background thread -------------------------------------------------
    def start(self, timeout: float = 120.0) -> Node:
        """Start on a background thread; returns once serving and announced, or raises why not."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), name="dmoe-node",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.shutdown()
            raise TimeoutError(f"node did not start within {timeout}s")
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Graceful stop (withdraw records, finish calls, checkpoint); safe to call twice."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- CLI: run in the main thread until a signal ----------------------------------------------
    def run(self, on_ready: Callable[[Node], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM on uvloop; ``on_ready(node)`` runs once serving."""
        import uvloop

        uvloop.run(self.serve(handle_signals=True, on_ready=on_ready))

    def _start_dht(self, client_mode: bool = False) -> None:
        """A peer nobody can dial joins the DHT as a client: serving it, it would make others wait."""
        self._dht = DHTPeer(
            initial_peers=self.config.swarm, host=self.config.host, port=self.config.dht_port,
            identity_path=self.config.identity_path, announce_maddrs=self.config.dht_announce,
            authorizer=DHTAuthorizer(self.swarm_key) if self.swarm_key else None,
            client_mode=client_mode or self.config.reachability == "relay",
        ).start()

    def _stop_dht(self) -> None:
        assert self._dht is not None
        self._dht.shutdown()
        self._dht = None

    async def serve(self, handle_signals: bool = False,
                    on_ready: Callable[[Node], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._start_up()
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            await self._shut_down()
            if handle_signals:
                raise
            return
        self._ready.set()
        if on_ready is not None:
            on_ready(self)
        await self._stop.wait()
        logger.info("stopping: withdrawing records, finishing in-flight calls")
        await self._shut_down()

    # ---- start-up and shutdown --------------------------------------------------------------------
    async def _start_up(self) -> None:
        """The steps of start-up, in order. _shut_down undoes those that ran: all of them, or those
        before the one that failed."""
        await self._join_swarm()
        await self._follow_model()
        self._host_experts()
        await self._take_live_state()
        self._start_runtime()
        await self._start_server()
        await self._settle_reachability()
        await self._offer_relay()
        await self._start_announcer()
        self._start_replica_averaging()
        self._start_checkpoint_loop()
        self._start_rebalancing()
        self._write_ready_file()

    async def _join_swarm(self) -> None:
        """Start the DHT peer (unless one runs already) and take this node's id and addresses from it."""
        # torch.optim imports torch._dynamo on first use (seconds of CPU): do it while the DHT peer
        # starts (mostly waiting on its daemon and the network), not after; a restart is that much shorter
        warm = threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True)
        warm.start()
        if self._dht is None:
            await asyncio.to_thread(self._start_dht)
        await asyncio.to_thread(warm.join)
        self._take_dht_identity()
        logger.info("joined the swarm as %s", self.node_id)
        if self.swarm_key is not None:
            logger.info("private swarm (key fingerprint %s): calls and DHT peers without the key are refused",
                        self.swarm_key.fingerprint)

    def _take_dht_identity(self) -> None:
        """This node's peer id and multiaddrs, from the DHT peer (they change when it restarts)."""
        assert self._dht is not None
        self.node_id = self._dht.peer_id
        self.swarm_addresses = list(self._dht.visible_maddrs)
        self.join_address = self._dht.join_address

    async def _follow_model(self) -> None:
        """With --model, or with --swarm and without --experts: take the experts (unless --experts) and
        their class, sizes and optimizer from the model spec published in the swarm; refuse explicit
        options that disagree. Without --model, a swarm with no spec keeps the defaults."""
        named = self.config.model
        if named is None and (not self.config.swarm or "experts" in self.given):
            return
        assert self._dht is not None
        deadline = time.monotonic() + (10.0 if named is not None else 0.0)
        while True:  # a spec stored a moment ago may take a moment to be found
            specs = await asyncio.to_thread(find_specs, self._dht)
            if (named in specs if named is not None else specs) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(1.0)
        if named is None and not specs:
            logger.info("the swarm publishes no model: hosting %s", ", ".join(self.config.experts))
            return
        spec = resolve_spec(specs, named)
        conflicts = spec.conflicts(self.config, self.given)
        if conflicts:
            raise ConfigError("; ".join(conflicts) + " (drop those options to take the model's)")
        self.config = dataclasses.replace(self.config, **spec.node_fields())
        self.model = spec
        if "experts" not in self.given:
            self.config = dataclasses.replace(self.config, experts=await self._place(spec))
        self.uids = self.config.uids
        self.counters = {uid: ExpertCounters() for uid in self.uids}
        logger.info("following model %r (version %d, %s): hosting %s", spec.name, spec.version,
                    spec.expert_schema, ", ".join(self.config.experts))

    async def _place(self, spec: ModelSpec) -> list[str]:
        """The uids of ``spec`` this node hosts when it picks them itself: as many as its budget holds
        (--max-experts, --memory-fraction), those whose demand is least covered (dmoe.core.placement)."""
        config = self.config
        if config.num_threads is not None:  # the throughput measured is the one the experts will have
            torch.set_num_threads(config.num_threads)
        device = resolve_device(config.device)
        scratch = await asyncio.to_thread(build_backend, spec.uids[0], config, device)
        per_expert = expert_bytes(scratch, config.optimizer)
        fits = memory_budget(per_expert, free_memory(device), config.memory_fraction)
        if fits < 1:
            raise ConfigError(f"not even one expert of model {spec.name!r} ({per_expert / 2**20:.1f} MiB "
                              f"with its optimizer) fits in --memory-fraction {config.memory_fraction:g} "
                              f"of the free memory of {device}")
        self.budget = min(config.max_experts, fits, len(spec.uids))
        self.throughput = (await asyncio.to_thread(measure_throughput, scratch) if config.throughput == "auto"
                           else float(config.throughput))
        del scratch
        assert self._dht is not None
        picture = await asyncio.to_thread(read_picture, self._dht, spec, self.node_id)
        chosen = choose(picture, self.budget, self.throughput / self.budget)
        logger.info("placement: %d of %d experts fit (--max-experts %d, %d by memory at %.1f MiB each); one "
                    "serves %.0f tokens/s; demand recorded for %d experts, %d hosted elsewhere",
                    self.budget, len(spec.uids), config.max_experts, fits, per_expert / 2**20,
                    self.throughput, sum(1 for d in picture.demand.values() if d > 0), len(picture.others))
        return sorted(chosen)

    def _host_experts(self) -> None:
        """Build the experts on the device (torch's thread count first), then restore their checkpoints."""
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        for uid in self.uids:
            self.backends[uid] = build_backend(uid, self.config, self.device)
        self.config = sized_batch_config(self.config, self.given, self.backends)  # CUDA: by device memory
        self._hardware = read_hardware(self.device)
        if self._checkpoints is not None:
            self._checkpoints.restore()

    async def _take_live_state(self) -> None:
        """Experts alive on other nodes take a live replica's state (a newer one than their checkpoint's,
        if restored from one); the others keep theirs. Not in a new swarm: nobody else is in it."""
        if not self.config.swarm:
            return
        assert self._dht is not None and self.node_id is not None
        dht = self._dht

        async def find_replicas(uids: list[str]):
            return await asyncio.to_thread(find_experts, dht, uids)

        self.transferred = await take_live_states(
            self.backends, find_replicas, node_id=self.node_id, key=self.swarm_key,
            local_versions=self.restored_versions, policy=self.transfer_policy)
        if self.transferred:
            logger.info("%d of %d experts took the state of a live replica (%.1f MB)", len(self.transferred),
                        len(self.backends), sum(t.num_bytes for t in self.transferred.values()) / 1e6)

    def _start_runtime(self) -> None:
        """The per-expert queues and the thread that runs their batches on the device."""
        config = self.config
        self._runtime = Runtime(self.backends, max_batch_tokens=config.max_batch_tokens,
                                max_queued_tokens=config.max_queued_tokens, batching=config.batching,
                                grouping=config.grouping,
                                influence=self.influence)
        self._runtime.start()

    async def _start_server(self) -> None:
        """Serve the experts over gRPC (TLS in a private swarm, unless --no-tls); sets port and endpoint."""
        config = self.config
        assert self._runtime is not None
        servicer = ExpertServicer(
            self.backends, self._runtime, self.counters, max_batch_tokens=config.max_batch_tokens,
            max_request_bytes=config.max_request_bytes, node_info=self.info,
            chunk_bytes=min(1 << 20, config.max_message_bytes // 2),
            max_inflight_bytes=config.max_inflight_bytes,
            guard=self.guard, max_input_abs=config.max_input_abs, max_grad_abs=config.max_grad_abs,
            receive_timeout=config.receive_timeout, max_info_uids=config.max_info_uids,
        )
        self._server = NodeServer(servicer.generic_handler(), max_message_bytes=config.max_message_bytes,
                                  max_concurrent_calls=config.max_concurrent_calls, guard=self.guard,
                                  max_watch_streams=config.max_watch_streams)
        self.tls = self.swarm_key is not None and config.tls
        self.port = await self._server.start(config.host, config.port, self.swarm_key if self.tls else None)
        self.endpoint = host_port(config.announce_host or config.host, config.announce_port or self.port)
        logger.info("serving %d experts on %s (%s)", len(self.uids), self.endpoint, self.device)

    async def _offer_relay(self) -> None:
        """Run a relay for nodes nobody can dial (--offer-relay), if others can dial this one."""
        config = self.config
        if not config.offer_relay:
            return
        if not self.reachable:
            logger.warning("not offering a relay (--offer-relay): others cannot dial this node")
            return
        self.relay = Relay(host=config.host, port=config.relay_port,
                           announce_host=config.announce_host or config.host, key=self.swarm_key)
        await asyncio.to_thread(self.relay.start)
        await asyncio.to_thread(self.relay.announce, self._dht, self.node_id)

    async def _start_announcer(self) -> None:
        """Announce the experts and the node in the DHT now, then on every heartbeat."""
        assert self._dht is not None
        self._announcer = Announcer(self._dht, self.records,
                                    heartbeat_interval=self.config.heartbeat_interval,
                                    record_ttl=self.config.record_ttl)
        await self._announcer.start()
        logger.info("announced %d experts in the DHT", len(self.uids))

    def _start_replica_averaging(self) -> None:
        """--average-interval: each expert blends its parameters with its replicas on other nodes, in the
        background (dmoe.node.averaging); stopped with the other tasks at shutdown."""
        if self.config.average_interval > 0:
            assert self._dht is not None and self.node_id is not None
            self.averager = ReplicaAverager.for_node(
                self.backends, self.counters, self._dht, node_id=self.node_id, key=self.swarm_key,
                interval=self.config.average_interval, max_distance=self.config.average_max_distance,
                aggregate=self.config.average_aggregate)
            self._tasks.append(asyncio.create_task(self.averager.run(), name="dmoe-replica-averaging"))

    def _start_checkpoint_loop(self) -> None:
        """With --checkpoint-dir: save the experts that changed every --checkpoint-interval seconds."""
        if self._checkpoints is not None:
            self._tasks.append(asyncio.create_task(self._checkpoints.run(self.config.checkpoint_interval),
                                                   name="dmoe-checkpoints"))

    def _start_rebalancing(self) -> None:
        """When the node picked its experts (a model, no --experts) and --rebalance-interval > 0: the
        loop that covers experts left with no replica and moves experts to where demand needs them."""
        if self.budget is None or self.model is None or self.config.rebalance_interval <= 0:
            return
        assert self._dht is not None
        dht, spec, node_id = self._dht, self.model, self.node_id
        self._moving = asyncio.Lock()
        self.rebalancer = Rebalancer(
            picture=lambda: read_picture(dht, spec, node_id), hosted=lambda: self.hosted,
            move=self.move_expert, own=self.throughput / self.budget,
            check_interval=self.config.heartbeat_interval, rebalance_interval=self.config.rebalance_interval,
            threshold=self.config.rebalance_threshold, rng=random.Random())
        self._tasks.append(asyncio.create_task(self.rebalancer.run(), name="dmoe-rebalancing"))

    @property
    def hosted(self) -> list[str]:
        """The experts this node serves and announces (not those it is letting go of)."""
        return [uid for uid in self.backends if uid not in self._retiring]

    async def add_expert(self, uid: str) -> bool:
        """Host ``uid`` too: built, its state taken from a live replica (with none alive: this node's
        checkpoint of it, else its seed), then announced. False, and nothing hosted, when replicas are
        alive but none gave its state in time: a fresh or stale copy of a trained expert would serve
        what the swarm did not train."""
        assert self._runtime is not None and self._announcer is not None and self.node_id is not None
        dht = self._dht
        assert dht is not None
        backend = await asyncio.to_thread(build_backend, uid, self.config, self.device)
        found = await asyncio.to_thread(find_experts, dht, [uid])
        alive = [r for r in replicas_of(found.get(uid)) if r.node_id != self.node_id]
        transferred: dict[str, Transferred] = {}
        if alive:
            async def find_replicas(uids: list[str]):
                return found

            transferred = await take_live_states({uid: backend}, find_replicas, node_id=self.node_id,
                                                 key=self.swarm_key, policy=self.transfer_policy,
                                                 local_versions={})
            if uid not in transferred:
                logger.warning("not hosting %s: none of its %d live replicas gave its state", uid, len(alive))
                return False
        elif self._checkpoints is not None:
            await asyncio.to_thread(self._checkpoints.restore_one, uid, backend)
        self.transferred.update(transferred)
        self.counters[uid] = ExpertCounters()
        self._runtime.add_expert(uid, backend)
        self.backends[uid] = backend
        self.uids = self.hosted
        # hosted from here on, whatever fails next: the caller (a move) counts it in the node's budget
        try:
            await self._announcer.beat()
        except Exception as e:
            logger.warning("%s: could not announce it at once (the next heartbeat will): %s", uid,
                           printable(e))
        self._refresh_ready_file(f"hosting {uid}")
        logger.info("now hosting %s (%s)", uid, f"state of the replica at {transferred[uid].endpoint}"
                    if uid in transferred else "no live replica: its checkpoint or a fresh expert")
        return True

    async def remove_expert(self, uid: str, grace: float = 0.0, check: bool = False) -> None:
        """Stop hosting ``uid``: its records are withdrawn at once (the node record no longer lists it);
        calls for it are still served for ``grace`` seconds, while clients' cached lookups still name this
        node, then refused (NOT_FOUND, clients go to another replica) and its state checkpointed. Calls
        already queued finish. The wait runs in the background. ``check``: let it go only if another node
        serves it then (else keep it)."""
        assert self._announcer is not None and self._runtime is not None
        backend = self.backends[uid]
        self._retiring.add(uid)
        self.uids = self.hosted
        schema = expert_schema(self.config.expert_cls, self.config.hidden_dim, self.config.inner_dim)
        retired = ExpertRecord(uid=uid, endpoint=self.endpoint or "", node_id=self.node_id or "",
                               expert_cls=self.config.expert_cls, expert_schema=schema,
                               version=backend.version, max_batch_tokens=self.config.max_batch_tokens,
                               max_message_bytes=self.config.max_message_bytes, tls=self.tls,
                               reachable=self.reachable, relay=self.relay_endpoint)

        withdrawn = asyncio.Event()  # the records' withdrawal tried (the grace counts from it)

        async def let_go() -> None:
            await withdrawn.wait()
            await asyncio.sleep(grace)
            if uid not in self._retiring:  # hosted again meanwhile
                return
            if check and not await self._replica_alive_elsewhere(uid):
                # another node let it go at the same time, or died: keep it (one over the budget, until a
                # later move) rather than leave it with no replica
                self._retiring.discard(uid)
                self.uids = self.hosted
                await self._announcer.beat()
                self._refresh_ready_file(f"keeping {uid}")
                logger.warning("keeping %s: no other node serves it any more", uid)
                return
            self.backends.pop(uid, None)
            self._retiring.discard(uid)
            self._runtime.remove_expert(uid)
            if self._checkpoints is not None:
                await asyncio.to_thread(self._checkpoints.save_one, uid, backend)
            logger.info("no longer hosting %s", uid)

        # cancelled at shutdown, the expert is still in self.backends: the last checkpoint covers it.
        # Started before anything below can fail: a uid retired is always let go (or kept) in the end
        task = asyncio.create_task(let_go(), name=f"dmoe-let-go-{uid}")
        task.add_done_callback(_log_failure)
        self._tasks = [t for t in self._tasks if not t.done()] + [task]
        try:
            await self._announcer.retire([retired])
        except Exception as e:
            logger.warning("%s: could not withdraw its records (they expire in %.0fs): %s", uid,
                           self.config.record_ttl, printable(e))
        finally:
            withdrawn.set()
        self._refresh_ready_file(f"letting go of {uid}")

    async def _replica_alive_elsewhere(self, uid: str) -> bool:
        """Whether another node serves ``uid`` now: one of the replicas its records name answers a state
        request for it (asked for nothing newer than it has, it sends the header alone). A node killed a
        moment ago still has records; it answers nothing."""
        assert self._dht is not None
        found = await asyncio.to_thread(find_experts, self._dht, [uid])
        backend = self.backends[uid]
        for record in [r for r in replicas_of(found.get(uid)) if r.node_id != self.node_id][:3]:
            try:
                await fetch_expert_state(record.dial_endpoint, uid, key=self.swarm_key, tls=record.tls,
                                         timeout=5.0, expect=backend, optimizer=False, newer_than=1 << 62)
            except NotNewer:
                return True
            except TransferError as e:
                logger.info("%s: the replica at %s did not answer (%s)", uid, record.dial_endpoint,
                            printable(e))
        return False

    async def move_expert(self, move: Move) -> bool:
        """Host ``move.add`` instead of ``move.drop``: add first, then drop, but only if another node
        serves ``move.drop`` now (else let ``move.add`` go again: no move leaves an expert without a
        replica). True if the move was made. A failure half-way lets the added expert go again, so the
        node stays within its budget."""
        assert self._dht is not None and self._moving is not None
        async with self._moving:
            if move.drop not in self.hosted or move.add in self.backends:
                return False
            if not await self.add_expert(move.add):
                return False
            try:
                served_elsewhere = await self._replica_alive_elsewhere(move.drop)
            except BaseException:
                await asyncio.shield(self.remove_expert(move.add))
                raise
            grace = self.config.heartbeat_interval + 5.0  # clients' cached lookups (5 s) and a heartbeat
            if served_elsewhere:
                await self.remove_expert(move.drop, grace, check=True)
                logger.info("moved %s -> %s (%s)", move.drop, move.add, move.reason)
                return True
            await self.remove_expert(move.add, grace)
            logger.info("kept %s: no other node serves it now", move.drop)
            return False

    async def _shut_down(self) -> None:
        """Undo start-up, every step even when one before it fails (each failure is logged and kept in
        ``shutdown_errors``): a failed last checkpoint must not leave the DHT peer and its daemon running."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._shut_down_step("server drain", self._server.enter_graceful_shutdown())
        if self._announcer is not None and self._dht is not None and not self._dht.daemon_alive:
            logger.warning("the DHT daemon is gone (was the whole process group signalled?): records will "
                           "expire in %.0fs instead of being withdrawn", self.config.record_ttl)
        elif self._announcer is not None:
            try:
                await asyncio.wait_for(self._announcer.withdraw(), timeout=5 + 0.01 * len(self.uids))
            except Exception as e:
                logger.warning("could not withdraw DHT records (they will expire): %s", e)
        if self._server is not None:
            await self._shut_down_step("server stop", self._server.stop(self.config.shutdown_grace))
        for relay_part in (self._relay_link, self.relay):  # after the server: relayed calls in flight finish
            if relay_part is not None:
                await self._shut_down_step("relay shutdown", asyncio.to_thread(relay_part.shutdown))
        if self._runtime is not None:
            await self._shut_down_step("runtime shutdown", asyncio.to_thread(self._runtime.shutdown, 30))
        if self._checkpoints is not None and self.backends:
            await self._shut_down_step("last checkpoint", asyncio.to_thread(self._checkpoints.save, True))
        if self._dht is not None:
            await self._shut_down_step("DHT shutdown", asyncio.to_thread(self._stop_dht))
        if self.shutdown_errors:
            logger.error("node stopped; %d shutdown steps failed: %s", len(self.shutdown_errors),
                         "; ".join(self.shutdown_errors))
        else:
            logger.info("node stopped")

    async def _shut_down_step(self, what: str, step: Awaitable[object]) -> None:
        try:
            await step
        except Exception as e:
            logger.error("%s failed: %s", what, e, exc_info=not isinstance(e, DmoeError))
            self.shutdown_errors.append(f"{what}: {e}")

    # ---- reachability: direct, or through a relay -------------------------------------------------
    def _relay_candidates(self) -> list[str]:
        """The relays to use, in order: --relay, then those announced in the swarm (blocking)."""
        return relay_candidates(self._dht, self.config.relay, self.relay.address if self.relay else None,
                                self.config.swarm)

    async def _settle_reachability(self) -> None:
        """Whether others can dial this node (--reachability, or a relay's dial-back); if not, serve
        through a relay and join the DHT as a client."""
        mode = self.config.reachability
        if mode == "direct":
            return
        assert self.port is not None
        if mode == "auto":
            relays = await asyncio.to_thread(self._relay_candidates)
            trusted = await asyncio.to_thread(trusted_relays, self.config.relay, self.config.swarm, relays)
            verdict = await dial_back(relays, self.config.announce_port or self.port, key=self.swarm_key,
                                      node_id=self.node_id or "", tls=self.tls, trusted=trusted)
            if dialable(verdict, self.endpoint):
                return
            await asyncio.to_thread(self._stop_dht)
            await asyncio.to_thread(self._start_dht, True)
            self._take_dht_identity()
        assert self.node_id is not None
        self.reachable = False
        local_host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        self._relay_link = RelayLink(self._relay_candidates, node_id=self.node_id, key=self.swarm_key,
                                     target=(local_host, self.port), on_change=self._relay_changed)
        await asyncio.to_thread(self._relay_link.start)
        self.relay_endpoint = self._relay_link.endpoint

    def _relay_changed(self, endpoint: str) -> None:
        """The link moved to another relay (or lost its relay): announce the new endpoint now."""
        self.relay_endpoint = endpoint
        if endpoint and self._announcer is not None and self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._announcer.beat(), self._loop)

    # ---- records, info, checkpoints -----------------------------------------------------------------
    def records(self) -> tuple[list[ExpertRecord], NodeRecord]:
        assert self.endpoint is not None and self.node_id is not None and self._runtime is not None
        assert self._hardware is not None
        hosted = {uid: self.backends[uid] for uid in self.hosted}
        queued = {uid: self._runtime.queued_tokens(uid) for uid in hosted}
        schema = expert_schema(self.config.expert_cls, self.config.hidden_dim, self.config.inner_dim)
        experts = [
            ExpertRecord(
                uid=uid, endpoint=self.endpoint, node_id=self.node_id, expert_cls=self.config.expert_cls,
                expert_schema=schema,
                version=backend.version, queued_tokens=queued[uid],
                max_batch_tokens=self.config.max_batch_tokens,
                max_message_bytes=self.config.max_message_bytes,
                tls=self.tls, reachable=self.reachable, relay=self.relay_endpoint,
            )
            for uid, backend in hosted.items()
        ]
        load = {
            uid: self.counters[uid].to_load(queued_tokens=queued[uid], version=b.version)
            for uid, b in hosted.items()
        }
        node = NodeRecord(
            node_id=self.node_id, endpoint=self.endpoint, dmoe_version=dmoe.__version__,
            started_at=self.started_at, updated_at=time.time(), hardware=self._hardware,
            experts=list(hosted), load=load,
            reachable=self.reachable, relay=self.relay_endpoint, throughput=self.throughput,
        )
        return experts, node

    def info(self, uids: list[str]) -> pb.NodeInfo:
        assert self._runtime is not None
        experts = []
        for uid in uids or list(self.backends):
            backend = self.backends[uid]
            experts.append(pb.ExpertInfo(
                uid=uid, expert_cls=backend.expert_cls,
                inputs=[pb.TensorSchema(shape=s.shape, dtype=s.dtype) for s in backend.input_schema],
                outputs=[pb.TensorSchema(shape=s.shape, dtype=s.dtype) for s in backend.output_schema],
                version=backend.version, num_parameters=backend.num_parameters,
                stats=self.counters[uid].to_proto(queued_tokens=self._runtime.queued_tokens(uid),
                                                  version=backend.version,
                                                  skipped_updates=self.influence.skipped(uid)),
            ))
        return pb.NodeInfo(
            node_id=self.node_id or "", dmoe_version=dmoe.__version__,
            device=str(next(iter(self.backends.values())).device), experts=experts,
            max_batch_tokens=self.config.max_batch_tokens, max_message_bytes=self.config.max_message_bytes,
            max_request_bytes=self.config.max_request_bytes,
        )

    def save_checkpoints(self, force: bool = False) -> int:
        """Checkpoint every expert that changed since its last checkpoint (all of them if force)."""
        assert self._checkpoints is not None
        return self._checkpoints.save(force)

    @property
    def restored_versions(self) -> dict[str, int]:
        """uid -> version loaded from a checkpoint at start."""
        return self._checkpoints.restored_versions if self._checkpoints is not None else {}

    def _refresh_ready_file(self, why: str) -> None:
        """The ready file rewritten after a change of what this node hosts; a failure is logged (the change
        stands, and the next change writes the file again)."""
        try:
            self._write_ready_file()
        except OSError as e:
            logger.warning("%s: could not write the ready file %s: %s", why, self.config.ready_file, e)

    def _write_ready_file(self) -> None:
        """--ready-file: where this node serves and how to join its swarm, once it does."""
        if not self.config.ready_file:
            return
        write_json_atomic(Path(self.config.ready_file), {
            "endpoint": self.endpoint, "port": self.port, "swarm": self.swarm_addresses,
            "node_id": self.node_id, "pid": os.getpid(), "experts": self.uids,
            "restored": self.restored_versions, "tls": self.tls,
            "transferred": {uid: {"endpoint": t.endpoint, "version": t.version, "bytes": t.num_bytes,
                                  "seconds": round(t.seconds, 3)} for uid, t in self.transferred.items()},
            "reachable": self.reachable, "relay_endpoint": self.relay_endpoint,
            "relay": self.relay.address if self.relay else "",
        })
