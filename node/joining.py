"""A starting node's experts take the state of their live replicas: :func:`take_live_states`.

A node that starts hosting a uid alive on other nodes (find_experts finds replicas there) downloads
the expert's parameters, optimizer state and version from one of them (:mod:`dmoe.node.transfer`)
before it announces the uid, so that it joins as a replica of the trained expert, not as a fresh
one. A node restarted from its own checkpoint takes a replica's state only if that is newer (more
optimizer steps). With no live replica, or none whose state passes the checks in time, an expert
starts from its checkpoint, else from its uid's seed, as it did before state transfer.

Downloads run concurrently (a bound on how many at once) under one deadline for the whole step,
and each replica's call under a deadline sized by the state's bytes and a bound on silence, so a
slow or hostile replica costs a bounded delay and is then passed over for the next.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from dmoe.core.auth import SwarmKey
from dmoe.core.logsafe import printable
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import DTYPES
from dmoe.errors import CheckpointError, ConfigError
from dmoe.node.backend import ExpertBackend
from dmoe.node.transfer import (
    DEFAULT_STALL_TIMEOUT,
    NotNewer,
    ReplicaBusy,
    TransferError,
    call_timeout,
    fetch_expert_state,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclasses.dataclass(kw_only=True, slots=True)
class TransferPolicy:
    """How long and how widely a starting node looks for its experts' live state."""

    max_concurrent: int = 4  # experts downloaded at once
    deadline: float = 120.0  # seconds for the whole step; experts without a state by then start without
    lookup_timeout: float = 20.0  # seconds the DHT lookup of the replicas may take
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds without a message before a replica is given up
    min_bytes_per_second: float = 1 * MiB  # slowest replica waited for: its call gets the state's bytes
    # at this rate, and stall_timeout twice (transfer.call_timeout)
    max_replicas_tried: int = 3  # per expert
    # a replica busy with other joiners' transfers (RESOURCE_EXHAUSTED) is asked again this many times,
    # after pauses of busy_pause x (1..2) x attempt seconds, before the next replica is tried
    busy_retries: int = 6
    busy_pause: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "deadline", "lookup_timeout", "stall_timeout", "min_bytes_per_second",
                     "max_replicas_tried", "busy_pause"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.busy_retries < 0:
            raise ConfigError(f"busy_retries must be >= 0, got {self.busy_retries}")


@dataclasses.dataclass(kw_only=True, slots=True)
class Transferred:
    """What one expert took from a replica at start-up."""

    endpoint: str
    version: int
    num_bytes: int
    seconds: float


def replicas_of(found: ExpertRecord | Sequence[ExpertRecord] | None) -> list[ExpertRecord]:
    """find_experts' value for a uid as a list: one record (older records module) or a list of replicas."""
    if found is None:
        return []
    return [found] if isinstance(found, ExpertRecord) else list(found)


async def take_live_states(
    backends: Mapping[str, ExpertBackend],
    find_replicas: Callable[[list[str]], Awaitable[Mapping[str, Any]]],
    *,
    node_id: str,
    key: SwarmKey | None,
    local_versions: Mapping[str, int],
    policy: TransferPolicy,
) -> dict[str, Transferred]:
    """Give each expert of ``backends`` that is alive on another node the state of a live replica.

    ``find_replicas(uids)`` returns find_experts' answer (a record or a list of records per uid).
    An expert restored from its own checkpoint (``local_versions``: uid -> version) takes only a
    state of a higher version; one that was not restored takes any replica's. Replicas are tried
    in order of their announced version (highest first), at most ``policy.max_replicas_tried`` per
    expert; one that fails, is too slow or sends a state that fails a check is logged and the next
    tried. At most ``policy.max_concurrent`` experts download at once, and nothing starts or waits
    past ``policy.deadline``: an expert without a replica's state keeps its own (checkpoint or seed).
    Returns what each expert took, by uid."""
    deadline = time.monotonic() + policy.deadline
    uids = list(backends)
    try:
        found = await asyncio.wait_for(find_replicas(uids), min(policy.lookup_timeout, policy.deadline))
    except Exception as e:  # noqa: BLE001 - no lookup: start as if alone, as before state transfer
        logger.warning("could not look up live replicas (%s: %s): experts start from their checkpoint "
                       "or seed", type(e).__name__, printable(e))
        return {}
    gate = asyncio.Semaphore(policy.max_concurrent)
    taken: dict[str, Transferred] = {}

    async def take(uid: str, backend: ExpertBackend, replicas: list[ExpertRecord]) -> None:
        async with gate:
            for record in replicas[: policy.max_replicas_tried]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("%s: no time left to take its state (deadline %gs); it keeps its own",
                                   uid, policy.deadline)
                    return
                for attempt in range(policy.busy_retries + 1):
                    try:
                        result = await _take_from(uid, backend, record, key=key,
                                                  newer_than=local_versions.get(uid),
                                                  timeout=deadline - time.monotonic(), policy=policy)
                    except ReplicaBusy as e:  # serving other joiners: ask it again after a pause
                        pause = policy.busy_pause * (1 + random.random()) * (attempt + 1)
                        if attempt == policy.busy_retries or time.monotonic() + pause >= deadline:
                            logger.warning("%s: the replica at %s stayed busy: %s", uid,
                                           record.dial_endpoint, printable(e))
                            break
                        await asyncio.sleep(pause)
                        continue
                    if result is not None:
                        taken[uid] = result
                        return
                    break

    tasks, alive_elsewhere = [], []
    for uid, backend in backends.items():
        replicas = sorted(
            (r for r in replicas_of(found.get(uid)) if r.node_id != node_id and r.dial_endpoint
             and r.uid == uid and r.expert_cls in ("", backend.expert_cls)),
            key=lambda r: (-r.version, r.queued_tokens))
        if replicas:
            tasks.append(take(uid, backend, replicas))
            alive_elsewhere.append(uid)
    await asyncio.gather(*tasks)
    for uid in alive_elsewhere:
        if uid not in taken and local_versions.get(uid) is None:
            logger.warning("%s is alive on other nodes but took no replica's state: it starts from its seed "
                           "(version 0)", uid)
    return taken


async def _take_from(uid: str, backend: ExpertBackend, record: ExpertRecord, *, key: SwarmKey | None,
                     newer_than: int | None, timeout: float, policy: TransferPolicy) -> Transferred | None:
    endpoint = record.dial_endpoint
    expected_bytes = sum(math.prod(shape) * DTYPES[dtype].itemsize
                         for shape, dtype in backend.state_schema().values())
    timeout = min(timeout, call_timeout(expected_bytes, stall_timeout=policy.stall_timeout,
                                        min_bytes_per_second=policy.min_bytes_per_second))
    try:
        state = await fetch_expert_state(endpoint, uid, key=key, tls=record.tls, timeout=timeout,
                                         expect=backend, newer_than=newer_than,
                                         stall_timeout=policy.stall_timeout)
        await asyncio.to_thread(state.load_into, backend)
    except ReplicaBusy:
        raise
    except NotNewer as e:
        logger.info("%s: the replica at %s is at version %d, not newer than this node's checkpoint (%d)",
                    uid, endpoint, e.version, newer_than)
        return None
    except (TransferError, CheckpointError) as e:
        logger.warning("%s: not taking the state of the replica at %s: %s", uid, endpoint, printable(e))
        return None
    logger.info("%s: took the state of the replica at %s: version %d, %d bytes in %.2fs", uid, endpoint,
                state.version, state.num_bytes, state.seconds)
    return Transferred(endpoint=endpoint, version=state.version, num_bytes=state.num_bytes,
                       seconds=state.seconds)
