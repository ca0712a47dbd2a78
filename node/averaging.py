"""ReplicaAverager: the replicas of an expert, on different nodes, average their parameters in the
background (``--average-interval``), so that what each learns from its own clients reaches the others.

Mechanism: over the gRPC data plane. Every interval (randomised by +-20%, so that nodes started
together do not fetch from each other in lockstep) the node looks up the live replicas of all its
experts at once (:func:`~dmoe.core.records.find_experts`, one DHT lookup), and each expert with a
replica on another node picks one at random, fetches its module state with ``GetState`` (without
the optimizer's: :func:`~dmoe.node.transfer.fetch_expert_state`, which checks names, shapes, dtypes,
the byte count, the sha256 and finiteness against this node's expert), and blends it in. Why not
hivemind's ``DecentralizedAverager`` with one group per uid: it is a process per averager, so one
process, one matchmaking and one DHT group key per uid per node (thousands of experts, thousands
of processes); it speaks libp2p, which has no path through this project's relay (a node behind a
NAT serves only gRPC through it) and none of the private swarm's TLS and call tokens; and its
all-reduce cannot tell which peer sent a bad part (see :mod:`dmoe.lm.averaging`). ``GetState``
is one transport that already works wherever a client can call the expert (direct, relayed, TLS),
and a pull names its peer, so a bad contribution is pinned on the replica that sent it.

Blending: the fetch runs on the event loop without holding anything; then, off the loop, a copy
``ours`` of the expert's module state is taken under the expert's lock (the runtime thread owns
the module: the lock is what its Backward holds), ``theirs`` is checked against it by
:func:`dmoe.core.contribution.check_contribution` (finite, same shapes, within
``--average-max-distance`` times each tensor's norm), and ``(theirs - ours) / 2`` is added to the
module's floating-point state under the lock again: so a replica's steps taken meanwhile are kept,
and nothing waits for the network. The lock is held for the copy and for the addition alone (for an
ffn expert of hidden 1024, inner 4096, 8.4M parameters on a loaded 2-core CPU: 40-60 ms each); a
Backward waits at most that long, a Forward not at all. A Forward runs without the lock: one that
overlaps the addition may see some values blended and others not yet, each a value of this
replica within the bound, never a partial write of a value.

Two replicas that pull each other at the same moment both land on their mean; one after the other,
they end a quarter of their gap apart: the gap shrinks by half or more per round either way
(gossip averaging; the replicas' mean may drift, it is not conserved exactly). What is kept local:
the optimizer's state (each replica's Adam moments follow its own gradients, as in local SGD;
fetching them would double or triple the bytes), the version (optimizer steps applied here: state
transfer and the replica order of a joining node read it), and non-floating-point buffers. An
expert that averages but takes no step is not checkpointed again (checkpoints follow versions).

Cost, measured on 127.0.0.1 on that machine for that expert: one blend fetches 33.6 MB (its
parameters in float32) and takes 0.5-0.7 s (fetch 0.24 s; check and blend 0.25-0.4 s off the
event loop). Per node and round: that times the experts that have a replica elsewhere, at most
``max_concurrent`` at once; ``--average-interval`` trades bandwidth against spread.

Robust aggregate (``--average-aggregate centered-clip``): where an expert has two or more other
live replicas, a round fetches up to ``max_replicas`` of them (at once) instead of one, checks each
against ours, and moves ours to the CenteredClip (:func:`dmoe.core.robust.centered_clip`, per
tensor, tau relative to the replicas' median distance) of ours and theirs: one hostile replica among
three or more pulls by about tau / (n - 1) at most, whatever it offers within the distance bound,
where the blend would take half of its offset. With one other replica (two in all) it blends halfway
as the mean does: of two, neither is a majority, so no aggregate can tell which one lies; the
distance bound is then all there is, and a hostile replica pulls by half its offset per round.

Refusal: a replica whose state fails the transfer's checks or the distance bound is refused,
nothing of it is applied, and that replica (endpoint, uid) is avoided for ``avoid_rounds``
intervals; one whose call fails (unreachable, too slow) is skipped for this round and the next.
Each expert's last spread (relative distance before blending) and time are published in the node
record (``ExpertLoad.spread`` / ``averaged_at``, through :class:`~dmoe.node.stats.ExpertCounters`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping

import torch

from dmoe.core.aggregates import AGGREGATES
from dmoe.core.auth import SwarmKey
from dmoe.core.contribution import Refused, check_contribution
from dmoe.core.dht import DHTPeer
from dmoe.core.logsafe import printable
from dmoe.core.records import ExpertRecord, find_experts
from dmoe.core.robust import centered_clip
from dmoe.core.wire import DTYPES
from dmoe.node.backend import ExpertBackend
from dmoe.node.joining import replicas_of
from dmoe.node.stats import ExpertCounters
from dmoe.node.transfer import (
    DEFAULT_STALL_TIMEOUT,
    ExpertState,
    StateRefused,
    TransferError,
    call_timeout,
    fetch_expert_state,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20
JITTER = 0.2  # each interval is interval * uniform(1 - JITTER, 1 + JITTER)


@dataclasses.dataclass(kw_only=True, slots=True)
class Averaged:
    """One expert's blend with one replica."""

    uid: str
    endpoint: str  # the replica's (with centered-clip, the replicas', comma-separated)
    spread: float  # |theirs - ours| / |ours| before blending
    num_bytes: int  # fetched
    fetch_seconds: float
    blend_seconds: float  # snapshot, check and blend, off the event loop
    at: float  # wall clock when blended


