"""Swarm: a client's view of the swarm: a DHT peer, a cache of live experts, and endpoint health.

Lookups of live experts are cached for ``cache_ttl`` seconds, so a training step does not wait on
the DHT when nothing changed; for ``cache_grace`` seconds more (by default as long again) a cached
lookup is still used while a newer one runs in the background, so that steps taken one after another
never wait for the DHT once every key has been read. A read that a lookup waits for merges the copies of
a key held by the ``lookup_breadth`` DHT peers nearest it (where stores go), the reads in the background
those of every peer they reach: a record missing from the few nearest peers (a peer that joined since
its node's last store, before the node beats again for it) is found by the next background read. A lookup
that fails or takes longer than ``lookup_timeout`` (a peer
on the lookup's path frozen, the DHT cut off) leaves the last known experts in use, so a step's
time stays bounded by its deadlines. Endpoints that fail are backed off and experts that misbehave
are quarantined by the Swarm's :class:`dmoe.client.health.EndpointHealth` (that module states the
policy); lookups leave them out until their time is up. A uid may have several replicas (one per
hosting node): :meth:`Swarm.live_replicas_under` lists them all, and the Swarm's
:class:`dmoe.client.balance.ReplicaBalancer` (shared by its dispatchers) chooses between them.

A caller that knows the schema its experts must have (class, sizes, dtype:
:func:`dmoe.core.modelspec.expert_schema`; a RemoteMoE built with ``expert_schema``, as ``dmoe
train``'s are) passes it to the lookups: a replica whose node announced another schema is left out
(every call to it would fail on shapes, or worse, succeed with another expert), its node warned about
once and listed by :meth:`Swarm.skipped_nodes`; a record with no schema (a node older than schemas)
is kept.

A beam search over a grid of thousands of experts reads :meth:`Swarm.live_levels`: the same records
as :meth:`Swarm.live_replicas_under`, laid out by prefix key (the live coordinates, sorted, and their
replicas). The per-record work (schema, uid, one replica per endpoint) is done once per DHT read of a
key and kept with it; a lookup then costs a few set operations per key, and only a key with an
endpoint backed off or an expert quarantined is filtered record by record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple

from dmoe.client.balance import ReplicaBalancer
from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import Dispatcher
from dmoe.client.health import EndpointHealth
from dmoe.core.auth import load_key
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import DHTAuthorizer
from dmoe.core.logsafe import printable
from dmoe.core.records import ExpertRecord, find_under_prefixes_async

logger = logging.getLogger(__name__)

SKIPPED_WITHIN = 60.0  # seconds a node left out for its schema stays in Swarm.skipped_nodes()
MAX_SKIPPED_NODES = 1024  # nodes remembered at once (node ids are cheap to make): past it, left out unlogged


class LiveLevel(NamedTuple):
    """What a lookup finds under one grid prefix key (``ffn.3.``): the live next coordinates, sorted,
    and each one's replicas (see :meth:`Swarm.live_levels`). Shared with the Swarm's cache: read only.
    A pair, as :meth:`dmoe.moe.gating.MoELayer.beam_search` reads a level: (coordinates, handles)."""

    coords: list[int]
    replicas: list[list[ExpertRecord]]


_NO_LEVEL = LiveLevel(coords=[], replicas=[])


@dataclasses.dataclass(frozen=True, slots=True)
class _Prepared:
    """One cached key's records as a lookup with one schema reads them, before the endpoints' health:
    the level, every dial endpoint and uid in it (to tell whether the health touches it), and the
    replicas left out for their schema (noted again on every lookup, as :meth:`Swarm.of_schema` does)."""

    level: LiveLevel
    endpoints: frozenset[str]
    uids: frozenset[str]
    mismatched: tuple[ExpertRecord, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaMismatch:
    """A replica a lookup left out: its node serves ``uid`` as ``theirs``, the caller expects ``ours``
    (:func:`dmoe.core.modelspec.expert_schema`); ``seen``: when (monotonic seconds)."""

    node_id: str
    endpoint: str
    uid: str
    theirs: str
    ours: str
    seen: float


class Swarm:
    """Join with ``Swarm(initial_peers=[...])`` or ``Swarm(SwarmConfig(initial_peers=[...]))``; use as a
    context manager or start()/shutdown().

    Keyword fields are a shortcut for a :class:`dmoe.client.config.SwarmConfig` of those fields (as
    hivemind's ``DHT(initial_peers=...)``): give either a config or fields, not both; a field that
    SwarmConfig does not have is a TypeError. Nothing starts before start().

    The client's DHT peer is an in-process :class:`dmoe.core.dht.DHTPeer` (why not a forked
    ``hivemind.DHT``: see that module). Expert calls (:class:`dmoe.client.dispatch.Dispatcher`) run on
    the peer's background event loop too. ``health`` (:class:`dmoe.client.health.EndpointHealth`)
    holds the back-off and quarantine of endpoints; ``report``, ``report_failure``, ``report_success``,
    ``quarantine`` and ``quarantined`` pass on to it.
    """

    def __init__(self, config: SwarmConfig | None = None, **fields: Any):
        self.config = config = _config_of(config, fields)
        config.require_peers()  # a client joins a swarm: it never starts one of its own
        self.key = load_key(config.swarm_key)
        authorizer = DHTAuthorizer(self.key) if self.key else None
        self.peer = DHTPeer(initial_peers=config.initial_peers, host=config.host,
                            event_loop=config.event_loop, authorizer=authorizer)
        self.loop = self.peer.loop
        self.health = EndpointHealth(ban_base=config.ban_base, ban_max=config.ban_max,
                                     quarantine_time=config.quarantine_time)
        self.balancer = ReplicaBalancer()  # shared by this swarm's dispatchers (dmoe.client.balance)
        self._started = False
        self._lock = threading.Lock()
        # "ffn.3." -> (at, replicas by coordinate)
        self._prefix_cache: dict[str, tuple[float, dict[int, list[ExpertRecord]]]] = {}
        self._refreshing: set[str] = set()  # keys being read again in the background
        # (key, schema, exact) -> (the cached records it was made of, what live_levels makes of them)
        self._prepared: dict[tuple[str, str | None, bool], tuple[dict, _Prepared]] = {}
        self._dispatchers: list[Dispatcher] = []
        self._mismatches: dict[str, SchemaMismatch] = {}  # node id -> the latest replica skipped there
        self._warned: set[tuple[str, str, str]] = set()  # (node id, its schema, the one expected) logged

    def dispatcher(self, compression: int) -> Dispatcher:
        """A Dispatcher on this swarm's loop; shutdown() closes it (its spot checks in flight cancelled,
        then its channels closed)."""
        dispatcher = Dispatcher(self.loop, compression, key=self.key,
                                max_reply_abs=self.config.max_reply_abs, balancer=self.balancer)
        self._dispatchers.append(dispatcher)
        return dispatcher

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the swarm's loop and wait for its result."""
        return self.peer.run(coroutine, timeout)

    def start(self, timeout: float = 60.0) -> Swarm:
        self.peer.start(timeout)
        self._started = True
        return self

    def shutdown(self) -> None:
        if not self._started:
            return
        for dispatcher in self._dispatchers:
            dispatcher.close()
        self.peer.shutdown()
        self._started = False

    def __enter__(self) -> Swarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def live_under(self, keys: Sequence[str], *, refresh: bool = False, schema: str | None = None
                   ) -> dict[str, dict[int, ExpertRecord]]:
        """For each grid prefix key (``ffn.``, ``ffn.3.``): one record by next coordinate, the first of
        :meth:`live_replicas_under` (the latest refreshed replica that is not avoided)."""
        found = self.live_replicas_under(keys, refresh=refresh, schema=schema)
        return {key: {c: replicas[0] for c, replicas in records.items()} for key, records in found.items()}

    def live_replicas_under(self, keys: Sequence[str], *, refresh: bool = False, schema: str | None = None
                            ) -> dict[str, dict[int, list[ExpertRecord]]]:
        """For each grid prefix key (``ffn.``, ``ffn.3.``): the replicas by next coordinate (one
        record per hosting node, the latest refreshed first), cached like ``cache_ttl``, all stale keys
        read in one DHT traversal. Avoided endpoints and experts (:meth:`EndpointHealth.is_avoided`)
        are left out, and so are coordinates left with no replica. With ``schema``, so are replicas
        announced with another schema (:meth:`of_schema`)."""
        cached, now = self._cached(keys, refresh)
        chosen = {key: {c: self._usable(replicas, now, schema) for c, replicas in records.items()}
                  for key, records in cached.items()}
        return {key: {c: r for c, r in records.items() if r} for key, records in chosen.items()}

    def live_levels(self, keys: Sequence[str], *, exact: bool = False, refresh: bool = False,
                    schema: str | None = None) -> list[LiveLevel]:
        """For each grid prefix key, in order: what :meth:`live_replicas_under` finds under it, as a
        :class:`LiveLevel` (its coordinates sorted, each with the same replicas in the same order),
        read and cached alike (all stale keys in one DHT traversal). With ``exact``, a coordinate keeps
        only the replicas of the expert ``key + coordinate`` itself (not of experts deeper in the
        grid), the first record of each dial endpoint, and is left out if none is left: the last
        level of a beam search, where each coordinate is an expert to call."""
        cached, now = self._cached(keys, refresh)
        banned, quarantined = self.health.avoided_at(now)
        quarantined_uids = {uid for _, uid in quarantined}
        levels = []
        for key in keys:
            prepared = self._prepare(key, cached[key], schema, exact)
            for record in prepared.mismatched:
                self._note_mismatch(record, schema or "", now)  # (there are some only with a schema)
            if prepared.endpoints.isdisjoint(banned) and prepared.uids.isdisjoint(quarantined_uids):
                levels.append(prepared.level)
            else:  # this key holds an avoided endpoint or expert: record by record
                levels.append(_without_avoided(prepared.level, banned, quarantined))
        return levels

    def _cached(self, keys: Sequence[str], refresh: bool
                ) -> tuple[dict[str, dict[int, list[ExpertRecord]]], float]:
        """The cached records of each key, and the monotonic time of the lookup. Keys never read, read
        more than ``cache_ttl + cache_grace`` ago, or all of them with ``refresh``: read first, in one
        DHT traversal (on a failure or past ``lookup_timeout``, the last known ones kept for another
        ``cache_ttl``). Keys read more than ``cache_ttl`` ago but within the grace: used as they are,
        while one traversal reads them again in the background for the lookups after it."""
        assert self.peer.node is not None, "call start() first"
        now = time.monotonic()
        ttl = self.config.cache_ttl
        grace = ttl if self.config.cache_grace is None else self.config.cache_grace
        with self._lock:
            ages = {k: now - self._prefix_cache[k][0] for k in keys if k in self._prefix_cache}
            stale = [k for k in keys if refresh or k not in ages or ages[k] > ttl + grace]
            behind = [k for k in keys if k in ages and ttl < ages[k] <= ttl + grace and not refresh
                      and k not in self._refreshing]
            self._refreshing.update(behind)
        if behind:
            self._read_later(behind)
        if stale:
            try:
                breadth = self.config.lookup_breadth or None
                found = self.run(find_under_prefixes_async(self.peer.node, stale, breadth),
                                 self.config.lookup_timeout)
            except Exception as e:  # a slow or broken DHT must not stop a step: keep what was known
                logger.warning("expert lookup of %s failed (%s: %s); using the last known experts for %.0fs",
                               ", ".join(stale), type(e).__name__, printable(e), self.config.cache_ttl)
                with self._lock:
                    found = {key: self._prefix_cache.get(key, (now, {}))[1] for key in stale}
            with self._lock:
                for key in stale:
                    self._prefix_cache[key] = (now, found.get(key, {}))
        with self._lock:  # the cached dicts are replaced, never changed: they can be read outside the lock
            return {key: self._prefix_cache.get(key, (now, {}))[1] for key in keys}, now

    def _read_later(self, keys: list[str]) -> None:
        """Read ``keys`` from the DHT in the background, merging every reachable peer's copy (no step
        waits for it); what is found replaces their cached records (unless a newer read did meanwhile);
        a failure keeps them, and a later lookup tries again."""
        begun = time.monotonic()
        read = asyncio.wait_for(find_under_prefixes_async(self.peer.node, keys, None),
                                self.config.lookup_timeout)
        future = asyncio.run_coroutine_threadsafe(read, self.loop)

        def done(future: concurrent.futures.Future) -> None:
            with self._lock:
                self._refreshing.difference_update(keys)
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                logger.warning("background lookup of %s failed (%s: %s); the cached experts stay in use",
                               ", ".join(keys), type(error).__name__, printable(error))
                return
            found = future.result()
            with self._lock:
                for key in keys:
                    if self._prefix_cache.get(key, (-math.inf,))[0] < begun:
                        self._prefix_cache[key] = (begun, found.get(key, {}))

        future.add_done_callback(done)

    def _prepare(self, key: str, records: dict[int, list[ExpertRecord]], schema: str | None,
                 exact: bool) -> _Prepared:
        """A cached key's records laid out for :meth:`live_levels`, before health (made once per
        DHT read of the key: the cache replaces its dict when it reads the key again)."""
        slot = (key, schema, exact)
        with self._lock:
            made = self._prepared.get(slot)
        if made is not None and made[0] is records:
            return made[1]
        kept_by_coord: dict[int, list[ExpertRecord]] = {}
        mismatched = []  # in the order live_replicas_under meets (and notes) them
        endpoints: set[str] = set()
        uids: set[str] = set()
        for c, replicas in records.items():
            kept: list[ExpertRecord] = []
            seen: set[str] = set()  # with exact, the endpoints kept for this coordinate
            expert = f"{key}{c}"
            for record in replicas:
                if schema and record.expert_schema and record.expert_schema != schema:
                    mismatched.append(record)
                    continue
                if record.tls and self.key is None:  # a private swarm's node: not dialable without its key
                    continue  # (and anyone's record may say so of an open node's endpoint, to shadow it)
                endpoint = record.dial_endpoint
                if not endpoint or (exact and (record.uid != expert or endpoint in seen)):
                    continue
                seen.add(endpoint)
                kept.append(record)
                endpoints.add(endpoint)
                uids.add(record.uid)
            if kept:
                kept_by_coord[c] = kept
        coords = sorted(kept_by_coord)
        level = LiveLevel(coords=coords, replicas=[kept_by_coord[c] for c in coords])
        prepared = _Prepared(level=level, endpoints=frozenset(endpoints), uids=frozenset(uids),
                             mismatched=tuple(mismatched))
        with self._lock:
            self._prepared[slot] = (records, prepared)
        return prepared

    def _usable(self, replicas: list[ExpertRecord], now: float, schema: str | None = None
                ) -> list[ExpertRecord]:
        avoided = self.health.is_avoided
        if schema:
            replicas = self.of_schema(replicas, schema, now)
        return [r for r in replicas if r.dial_endpoint and not avoided(r.dial_endpoint, r.uid, now)]

    # ---- replicas of another schema ----------------------------------------------------------------
    def of_schema(self, replicas: Sequence[ExpertRecord], schema: str, now: float | None = None
                  ) -> list[ExpertRecord]:
        """The replicas a caller that expects ``schema`` may call, in order: those announced with it or
        with none (nodes older than schemas). Each one left out is noted (at monotonic time ``now``) for
        :meth:`skipped_nodes`, and its node warned about once (once per schema it serves and schema
        expected of it)."""
        kept = []
        for record in replicas:
            if not record.expert_schema or record.expert_schema == schema:
                kept.append(record)
            else:
                self._note_mismatch(record, schema, time.monotonic() if now is None else now)
        return kept

    def skipped_nodes(self, within: float = SKIPPED_WITHIN) -> dict[str, SchemaMismatch]:
        """Nodes whose replicas lookups left out for their schema in the last ``within`` seconds, by node
        id (the latest replica left out there): what ``dmoe train``'s step records count."""
        since = time.monotonic() - within
        with self._lock:
            return {node: m for node, m in self._mismatches.items() if m.seen >= since}

    def _note_mismatch(self, record: ExpertRecord, schema: str, now: float) -> None:
        mismatch = SchemaMismatch(node_id=record.node_id, endpoint=record.endpoint, uid=record.uid,
                                  theirs=record.expert_schema, ours=schema, seen=now)
        warning = (record.node_id, mismatch.theirs, schema)
        with self._lock:
            if record.node_id not in self._mismatches and len(self._mismatches) >= MAX_SKIPPED_NODES:
                since = now - SKIPPED_WITHIN  # full (records of many node ids): forget the ones gone quiet
                self._mismatches = {n: m for n, m in self._mismatches.items() if m.seen >= since}
                if len(self._mismatches) >= MAX_SKIPPED_NODES:
                    return  # still left out, but neither remembered nor logged
            self._mismatches[record.node_id] = mismatch
            warn = warning not in self._warned and len(self._warned) < MAX_SKIPPED_NODES
            if warn:
                self._warned.add(warning)
        if warn:
            logger.warning("node %s at %s serves %s as %s, but this client expects %s: its replicas are "
                           "skipped (that node needs the model's sizes: dmoe node start --model NAME, or "
                           "matching --hidden-dim/--inner-dim)", printable(record.node_id, 80),
                           printable(record.endpoint, 80), printable(record.uid, 80),
                           printable(mismatch.theirs, 200), schema)

    # ---- endpoint health (see dmoe.client.health) --------------------------------------------------
    def report(self, endpoint: str, uid: str, error: BaseException | None) -> None:
        """What became of one call: None for success, else the error (see dmoe.client.health)."""
        self.health.report(endpoint, uid, error)

    def report_failure(self, endpoint: str) -> None:
        self.health.report_failure(endpoint)

    def report_success(self, endpoint: str) -> None:
        self.health.report_success(endpoint)

    def quarantine(self, endpoint: str, uid: str, why: BaseException | str,
                   seconds: float | None = None) -> None:
        self.health.quarantine(endpoint, uid, why, seconds)

    def quarantined(self, endpoint: str, uid: str) -> bool:
        return self.health.quarantined(endpoint, uid)


