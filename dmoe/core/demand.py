"""Demand for experts: what trainers' gates route to them, published in the DHT, and how well the
replicas' throughput covers it.

Records. Each trainer publishes, per grid prefix (``lm0``), the tokens per second its gates routed to
each expert of the grid, an exponential moving average (:class:`DemandMeter`), under the key
``_dmoe.demand.<prefix>`` (:func:`demand_key`) and the owned subkey ``@ed25519:<owner>`` of its DHT
peer (:mod:`dmoe.core.owner`: one signed entry per trainer, nobody else can overwrite it). The value
is a :class:`DemandRecord`: the grid, and the rates as float32, dense (every expert in flat grid
order) or sparse (uint16 flat indices of the experts with a positive rate, then their rates), whichever
is smaller (no indices and one rate per expert: dense; no indices and no rates: all zero): 16 KiB at
most for the 4096 experts of a 64x64 grid. A record expires ``DEMAND_TTL`` after it is stored, and
:class:`DemandPublisher` stores it again every ``interval`` seconds (randomised by +-20%, so trainers
started together do not store together).

Readers (:func:`find_demand`) keep a record only if it is owned, unexpired and well formed: the grid at
most ``MAX_GRID_EXPERTS`` experts, indices strictly increasing and within the grid, every rate finite,
non-negative and at most ``MAX_TOKENS_PER_S``; :func:`total_demand` sums the trainers' rates per uid.

Coverage. A replica's throughput is what its node measured at start (``NodeRecord.throughput``: one
expert's routed tokens/s, forward and backward) shared by the experts it hosts
(:func:`per_expert_throughput`); from a node that published none it is estimated from the load it
served (:class:`dmoe.core.records.ExpertLoad`, :func:`replica_throughput`): tokens per call over the
median time to serve a call, in routed tokens (a trained token costs a forward and a backward).
:func:`coverage` puts the two together per uid: demand, throughput and their ratio (demand /
throughput: above 1, the replicas cannot keep up; infinite for demand that no replica serves). The
placement of nodes (:mod:`dmoe.core.placement`) and ``dmoe swarm status --experts`` use it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from hivemind.dht import DHTNode
from hivemind.utils import get_dht_time

from dmoe.core import recordrules as rules
from dmoe.core.dht import DHTPeer
from dmoe.core.owner import MAX_RECORD_TTL, owned_subkey
from dmoe.core.recordguard import owner_of
from dmoe.core.records import RECORD_VERSION, NodeRecord, RuleBroken, _owned_records, _Record
from dmoe.core.uids import UID_DELIMITER

logger = logging.getLogger(__name__)

DEMAND_KEY_PREFIX = "_dmoe.demand."
MAX_GRID_EXPERTS = 65536  # experts of one grid a demand record may describe (uint16 indices)
MAX_GRID_DIMS = 8
MAX_TOKENS_PER_S = 1e9  # the most tokens/s a record may say one expert gets
DEFAULT_INTERVAL = 30.0  # seconds between a trainer's publications
MAX_INTERVAL = 120.0  # the longest (with its jitter, below DEMAND_TTL)
DEFAULT_TIME_CONSTANT = 60.0  # seconds: the moving average's time constant
DEMAND_TTL = 150.0  # seconds a record lives after it is stored (several intervals: a missed one is no gap)
DEFAULT_THROUGHPUT = 1000.0  # routed tokens/s assumed for a replica when none has been measured in the swarm
_JITTER = 0.2  # publication intervals vary by this fraction either way


def demand_key(prefix: str) -> str:
    """The DHT key of the demand records of grid prefix ``prefix``."""
    return f"{DEMAND_KEY_PREFIX}{prefix}"


def uid_of(prefix: str, grid: Sequence[int], index: int) -> str:
    """The uid of the expert at flat index ``index`` (row-major) of ``grid``: lm0, (4, 4), 6 -> lm0.1.2."""
    coords = np.unravel_index(index, tuple(grid))
    return ".".join([prefix, *(str(int(c)) for c in coords)])


def check_grid(grid: Sequence[int]) -> int:
    """The number of experts of ``grid``; ValueError if it is no grid a demand record may describe."""
    if not 1 <= len(grid) <= MAX_GRID_DIMS or any(not isinstance(s, int) or s < 1 for s in grid):
        raise ValueError(f"a grid is 1 to {MAX_GRID_DIMS} positive sizes, got {list(grid)!r}"[:200])
    size = math.prod(grid)
    if size > MAX_GRID_EXPERTS:
        raise ValueError(f"a grid of {size} experts is more than the {MAX_GRID_EXPERTS} a record describes")
    return size


# ---- encoding ------------------------------------------------------------------------------------
def encode_rates(rates: np.ndarray) -> tuple[bytes, bytes]:
    """(indices, rates) of a flat array of tokens/s: dense (no indices) or sparse, whichever is smaller.
    Rates are clipped to [0, MAX_TOKENS_PER_S]; NaN counts as 0."""
    rates = np.nan_to_num(np.asarray(rates, dtype=np.float64), nan=0.0, posinf=MAX_TOKENS_PER_S)
    rates = np.clip(rates, 0.0, MAX_TOKENS_PER_S)
    if rates.size > MAX_GRID_EXPERTS:
        raise ValueError(f"{rates.size} experts: more than {MAX_GRID_EXPERTS}")
    positive = np.flatnonzero(rates > 0)
    if positive.size * 6 >= rates.size * 4:
        return b"", rates.astype("<f4").tobytes()
    return positive.astype("<u2").tobytes(), rates[positive].astype("<f4").tobytes()


def decode_rates(size: int, indices: bytes, rates: bytes) -> np.ndarray:
    """The flat array (float64, ``size`` experts) that :func:`encode_rates` encoded; ValueError (saying
    why) for anything it cannot have made or that breaks the bounds of the module docstring."""
    if len(rates) % 4 or len(indices) % 2:
        raise ValueError("rates must be float32 and indices uint16")
    values = np.frombuffer(rates, dtype="<f4").astype(np.float64)
    if not indices and values.size == size:
        flat = values
    else:
        where = np.frombuffer(indices, dtype="<u2").astype(np.int64)
        if where.size != values.size:
            raise ValueError(f"{where.size} indices for {values.size} rates")
        if where.size > size or (where.size and int(where[-1]) >= size):
            raise ValueError(f"an index is outside the grid of {size} experts")
        if np.any(np.diff(where) <= 0):
            raise ValueError("indices must be strictly increasing")
        flat = np.zeros(size)
        flat[where] = values
    if not np.all(np.isfinite(values)):
        raise ValueError("a rate is not finite")
    if values.size and (values.min() < 0 or values.max() > MAX_TOKENS_PER_S):
        raise ValueError(f"a rate is outside [0, {MAX_TOKENS_PER_S:g}] tokens/s")
    return flat


class DemandRecord(_Record):
    """One trainer's demand for the experts of one grid prefix (see the module docstring)."""
    prefix: str
    grid: list[int]
    indices: bytes = b""  # uint16 flat indices of the rates (none and every expert's rate: dense)
    rates: bytes  # float32 tokens/s
    updated_at: float = 0.0  # the trainer's wall clock when it made the record
    time_constant: float = DEFAULT_TIME_CONSTANT  # of its moving average, seconds
    owner: str = ""
    record_version: int = RECORD_VERSION

    _BOUNDS = {"updated_at": (0.0, rules.MAX_TIME), "time_constant": (0.0, rules.MAX_TIME)}

    def as_peers_may_say(self) -> DemandRecord:
        super().as_peers_may_say()
        if UID_DELIMITER in self.prefix or rules.check_uid(f"{self.prefix}.0") is not None:
            raise RuleBroken("prefix", f"prefix {self.prefix[:80]!r} is not a grid prefix")
        try:
            decode_rates(check_grid(self.grid), self.indices, self.rates)
        except ValueError as e:
            raise RuleBroken("rates", str(e)) from None
        return self

    @classmethod
    def make(cls, prefix: str, grid: Sequence[int], rates: np.ndarray, *, updated_at: float | None = None,
             time_constant: float = DEFAULT_TIME_CONSTANT) -> DemandRecord:
        if np.asarray(rates).size != check_grid(list(grid)):
            raise ValueError(f"{np.asarray(rates).size} rates for the grid {list(grid)}")
        indices, values = encode_rates(rates)
        return cls(prefix=prefix, grid=list(grid), indices=indices, rates=values,
                   updated_at=time.time() if updated_at is None else updated_at, time_constant=time_constant)

    def flat_rates(self) -> np.ndarray:
        """Tokens/s per expert, in flat (row-major) grid order."""
        return decode_rates(check_grid(self.grid), self.indices, self.rates)

    def by_uid(self) -> dict[str, float]:
        """Tokens/s per uid, for the experts with a positive rate."""
        flat = self.flat_rates()
        return {uid_of(self.prefix, self.grid, int(i)): float(flat[i]) for i in np.flatnonzero(flat > 0)}


