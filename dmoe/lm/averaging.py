"""ParameterAverager: trainers of one run average their client-side parameters, asynchronously.

The experts learn on their nodes; what each trainer holds itself (embeddings, attention, gates)
is averaged with the other trainers of the same run (``--run-id``) by hivemind's
``DecentralizedAverager``: all-reduce in groups found through the DHT, no central server.
A background thread snapshots the parameters every ``interval`` seconds and runs one averaging
round; the training loop never waits for it. When a round ends, the trainer applies
``average - snapshot`` to its parameters at the next step boundary, so what it learned meanwhile is
kept (as in local SGD with delayed averaging); a round that starts while the last one's result still
waits averages the parameters as they will be with it. A round whose peers vanish times out and is
skipped. A trainer that joins late first loads the averaged parameters from a peer (``catch_up``).

One DHT stack per trainer: the averager uses the trainer's own DHT peer (the Swarm's
:class:`dmoe.core.dht.DHTPeer`) and its libp2p daemon; no ``hivemind.DHT`` process, no second
daemon. What hivemind 1.1.12 requires, and how this meets it:

- ``DecentralizedAverager`` is an ``mp.Process``: ``run_in_background`` forks, and the averager
  serves matchmaking and all-reduce from that child. Of its ``dht`` argument it reads
  ``client_mode`` in the parent (at construction) and, in the child, ``await replicate_p2p()``
  (a client of the same libp2p daemon), ``peer_id``, ``store``/``get`` awaited with
  ``return_future=True`` (group keys) and a blocking ``get`` (the peers that share their state).
- A DHTPeer cannot answer these in the child itself: its event loop runs in a thread of the
  parent, and a fork copies only the forking thread, so a coroutine the child schedules on that
  loop never runs; its DHT node's connections to the daemon are the parent's.
- Nor can the averager run in a thread of the trainer instead: its control calls (``step``,
  ``load_state_from_peers``) pass a hivemind ``MPFuture`` through its own pipe, and an MPFuture
  completed in the process that made it completes the unpickled copy only: the caller sees its
  future done with the result None.

So :class:`PeerDHT` stands in for ``hivemind.DHT``: made before the fork, it carries the child's
DHT calls through a pipe to a thread of the trainer, which runs them on the DHTPeer's loop and
sends the results back. The fork must still come before any thread that may hold a lock at that
moment (the DHT peer's loop, gRPC's; see the design's lessons on fork): the Trainer builds its
Swarm without starting it, builds the model on it, creates this averager (the fork), then starts
the Swarm and calls :meth:`ParameterAverager.connect`.

The guard (:func:`dmoe.core.contribution.check_contribution`, shared with the node's replica
averaging; its rules and bound are in that module): nothing a peer sends is added unchecked. A round's
result, or the parameters ``catch_up`` loads, that it refuses changes nothing.

Who sent a refused contribution? With ``DecentralizedAverager`` it cannot be told: its butterfly
all-reduce has every sender's part summed into every reducer's part, so a NaN in the result
names no sender, and a reducer that returns a wrong part is not told apart from a sender either;
``step`` returns the peer ids of the round's group, nothing per peer. Its matchmaking takes no list
of peers to leave out, and ``load_state_from_peers`` does not say whose state it loaded. So a
trainer refuses the round (and puts its own snapshot back into the averager, so that a peer
catching up from it never downloads the refused result), counts each member of a refused group
as a suspect (:attr:`ParameterAverager.suspects`; a hostile peer is in every refused group, honest
ones only by chance), and logs them; it cannot keep a suspect out of its next group. The node's
replica averaging, which fetches each replica's state itself, does tell the peer and avoids it.

The aggregate (``aggregate``, ``dmoe train --average-aggregate``): hivemind's all-reduce has every
member reduce its own part of the vector (a ``TensorPartReducer``), by default the weighted mean of
the members' values of that part. :class:`RobustAverager` is hivemind's averager with its own part
reducer (:class:`PartReducer`, through :class:`RobustAllReduceRunner`): ``"mean"``, the plain
mean, or ``"centered-clip"``, :func:`dmoe.core.robust.centered_clip` over the members' parts (a
coordinate-partitioned CenteredClip, as in BTARD, with tau measured per part). Either way every
member weighs the same: the weight a peer declares with its parts is its own word, and hivemind's
mean would let one peer that declares a huge weight set the whole average (dmoe's trainers all
declare 1, so their honest average does not change). The RPC names stay those of hivemind's class,
so trainers of either aggregate (and older ones) average together; each member reduces its part
with its own. What a robust part reducer does not cover: a hostile member reduces its own part as it
likes (the guard bounds it, nothing else does); BTARD's verification of reducers is not here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import TensorPartReducer
from hivemind.p2p import P2P, PeerID
from hivemind.utils.timed_storage import get_dht_time

from dmoe.core.contribution import MAX_RELATIVE_DISTANCE, Refused, check_contribution
from dmoe.core.dht import DHTPeer
from dmoe.core.logsafe import printable
from dmoe.core.robust import DEFAULT_ITERATIONS, DEFAULT_RELATIVE_TAU, centered_clip
from dmoe.lm.config import AGGREGATES

logger = logging.getLogger(__name__)

class _Parts:
    """What :class:`PartReducer` puts where hivemind's reducer keeps its running sum: each sender's part
    (float32). A part of another shape is left out (counted as received): adding it to hivemind's sum
    raises after the part was counted, and the reducer then waits for it until the round times out."""

    def __init__(self, shape: torch.Size) -> None:
        self.shape = shape
        self.parts: list[torch.Tensor] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> _Parts:  # alpha: the weight, not used
        if part.shape == self.shape:
            self.parts.append(part.to(torch.float32))
        else:
            logger.debug("left out a part of shape %s (expected %s)", list(part.shape), list(self.shape))
        return self


class PartReducer(TensorPartReducer):
    """hivemind's part reducer, reducing each part with ``aggregate`` ("mean" or "centered-clip") over the
    senders' parts, every sender weighing the same whatever weight it declares."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, aggregate: str,
                 relative_tau: float = DEFAULT_RELATIVE_TAU, iterations: int = DEFAULT_ITERATIONS):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.aggregate, self.relative_tau, self.iterations = aggregate, relative_tau, iterations
        super().__init__(part_shapes, num_senders)

    def __del__(self) -> None:
        if hasattr(self, "finished"):  # not when __init__ refused its arguments
            super().__del__()

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _Parts(self.part_shapes[self.current_part_index])

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight=1.0)

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self.reduce(self.accumulator.parts))
            self.reset_accumulators()

    def reduce(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The mean (NaN if a part holds any: the guard refuses the round), or the CenteredClip of the
        finite parts (a part with NaN or Inf is an outlier like any other, left out)."""
        if self.aggregate == "centered-clip":
            parts = [part for part in parts if bool(torch.isfinite(part).all())]
        if not parts:  # every sender failed: as hivemind's 0 / 0, which the guard refuses
            return torch.full(self.part_shapes[self.current_part_index], float("nan"))
        if self.aggregate == "mean":
            return torch.stack(parts).mean(0)
        return centered_clip(parts, relative_tau=self.relative_tau, iterations=self.iterations)


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's all-reduce of one group, reducing this member's parts with a :class:`PartReducer`."""

    def __init__(self, *, aggregate: str, relative_tau: float, iterations: int, **kwargs: Any):
        super().__init__(**kwargs)
        unused = self.tensor_part_reducer
        self.tensor_part_reducer = PartReducer(unused.part_shapes, unused.num_senders, aggregate=aggregate,
                                               relative_tau=relative_tau, iterations=iterations)
        unused.finished.set()  # the base class's reducer, never used: nothing for it to report


class RobustAverager(DecentralizedAverager):
    """hivemind's ``DecentralizedAverager`` whose all-reduce reduces this member's parts with a
    :class:`PartReducer`; its RPCs keep the names of hivemind's class (see the module docstring)."""

    def __init__(self, *args: Any, aggregate: str, relative_tau: float, iterations: int, **kwargs: Any):
        if kwargs.get("auxiliary"):
            raise ValueError("an auxiliary averager reduces nothing of its own")
        self.reduce_with = dict(aggregate=aggregate, relative_tau=relative_tau, iterations=iterations)
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        return DecentralizedAverager._get_handle_name(namespace, method_name)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: bytes | None = None, **kwargs: Any) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = RobustAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, **self.reduce_with, **kwargs)
        assert group_id in self._running_groups, "the group is registered before its all-reduce"
        self._running_groups[group_id].set_result(runner)
        index = 0
        async for delta in runner:  # the average minus our values, tensor by tensor
            tensors[index].add_(delta, alpha=self._averaging_alpha)
            index += 1
            self.last_updated = get_dht_time()  # what the state sharing reads
            self._state_updated.set()