def _without_avoided(level: LiveLevel, banned: set[str], quarantined: set[tuple[str, str]]) -> LiveLevel:
    """``level`` less the replicas at a backed-off endpoint or quarantined there, and the coordinates
    left with none."""
    coords, replicas = [], []
    for c, kept in zip(level.coords, level.replicas):
        kept = [r for r in kept
                if r.dial_endpoint not in banned and (r.dial_endpoint, r.uid) not in quarantined]
        if kept:
            coords.append(c)
            replicas.append(kept)
    return LiveLevel(coords=coords, replicas=replicas) if coords else _NO_LEVEL


def _config_of(config: SwarmConfig | None, fields: dict[str, Any]) -> SwarmConfig:
    """The config itself, or one made of the fields (exactly one of the two)."""
    if config is not None:
        if fields:
            raise TypeError(f"Swarm takes a SwarmConfig or its fields, not both (got the config and "
                            f"{', '.join(sorted(fields))})")
        if not isinstance(config, SwarmConfig):
            raise TypeError(f"Swarm's config must be a SwarmConfig, got {type(config).__name__}")
        return config
    known = {field.name for field in dataclasses.fields(SwarmConfig) if field.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"SwarmConfig has no field {', '.join(map(repr, unknown))}; its fields: "
                        f"{', '.join(sorted(known))}")
    return SwarmConfig(**fields)