# ---- the moving average --------------------------------------------------------------------------
class DemandMeter:
    """Exponential moving average of tokens/s per expert of a grid, from cumulative routed-token counts.

    :meth:`update` takes the counts so far (they only grow) and the time; the rate over the time since
    the last update enters the average with weight ``1 - exp(-dt / time_constant)``, so the average does
    not depend on how often it is updated. Until a few time constants have passed the average is
    divided by the weight it has gathered (as Adam corrects its moments), so a steady rate reads as
    itself from the first update instead of climbing up from zero."""

    def __init__(self, num_experts: int, *, time_constant: float = DEFAULT_TIME_CONSTANT,
                 now: float | None = None):
        if time_constant <= 0:
            raise ValueError("time_constant must be positive")
        self.time_constant = time_constant
        self._average = np.zeros(num_experts)
        self._last_counts = np.zeros(num_experts, dtype=np.int64)
        self._last_time = self._start = time.monotonic() if now is None else now

    def update(self, counts: np.ndarray, now: float | None = None) -> np.ndarray:
        """Take the cumulative counts at time ``now`` (monotonic seconds); the rates (tokens/s)."""
        now = time.monotonic() if now is None else now
        counts = np.asarray(counts, dtype=np.int64)
        dt = now - self._last_time
        if dt > 0:
            rate = np.maximum(counts - self._last_counts, 0) / dt
            self._average += -math.expm1(-dt / self.time_constant) * (rate - self._average)
            self._last_counts, self._last_time = counts.copy(), now
        return self.rates()

    def rates(self) -> np.ndarray:
        gathered = -math.expm1(-(self._last_time - self._start) / self.time_constant)
        return self._average / gathered if gathered > 0 else np.zeros_like(self._average)