class PeerDHT:
    """The part of ``hivemind.DHT`` that a forked ``DecentralizedAverager`` calls, answered by a
    DHTPeer of the process that forked it. Create it before the fork and before ``peer`` starts;
    call :meth:`serve` once the peer has started, :meth:`close` after the averager has stopped."""

    def __init__(self, peer: DHTPeer):
        self.client_mode = peer.client_mode
        self._peer = peer
        self._parent_pid = os.getpid()
        self._parent_end, self._child_end = mp.Pipe(duplex=True)
        self._server: threading.Thread | None = None
        self._send_lock = threading.Lock()  # replies are sent from the peer's loop and from the server
        # the child's side, set up at its first request
        self._child_pid: int | None = None
        self._ids = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._peer_id: PeerID | None = None
        self._p2p: P2P | None = None

    # ---- the averager's calls, in the forked child ---------------------------------------------------
    @property
    def peer_id(self) -> PeerID:
        if self._peer_id is None:
            self._peer_id = self._request("peer_id").result()
        return self._peer_id

    async def replicate_p2p(self) -> P2P:
        """A client of the DHT peer's libp2p daemon, made in this process."""
        if self._p2p is None:
            maddr = await asyncio.wrap_future(self._request("daemon_maddr"))
            self._p2p = await P2P.replicate(maddr)
        return self._p2p

    def get(self, key: Any, latest: bool = False, return_future: bool = False, **kwargs: Any) -> Any:
        future = self._request("get", key, latest=latest, **kwargs)
        return asyncio.wrap_future(future) if return_future else future.result()

    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None,
              return_future: bool = False, **kwargs: Any) -> Any:
        future = self._request("store", key, value, expiration_time, subkey=subkey, **kwargs)
        return asyncio.wrap_future(future) if return_future else future.result()

    def _request(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        assert os.getpid() != self._parent_pid, "the averager calls its DHT from its own process"
        if self._child_pid != os.getpid():  # first request in this process: read the replies
            self._child_pid = os.getpid()
            self._parent_end.close()  # the parent's end: so that the parent's exit reads as EOF here
            threading.Thread(target=self._read_replies, name="dmoe-averager-dht", daemon=True).start()
        request_id = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._pending[request_id] = future
        with self._send_lock:
            self._child_end.send((request_id, method, args, kwargs))
        return future

    def _read_replies(self) -> None:
        while True:
            try:
                request_id, ok, value = self._child_end.recv()
            except (EOFError, OSError):
                break
            future = self._pending.pop(request_id, None)
            if future is None or future.done():  # a request the averager gave up on
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the trainer's DHT peer is gone"))

    # ---- the trainer's side ------------------------------------------------------------------------
    def serve(self) -> None:
        """Answer the child's calls from now on (the peer has started)."""
        assert self._peer.node is not None, "start the DHT peer first"
        self._server = threading.Thread(target=self._serve, name="dmoe-averager-dht", daemon=True)
        self._server.start()

    def _serve(self) -> None:
        while True:
            try:
                request_id, method, args, kwargs = self._parent_end.recv()
            except (EOFError, OSError):
                return
            try:
                node = self._peer.node
                if node is None:
                    raise ConnectionError("the DHT peer has stopped")
                if method == "peer_id":
                    self._reply(request_id, True, node.peer_id)
                elif method == "daemon_maddr":
                    self._reply(request_id, True, node.p2p.daemon_listen_maddr)
                elif method in ("get", "store"):
                    call = node.get if method == "get" else node.store
                    running = asyncio.run_coroutine_threadsafe(call(*args, **kwargs), self._peer.loop)
                    running.add_done_callback(lambda done, rid=request_id: self._reply_with(rid, done))
                else:
                    raise ValueError(f"no DHT method {method!r} for the averager")
            except Exception as e:
                self._reply(request_id, False, e)

    def _reply_with(self, request_id: int, done: concurrent.futures.Future) -> None:
        if done.cancelled():
            self._reply(request_id, False, ConnectionError("the DHT peer has stopped"))
        elif done.exception() is not None:
            self._reply(request_id, False, done.exception())
        else:
            self._reply(request_id, True, done.result())

    def _reply(self, request_id: int, ok: bool, value: Any) -> None:
        try:
            with self._send_lock:
                try:
                    self._parent_end.send((request_id, ok, value))
                except Exception as e:  # an unpicklable exception (pickling fails before a byte is sent)
                    if ok or isinstance(e, OSError):
                        raise
                    value = RuntimeError(f"{type(value).__name__}: {value}")
                    self._parent_end.send((request_id, False, value))
        except OSError:  # the averager's process is gone, or close() ran
            pass

    def close(self) -> None:
        """After the averager's process has exited: stop serving."""
        self._child_end.close()  # with the child's copy gone too, the server reads EOF
        if self._server is not None:
            self._server.join(5)
            if self._server.is_alive():
                logger.warning("the averager's process still holds its DHT pipe; leaving its server thread")
                return
            self._server = None
        self._parent_end.close()


class ParameterAverager:
    """``ParameterAverager(params, peer=...)`` before ``peer`` starts (it forks), ``connect()`` after,
    then ``catch_up()``, ``start()``, ``apply_pending()`` at each step boundary, ``shutdown()``.
    A round's result or a catch-up that :func:`check_contribution` refuses (``max_distance``) is
    not applied; the members of a refused round's group are counted in ``suspects``. ``aggregate``:
    how this trainer reduces its part of each round, "mean" or "centered-clip" (with ``clip_tau``,
    relative to the median distance, and ``clip_iterations``: :func:`dmoe.core.robust.centered_clip`)."""

    def __init__(self, params: list[torch.nn.Parameter], *, peer: DHTPeer, run_id: str,
                 interval: float = 10.0, matchmaking_time: float = 3.0, round_timeout: float = 30.0,
                 max_distance: float = MAX_RELATIVE_DISTANCE, aggregate: str = "mean",
                 clip_tau: float = DEFAULT_RELATIVE_TAU, clip_iterations: int = DEFAULT_ITERATIONS):
        if interval <= 0 or matchmaking_time <= 0 or round_timeout <= 0 or max_distance <= 0:
            raise ValueError("interval, matchmaking_time, round_timeout and max_distance must be positive")
        if aggregate not in AGGREGATES or clip_tau <= 0 or clip_iterations < 1:
            raise ValueError(f"need aggregate in {AGGREGATES}, clip_tau > 0 and clip_iterations >= 1")
        assert peer.node is None, "create the averager before its DHT peer starts: it forks"
        self.params, self.interval, self.round_timeout = params, interval, round_timeout
        self.max_distance = max_distance
        self._peer = peer
        self.num_rounds = self.num_failed_rounds = self.num_refused_rounds = 0
        self.last_group_size = 0  # of the last round that found a group, refused or not
        self.suspects: collections.Counter[str] = collections.Counter()  # peer id -> refused rounds it was in
        self._pending: list[torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dht = PeerDHT(peer)
        self.averager = RobustAverager(
            [p.detach().clone() for p in params], self.dht, prefix=f"dmoe_run_{run_id}", start=False,
            aggregate=aggregate, relative_tau=clip_tau, iterations=clip_iterations,
            min_matchmaking_time=matchmaking_time, request_timeout=min(3.0, matchmaking_time),
            allreduce_timeout=round_timeout, target_group_size=None,
        )
        self.averager.run_in_background(await_ready=False)  # the fork

    def connect(self, timeout: float = 60.0) -> None:
        """Once the DHT peer has started: serve the averager's DHT calls; wait until it is ready."""
        self.dht.serve()
        self.averager.wait_until_ready(timeout)

    def catch_up(self, timeout: float = 30.0) -> bool:
        """Load the run's averaged parameters from a peer, if there is one. True if loaded."""
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return False
        _, tensors = loaded
        try:
            with torch.no_grad():
                check_contribution([p.detach() for p in self.params], tensors, max_distance=self.max_distance)
        except Refused as e:
            logger.warning("refused the parameters a peer of this run sent to catch up with (%s); "
                           "starting from this trainer's own", e)
            return False
        with torch.no_grad():
            for param, tensor in zip(self.params, tensors):
                param.copy_(tensor)
        logger.info("caught up: loaded the run's averaged parameters from a peer")
        return True

    def start(self) -> ParameterAverager:
        self._thread = threading.Thread(target=self._loop, name="dmoe-averager", daemon=True)
        self._thread.start()
        return self

    def apply_pending(self) -> bool:
        """At a step boundary: add the result of the last finished round. True if one was applied."""
        with self._lock, torch.no_grad():  # under the lock: a round's snapshot sees both or neither
            if self._pending is None:
                return False
            for param, delta in zip(self.params, self._pending):
                param.add_(delta)
            self._pending = None
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.round()

    def round(self) -> bool:
        """One averaging round now (the background loop runs one every interval); True if its result
        waits for :meth:`apply_pending`. A round that fails or is refused is counted and logged."""
        try:
            return self._round()
        except Exception as e:  # a failed round is skipped; the next one may succeed
            self.num_failed_rounds += 1
            logger.info("averaging round failed (%s); training goes on", printable(e))
            return False

    def _round(self) -> bool:
        with self._lock, torch.no_grad():
            snapshot = [p.detach().clone() for p in self.params]
            if self._pending is not None:  # a finished round not yet applied: average what the
                for value, delta in zip(snapshot, self._pending):  # parameters are once it is
                    value.add_(delta)
        with self.averager.get_tensors() as tensors:
            for tensor, value in zip(tensors, snapshot):
                tensor.copy_(value)
        result = self.averager.step(timeout=self.round_timeout, allow_retries=False)
        if result is None:
            self.num_failed_rounds += 1
            return False
        self.last_group_size = len(result)
        with self.averager.get_tensors() as tensors:
            try:
                check_contribution(snapshot, tensors, max_distance=self.max_distance)
            except Refused as e:
                for tensor, value in zip(tensors, snapshot):  # a peer catching up from us gets ours
                    tensor.copy_(value)
                self._refuse(e, result)
                return False
            delta = [t - s for t, s in zip(tensors, snapshot)]
        with self._lock:  # a round not yet applied is kept: both deltas count
            self._pending = delta if self._pending is None else [a + b for a, b in zip(self._pending, delta)]
        self.num_rounds += 1
        logger.info("averaged parameters with %d trainer(s)", len(result))
        return True

    def _refuse(self, reason: Refused, group: Mapping[PeerID, Any]) -> None:
        """A round's result failed the guard: count its group's other members as suspects."""
        self.num_refused_rounds += 1
        others = sorted(str(peer_id) for peer_id in group if str(peer_id) != self._peer.peer_id)
        self.suspects.update(others)
        logger.warning("refused an averaging round's result (%s); its group: %s", reason,
                       printable(", ".join(others)))

    def shutdown(self) -> None:
        """Before the DHT peer shuts down: the averager says goodbye through it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.round_timeout + 10)
            self._thread = None
        self.averager.shutdown()
        self.dht.close()