class ReplicaAverager:
    """``await averager.run()`` (a task of the node's event loop; cancel it to stop), or
    ``await averager.round()`` for one round. ``find_replicas(uids)`` answers as find_experts does
    (blocking; run in a thread). The results of the last round are kept in ``last_round``.
    ``aggregate``: "mean" (blend with one replica) or "centered-clip" (with up to ``max_replicas``)."""

    def __init__(self, backends: Mapping[str, ExpertBackend], counters: Mapping[str, ExpertCounters], *,
                 node_id: str, key: SwarmKey | None, interval: float, max_distance: float,
                 find_replicas: Callable[[list[str]], Mapping[str, object]],
                 max_concurrent: int = 2, avoid_rounds: int = 10,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, min_bytes_per_second: float = 1 * MiB,
                 aggregate: str = "mean", max_replicas: int = 4):
        if interval <= 0 or max_distance <= 0 or max_concurrent < 1 or avoid_rounds < 1 or max_replicas < 2:
            raise ValueError("interval, max_distance, max_concurrent and avoid_rounds must be positive, "
                             "max_replicas at least 2")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.aggregate, self.max_replicas = aggregate, max_replicas
        self.backends, self.counters = backends, counters
        self.node_id, self.key = node_id, key
        self.interval, self.max_distance = interval, max_distance
        self.find_replicas = find_replicas
        self.max_concurrent, self.avoid_rounds = max_concurrent, avoid_rounds
        self.stall_timeout, self.min_bytes_per_second = stall_timeout, min_bytes_per_second
        self.avoided: dict[tuple[str, str], float] = {}  # (endpoint, uid) -> time.monotonic() until
        self.num_rounds = self.num_averaged = self.num_refused = self.num_failed = 0
        self.last_round: dict[str, Averaged] = {}

    @classmethod
    def for_node(cls, backends: Mapping[str, ExpertBackend], counters: Mapping[str, ExpertCounters],
                 dht: DHTPeer, *, node_id: str, key: SwarmKey | None, interval: float,
                 max_distance: float, aggregate: str = "mean") -> ReplicaAverager:
        """The averager of a node: replicas are found in the node's DHT peer."""
        return cls(backends, counters, node_id=node_id, key=key, interval=interval, max_distance=max_distance,
                   find_replicas=lambda uids: find_experts(dht, uids), aggregate=aggregate)

    async def run(self) -> None:
        """A round every interval (randomised), until cancelled; a failed round is logged and skipped."""
        while True:
            await asyncio.sleep(self.interval * random.uniform(1 - JITTER, 1 + JITTER))
            try:
                await self.round()
            except Exception:
                logger.exception("replica averaging round failed; will retry")

    async def round(self) -> dict[str, Averaged]:
        """Blend each expert that has a live replica elsewhere with one of them; returns what was blended."""
        uids = list(self.backends)
        found = await asyncio.to_thread(self.find_replicas, uids)
        now = time.monotonic()
        self.avoided = {k: until for k, until in self.avoided.items() if until > now}
        gate = asyncio.Semaphore(self.max_concurrent)
        chosen: dict[str, list[ExpertRecord]] = {}
        for uid in uids:
            candidates = [r for r in replicas_of(found.get(uid)) if self._eligible(uid, r)]
            if self.aggregate == "centered-clip" and len(candidates) >= 2:
                chosen[uid] = random.sample(candidates, min(self.max_replicas, len(candidates)))
            elif candidates:
                chosen[uid] = [random.choice(candidates)]

        async def average(uid: str, records: list[ExpertRecord]) -> Averaged | None:
            async with gate:
                if uid not in self.backends:  # the node stopped hosting it meanwhile
                    return None
                if len(records) == 1:
                    return await self.average_with(uid, records[0])
                return await self.average_robustly(uid, records)

        results = await asyncio.gather(*(average(uid, records) for uid, records in chosen.items()))
        self.last_round = {result.uid: result for result in results if result is not None}
        self.num_rounds += 1
        if self.last_round:
            done = self.last_round.values()
            logger.info("averaged %d experts with their replicas: spread up to %.3g, %.1f MB in %.2fs",
                        len(done), max(a.spread for a in done), sum(a.num_bytes for a in done) / 1e6,
                        max(a.fetch_seconds + a.blend_seconds for a in done))
        return self.last_round

    def _eligible(self, uid: str, record: ExpertRecord) -> bool:
        return (record.uid == uid and record.node_id != self.node_id and bool(record.dial_endpoint)
                and uid in self.backends and record.expert_cls in ("", self.backends[uid].expert_cls)
                and (record.dial_endpoint, uid) not in self.avoided)

    async def _fetch(self, uid: str, record: ExpertRecord, backend: ExpertBackend) -> ExpertState | None:
        """``record``'s module state of ``uid`` (checked against ``backend``); None if refused or failed."""
        endpoint = record.dial_endpoint
        num_bytes = sum(math.prod(shape) * DTYPES[dtype].itemsize
                        for shape, dtype in backend.state_schema(optimizer=False).values())
        try:
            return await fetch_expert_state(
                endpoint, uid, key=self.key, tls=record.tls, expect=backend, optimizer=False,
                timeout=call_timeout(num_bytes, stall_timeout=self.stall_timeout,
                                     min_bytes_per_second=self.min_bytes_per_second),
                stall_timeout=self.stall_timeout)
        except StateRefused as e:
            self._refuse(uid, endpoint, e)
        except TransferError as e:
            self.num_failed += 1
            self.avoided[endpoint, uid] = time.monotonic() + 1.5 * self.interval  # skip it next round too
            logger.info("%s: could not fetch the replica at %s (%s); trying again later", uid, endpoint,
                        printable(e))
        return None

    async def average_robustly(self, uid: str, records: list[ExpertRecord]) -> Averaged | None:
        """Fetch ``records``' parameters of ``uid`` (at once) and move ours to the CenteredClip of ours
        and theirs (:func:`blend_robust`); None if all were refused or failed."""
        backend = self.backends[uid]
        states = await asyncio.gather(*(self._fetch(uid, record, backend) for record in records))
        fetched = {r.dial_endpoint: state for r, state in zip(records, states) if state is not None}
        if not fetched:
            return None
        started = time.perf_counter()
        spread, refused = await asyncio.to_thread(
            blend_robust, backend, {e: state.parameters for e, state in fetched.items()}, self.max_distance)
        for endpoint, reason in refused.items():
            self._refuse(uid, endpoint, reason)
        if spread is None:
            return None
        used = [e for e in fetched if e not in refused]
        averaged = Averaged(uid=uid, endpoint=", ".join(used), spread=spread,
                            num_bytes=sum(fetched[e].num_bytes for e in used),
                            fetch_seconds=max(fetched[e].seconds for e in used),
                            blend_seconds=time.perf_counter() - started, at=time.time())
        self._record(averaged)
        return averaged

    def _record(self, averaged: Averaged) -> None:
        counters = self.counters.get(averaged.uid)
        if counters is not None:  # on the event loop, as every update of the counters
            counters.spread, counters.averaged_at = averaged.spread, averaged.at
        self.num_averaged += 1
        logger.debug("%s: blended with the replica(s) at %s (spread %.3g)",
                     averaged.uid, averaged.endpoint, averaged.spread)

    async def average_with(self, uid: str, record: ExpertRecord) -> Averaged | None:
        """Fetch ``record``'s parameters of ``uid`` and blend them into ours; None if refused or failed."""
        backend, endpoint = self.backends[uid], record.dial_endpoint
        state = await self._fetch(uid, record, backend)
        if state is None:
            return None
        started = time.perf_counter()
        try:
            spread = await asyncio.to_thread(blend, backend, state.parameters, self.max_distance)
        except Refused as e:
            self._refuse(uid, endpoint, e)
            return None
        averaged = Averaged(uid=uid, endpoint=endpoint, spread=spread, num_bytes=state.num_bytes,
                            fetch_seconds=state.seconds, blend_seconds=time.perf_counter() - started,
                            at=time.time())
        self._record(averaged)
        return averaged

    def _refuse(self, uid: str, endpoint: str, reason: Exception) -> None:
        self.num_refused += 1
        self.avoided[endpoint, uid] = time.monotonic() + self.avoid_rounds * self.interval
        logger.warning("%s: refused the parameters of the replica at %s (%s); avoiding it for %.0fs",
                       uid, endpoint, printable(reason), self.avoid_rounds * self.interval)