# ---- publishing ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Source:
    grid: tuple[int, ...]
    counts: list[Callable[[], np.ndarray]]  # each: cumulative routed tokens per flat index
    meter: DemandMeter


class DemandPublisher:
    """Publishes a trainer's demand: per grid prefix, the moving average of the tokens/s routed to each
    expert by the layers added with :meth:`add` (layers of one prefix are summed), every ``interval``
    seconds (+-20%) on ``peer``'s event loop, owned and signed by the peer's owner key."""

    def __init__(self, peer: DHTPeer, *, interval: float = DEFAULT_INTERVAL,
                 time_constant: float = DEFAULT_TIME_CONSTANT, ttl: float = DEMAND_TTL):
        if not 0 < interval <= MAX_INTERVAL or not interval * (1 + _JITTER) < ttl < MAX_RECORD_TTL:
            raise ValueError(f"need 0 < interval <= {MAX_INTERVAL:.0f} and interval * {1 + _JITTER:g} < ttl "
                             f"< {MAX_RECORD_TTL:.0f} (a record outlives the wait for the next one), got "
                             f"interval={interval}, ttl={ttl}")
        self.peer, self.interval, self.time_constant, self.ttl = peer, interval, time_constant, ttl
        self.num_published = 0
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()
        self._future: Any = None

    def add(self, prefix: str, grid: Sequence[int], counts: Callable[[], np.ndarray]) -> None:
        """Publish the demand of a layer whose cumulative routed tokens per expert ``counts()`` returns
        (flat, row-major over ``grid``)."""
        grid = tuple(grid)
        with self._lock:
            source = self._sources.get(prefix)
            if source is None:
                self._sources[prefix] = _Source(grid, [counts], DemandMeter(
                    check_grid(grid), time_constant=self.time_constant))
            elif source.grid != grid:
                raise ValueError(f"prefix {prefix!r} has grid {source.grid} here already, not {grid}")
            else:
                source.counts.append(counts)

    def records(self, now: float | None = None) -> list[DemandRecord]:
        """The records to publish now (this updates the moving averages)."""
        with self._lock:
            sources = list(self._sources.items())
        found = []
        for prefix, source in sources:
            counts = sum(np.asarray(c(), dtype=np.int64) for c in source.counts)
            rates = source.meter.update(counts, now)
            found.append(DemandRecord.make(prefix, source.grid, rates, time_constant=self.time_constant))
        return found

    async def publish_async(self) -> int:
        """Store the records now (on the peer's loop); how many were accepted."""
        records = self.records()
        if not records:
            return 0
        owner = owner_of(self.peer.node).owner_id
        subkey = owned_subkey("", owner)
        expiration = get_dht_time() + self.ttl
        stored = await self.peer.node.store_many(
            [demand_key(r.prefix) for r in records], [_owned_value(r, owner) for r in records], expiration,
            subkeys=[subkey] * len(records))
        self.num_published += 1
        return sum(bool(v) for v in stored.values())

    def publish(self, timeout: float | None = 30.0) -> int:
        """:meth:`publish_async`, blocking."""
        return self.peer.run(self.publish_async(), timeout)

    def start(self) -> DemandPublisher:
        """Publish every ``interval`` (+-20%) until :meth:`stop` or the peer's shutdown."""
        if self._future is None:
            self._future = asyncio.run_coroutine_threadsafe(self._loop(), self.peer.loop)
        return self

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(1 - _JITTER, 1 + _JITTER))
            try:
                stored = await self.publish_async()
                if not stored:
                    logger.warning("no DHT peer accepted this trainer's demand records; will retry")
            except Exception:
                logger.exception("publishing demand failed; will retry")

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
            self._future = None


