"""A node's side of placement by demand (:mod:`dmoe.core.placement`): its budget, its throughput,
the picture of the swarm it plans with, and the loop that moves its experts.

Budget (:func:`memory_budget`): the experts that fit in ``--memory-fraction`` of the memory free at
start (the device's on a GPU, RAM on a CPU), each counted as its parameters, their gradients and the
optimizer's state (two more copies for Adam, one for SGD), and at most ``--max-experts``.

Throughput (:func:`measure_throughput`): routed tokens/s one expert serves, forward then backward
with its optimizer step, measured at start on a scratch expert of the model's class and sizes (or
given: ``--throughput``, since a machine busy at start measures low); the node publishes it in its
record (``NodeRecord.throughput``) so that others plan with it too.

Rebalancing (:class:`Rebalancer`): every ``--heartbeat-interval`` (randomised by +-50%, so that nodes
do not move together) it reads the picture and gives a replica to any expert of the model that has
none; every ``--rebalance-interval`` (randomised the same way) it also makes one move for demand or
for an even spread, if :func:`dmoe.core.placement.plan_moves` finds one worth it. Of the nodes that
host a uid, one alone may drop it in a given 10 s of DHT time (:func:`designated_dropper`), so two
rarely drop it together; and a node checks again before it lets an expert go (below). A move adds the
new expert first (its state taken from a live replica: a move whose state cannot be had is not made)
and drops the old one only if another node answers for it then (:meth:`dmoe.node.node.Node.move_expert`);
a dropped expert is still served for a heartbeat and the clients' lookup cache after its records are
withdrawn, and if by then no other node answers for it (two nodes dropped it at once, or the other
died), the node keeps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable

import torch
from hivemind.utils import get_dht_time

from dmoe.core.demand import find_demand, replica_throughputs, total_demand
from dmoe.core.dht import DHTPeer
from dmoe.core.experts import sample_inputs
from dmoe.core.modelspec import ModelSpec
from dmoe.core.placement import Move, Picture, plan_moves
from dmoe.core.records import find_nodes
from dmoe.node.backend import ExpertBackend

logger = logging.getLogger(__name__)

OPTIMIZER_COPIES = {"adam": 2, "sgd": 1}  # tensors of optimizer state per parameter tensor
MEASURE_TOKENS = 256  # tokens per forward/backward when measuring throughput
_JITTER = 0.5
DROP_EPOCH = 10.0  # seconds: how long one node alone may drop a uid it shares with others


def expert_bytes(backend: ExpertBackend, optimizer: str) -> int:
    """Memory one expert like ``backend`` takes: parameters, gradients and the optimizer's state."""
    per_copy = sum(p.numel() * p.element_size() for p in backend.module.parameters())
    return per_copy * (2 + OPTIMIZER_COPIES.get(optimizer, 2))