def blend(backend: ExpertBackend, theirs: Mapping[str, torch.Tensor], max_distance: float) -> float:
    """Move ``backend``'s module state halfway to ``theirs`` (floating-point entries only), if
    :func:`check_contribution` accepts it against a copy of ours; returns the spread (Refused if
    not accepted, changing nothing). Takes the expert's lock twice, for the copy and for the blend."""
    with backend.lock:
        ours = {name: value.detach().to("cpu", copy=True)
                for name, value in backend.module.state_dict().items()}
    spread = check_contribution(ours, theirs, max_distance=max_distance)
    steps = {name: ((theirs[name] - value) / 2).to(backend.device)
             for name, value in ours.items() if value.is_floating_point()}
    with backend.lock, torch.no_grad():
        state = backend.module.state_dict()
        for name, step in steps.items():
            state[name].add_(step)
    return spread


def blend_robust(backend: ExpertBackend, replicas: Mapping[str, Mapping[str, torch.Tensor]],
                 max_distance: float) -> tuple[float | None, dict[str, Refused]]:
    """Move ``backend``'s module state (floating-point entries) to the CenteredClip of it and the
    ``replicas``' states (endpoint -> state) that :func:`check_contribution` accepts against a copy of
    ours; with one accepted, halfway to it (as :func:`blend`); with none, nowhere. Returns the median
    spread of the accepted replicas (None if none) and the refused ones (endpoint -> reason). Takes the
    expert's lock twice, for the copy and for the move."""
    with backend.lock:
        ours = {name: value.detach().to("cpu", copy=True)
                for name, value in backend.module.state_dict().items()}
    accepted: list[Mapping[str, torch.Tensor]] = []
    spreads: list[float] = []
    refused: dict[str, Refused] = {}
    for endpoint, theirs in replicas.items():
        try:
            spreads.append(check_contribution(ours, theirs, max_distance=max_distance))
            accepted.append(theirs)
        except Refused as e:
            refused[endpoint] = e
    if not accepted:
        return None, refused
    steps = {}
    for name, value in ours.items():
        if value.is_floating_point():
            points = [value, *(theirs[name].to(value.dtype) for theirs in accepted)]
            target = (points[0] + points[1]) / 2 if len(points) == 2 else centered_clip(points)
            steps[name] = (target - value).to(backend.device)
    with backend.lock, torch.no_grad():
        state = backend.module.state_dict()
        for name, step in steps.items():
            state[name].add_(step)
    return float(torch.tensor(spreads).median()), refused