def _owned_value(record: DemandRecord, owner: str) -> dict[str, Any]:
    value = record.model_dump()
    value["owner"] = owner
    return value


# ---- reading -------------------------------------------------------------------------------------
async def find_demand_async(node: DHTNode, prefixes: Iterable[str]) -> dict[str, dict[str, DemandRecord]]:
    """For each prefix, the live demand records of every trainer (by owner id) that published one."""
    keys = {demand_key(p): p for p in dict.fromkeys(prefixes)}
    if not keys:
        return {}
    found = await node.get_many(list(keys), sufficient_expiration_time=float("inf"))
    now = get_dht_time()
    result: dict[str, dict[str, DemandRecord]] = {}
    for key, prefix in keys.items():
        entry = found.get(key)
        records = _owned_records(None if entry is None else entry.value, DemandRecord, now)
        result[prefix] = {r.owner: r for name, r, _ in records if name == "" and r.prefix == prefix}
    return result


def find_demand(peer: DHTPeer, prefixes: Iterable[str], timeout: float | None = None
                ) -> dict[str, dict[str, DemandRecord]]:
    """:func:`find_demand_async`, blocking."""
    assert peer.node is not None, "start the DHT peer first"
    return peer.run(find_demand_async(peer.node, list(prefixes)), timeout)


def total_demand(records: Iterable[DemandRecord]) -> dict[str, float]:
    """Tokens/s per uid, summed over the trainers' records (uids no one routes to are left out)."""
    total: dict[str, float] = {}
    for record in records:
        for uid, rate in record.by_uid().items():
            total[uid] = total.get(uid, 0.0) + rate
    return total