def free_memory(device: torch.device) -> int:
    """Bytes free for experts: the device's free memory on a GPU; RAM available on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget(per_expert: int, free: int, fraction: float) -> int:
    """How many experts of ``per_expert`` bytes fit in ``fraction`` of ``free`` bytes."""
    return int(fraction * free // max(1, per_expert))


def measure_throughput(backend: ExpertBackend, tokens: int = MEASURE_TOKENS, min_runs: int = 5,
                       min_seconds: float = 0.2, max_runs: int = 100) -> float:
    """Routed tokens/s ``backend`` (a scratch expert: its parameters change) serves: ``tokens`` rows
    forward, then backward with an optimizer step; the fastest of at least ``min_runs`` runs over at
    least ``min_seconds`` (at most ``max_runs``), after a warm-up: a start-up beside other busy
    processes then still finds the time the expert itself needs."""
    inputs = sample_inputs(backend.input_schema, batch=tokens)
    grads = [torch.full_like(o, 1e-3) for o in backend.forward(inputs)]  # the warm-up
    best, runs, began = math.inf, 0, time.perf_counter()
    while runs < max_runs and (runs < min_runs or time.perf_counter() - began < min_seconds):
        started = time.perf_counter()
        backend.forward(inputs)
        backend.backward(inputs, grads)
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)
        best = min(best, time.perf_counter() - started)
        runs += 1
    return tokens / best


def read_picture(dht: DHTPeer, spec: ModelSpec, node_id: str | None) -> Picture:
    """The swarm as node ``node_id`` plans with it (blocking): the spec's uids, the trainers' demand on
    them, the throughput of every replica on other nodes, and the uids this node may drop this round
    (:func:`designated_dropper`)."""
    found = find_demand(dht, [grid.prefix for grid in spec.experts])
    demand = total_demand(record for records in found.values() for record in records.values())
    uids = tuple(spec.uids)
    nodes = find_nodes(dht)
    others = replica_throughputs(nodes, exclude=node_id)
    wanted = set(uids)
    hosts: dict[str, list[str]] = {}
    for name, record in nodes.items():
        for uid in dict.fromkeys(record.experts):
            hosts.setdefault(uid, []).append(record.node_id or name)
    epoch = int(get_dht_time() // DROP_EPOCH)
    droppable = frozenset(uid for uid, ids in hosts.items()
                          if node_id in ids and designated_dropper(uid, ids, epoch) == node_id)
    return Picture(uids=uids, demand={u: d for u, d in demand.items() if u in wanted},
                   others={u: t for u, t in others.items() if u in wanted}, droppable=droppable)


def designated_dropper(uid: str, node_ids: list[str], epoch: int) -> str:
    """Of the nodes hosting ``uid``, the one that may drop it in this epoch (``DROP_EPOCH`` seconds of
    DHT time): two nodes that plan at once never both drop it, and who may changes every epoch."""
    return max(node_ids, key=lambda n: hashlib.sha256(f"{uid}|{n}|{epoch}".encode()).digest())


class Rebalancer:
    """The loop that keeps a node's experts where they are needed (see the module docstring)."""

    def __init__(self, *, picture: Callable[[], Picture], hosted: Callable[[], list[str]],
                 move: Callable[[Move], Awaitable[bool]], own: float, check_interval: float,
                 rebalance_interval: float, threshold: float, rng: random.Random | None = None):
        """``picture``: reads the swarm (blocking; run on a thread); ``hosted``: this node's experts now;
        ``move``: makes one move, True if it did; ``own``: routed tokens/s of each of its experts."""
        self.picture, self.hosted, self.move = picture, hosted, move
        self.own, self.threshold = own, threshold
        self.check_interval, self.rebalance_interval = check_interval, rebalance_interval
        self.rng = rng or random.Random()
        self.num_checks = 0
        self.moves: list[Move] = []  # the moves made, in order
        self._next_rebalance = time.monotonic() + self._jittered(rebalance_interval)

    def _jittered(self, interval: float) -> float:
        return interval * self.rng.uniform(1 - _JITTER, 1 + _JITTER)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._jittered(self.check_interval))
            try:
                await self.check()
            except Exception:
                logger.exception("placement check failed; will retry")

    async def check(self) -> list[Move]:
        """Read the swarm and make the moves due now: every one that covers an expert with no
        replica, and (when a rebalance is due) one for demand or spread. Returns the moves made."""
        picture = await asyncio.to_thread(self.picture)
        hosted = self.hosted()
        self.num_checks += 1
        planned = plan_moves(picture, hosted, self.own, threshold=self.threshold,
                             max_moves=max(1, len(hosted)), rng=self.rng)
        due = [m for m in planned if m.reason == "uncovered"]
        if self.rebalance_interval > 0 and time.monotonic() >= self._next_rebalance:
            self._next_rebalance = time.monotonic() + self._jittered(self.rebalance_interval)
            if not due and planned:
                due = planned[:1]
        made = []
        for move in due:
            if await self.move(move):
                made.append(move)
        self.moves.extend(made)
        return made