def grid_uids(records: Iterable[DemandRecord]) -> list[str]:
    """Every uid of the grids the records describe (the experts a trainer may route to), sorted."""
    uids: set[str] = set()
    for record in records:
        uids.update(uid_of(record.prefix, record.grid, i) for i in range(check_grid(record.grid)))
    return sorted(uids)


# ---- coverage ------------------------------------------------------------------------------------
def replica_throughput(forward_calls: int, backward_calls: int, tokens: int, latency_p50_ms: float
                       ) -> float | None:
    """Routed tokens/s one replica can serve, from its node's published load (ExpertLoad's fields):
    tokens per call over the median time to serve a call, divided by the calls each routed token
    costs (1 + backward calls per forward call: a trained token is served forward and backward).
    None before the replica has served a call."""
    calls = forward_calls + backward_calls
    if forward_calls <= 0 or tokens <= 0 or latency_p50_ms <= 0:
        return None
    per_call = tokens / calls / (latency_p50_ms / 1000.0)
    return per_call / (calls / forward_calls)


def per_expert_throughput(record: NodeRecord) -> float | None:
    """Routed tokens/s one expert of a node serves when all its experts are busy: the throughput the
    node measured at start (one expert, forward and backward) shared by the experts it hosts; None when
    it published none."""
    if record.throughput <= 0:
        return None
    return record.throughput / max(1, len(set(record.experts)))


def replica_throughputs(nodes: Mapping[str, NodeRecord], default: float | None = None, *,
                        exclude: str | None = None) -> dict[str, list[float]]:
    """Per uid, the throughput (routed tokens/s) of each replica the live node records list (but node
    ``exclude``'s): what its node measured (:func:`per_expert_throughput`), else an estimate from the load
    it served (:func:`replica_throughput`); a replica with neither counts as ``default``, or the median of
    the others, or ``DEFAULT_THROUGHPUT`` when there is none."""
    measured: dict[str, list[float | None]] = {}
    for name, record in nodes.items():
        if exclude is not None and exclude in (name, record.node_id):
            continue
        share = per_expert_throughput(record)
        for uid in dict.fromkeys(record.experts):
            load = record.load.get(uid)
            if share is None and load is not None:
                share_or_load = replica_throughput(load.forward_calls, load.backward_calls, load.tokens,
                                                   load.latency_p50_ms)
            else:
                share_or_load = share
            measured.setdefault(uid, []).append(share_or_load)
    known = [t for ts in measured.values() for t in ts if t is not None]
    if default is None:
        default = statistics.median(known) if known else DEFAULT_THROUGHPUT
    return {uid: [default if t is None else t for t in ts] for uid, ts in measured.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class Coverage:
    uid: str
    demand: float  # routed tokens/s, all trainers together
    throughput: float  # routed tokens/s its replicas can serve together
    num_replicas: int
    ratio: float  # demand / throughput: > 1 overloaded; inf: demand and no replica; 0: no demand

    @property
    def uncovered(self) -> bool:
        """No replica at all (whatever the demand)."""
        return self.num_replicas == 0


def coverage(demand: Mapping[str, float], replicas: Mapping[str, Sequence[float]], uids: Iterable[str] = ()
             ) -> dict[str, Coverage]:
    """Per uid of ``demand``, ``replicas`` and ``uids`` (sorted): its demand (tokens/s), the summed
    throughput of its replicas (tokens/s each, as :func:`replica_throughputs` gives them) and their
    ratio (see :class:`Coverage`). Negative or non-finite inputs count as 0."""
    result = {}
    for uid in sorted({*demand, *replicas, *uids}):
        wanted = _rate(demand.get(uid, 0.0))
        served = [_rate(t) for t in replicas.get(uid, ())]
        throughput = sum(served)
        ratio = wanted / throughput if throughput > 0 else (math.inf if wanted > 0 else 0.0)
        result[uid] = Coverage(uid=uid, demand=wanted, throughput=throughput, num_replicas=len(served),
                               ratio=ratio)
    return result


def _rate(value: float) -> float:
    return float(value) if math.isfinite(value) and value > 0 else 0.0
