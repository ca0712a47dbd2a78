"""SwarmView: what the swarm looks like, computed from the nodes' own DHT records.

Any peer can compute the same view: it needs nothing but the ``_dmoe.nodes`` records
(:func:`dmoe.core.records.find_nodes`). ``dmoe swarm status`` prints one; the coordinator's dashboard
and metrics serve one, refreshed every few seconds, with throughput over time
(:class:`ThroughputHistory`, from the growth of the nodes' cumulative counters between two views).

Per node, the latency is the node's own time to serve a call (queueing + compute), as its
counters measured over the last calls of each expert: p50 is the call-weighted mean of the
experts' p50, p99 the worst expert's p99.

Replicas: several nodes may host the same uid. Per uid the view lists every replica
(:class:`ReplicaSummary`, from the hosting node's own ``load[uid]``) and sums them up
(:class:`ExpertReplicas`): how many, the range of their versions (optimizer steps applied) and the
largest spread (how far a replica was from the last replica it averaged with, before averaging, as
that replica measured it). An expert held by a single node is lost if that node leaves for good:
``single_replica`` lists those uids.

Demand and coverage: given the trainers' demand records (:mod:`dmoe.core.demand`), the view sums
their tokens/s per uid, estimates each replica's throughput from its node's load, and lists per uid
of the trainers' grids and of the hosted experts their ratio (:class:`ExpertCoverage`): demand over
throughput, ``None`` where there is demand and no replica. ``no_replica`` lists the uids of those
grids that no node hosts.

Numbers stay finite: records read from the DHT are bounded (:mod:`dmoe.core.recordrules`), the
view's own sums and means are clamped to finite floats, and :func:`json_safe` turns what would still
not be into a finite number before any JSON is written (one record must never break the dashboard).
"""

from __future__ import annotations

import collections
import math
import sys
import time
from collections.abc import Mapping

import pydantic

from dmoe.core.demand import DemandRecord, coverage, grid_uids, replica_throughputs, total_demand
from dmoe.core.records import ExpertLoad, NodeRecord


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)


class ExpertSummary(_Model):
    uid: str
    node_id: str
    endpoint: str
    forward_calls: int
    backward_calls: int
    tokens: int
    errors: int
    rejected: int
    queued_tokens: int
    latency_p50_ms: float
    latency_p99_ms: float
    version: int  # optimizer steps applied
    # |theirs - ours| / |ours| to the last replica this one averaged with, before averaging (0: none yet)
    spread: float = 0.0
    averaged_at: float = 0.0  # when it last averaged, by the node's clock (0: never)


class ReplicaSummary(_Model):
    """One node's replica of an expert, as that node's record describes it."""
    node_id: str
    endpoint: str
    version: int  # optimizer steps applied on this replica
    spread: float  # see ExpertSummary.spread
    averaged_at: float  # see ExpertSummary.averaged_at
    calls: int  # forward + backward
    tokens: int
    errors: int  # failed + shed
    queued_tokens: int
    latency_p50_ms: float


class ExpertReplicas(_Model):
    """Every replica of one expert uid, and how far apart they are."""
    uid: str
    num_replicas: int  # nodes hosting the uid
    replicas: list[ReplicaSummary]  # by node id
    min_version: int
    max_version: int
    max_spread: float  # largest spread a replica reported (0: none measured)
    last_averaged_at: float  # latest time a replica averaged (0: never)
    single: bool  # held by a single node: lost if it leaves


class NodeSummary(_Model):
    node_id: str
    endpoint: str
    dmoe_version: str
    started_at: float
    updated_at: float  # the node's clock when it made the record this view comes from
    uptime_s: float
    device: str
    device_name: str
    num_cpus: int
    ram_bytes: int
    device_memory_bytes: int
    num_experts: int
    expert_prefixes: list[str]  # e.g. ["lm0", "lm1"]
    forward_calls: int
    backward_calls: int
    calls: int
    tokens: int
    errors: int  # calls that failed on the node (bad input, expert error)
    rejected: int  # calls shed for overload
    queued_tokens: int
    latency_p50_ms: float
    latency_p99_ms: float
    optimizer_steps: int


class ExpertCoverage(_Model):
    """How well one expert's replicas cover the trainers' demand (:func:`dmoe.core.demand.coverage`)."""
    uid: str
    demand: float  # routed tokens/s, all trainers together
    throughput: float  # routed tokens/s its replicas can serve (estimated from their load)
    num_replicas: int
    ratio: float | None  # demand / throughput; None: demand and no replica


class SwarmView(_Model):
    at: float  # wall-clock time of the view (unix seconds)
    num_nodes: int
    num_experts: int  # distinct expert uids
    num_replicated: int  # uids served by more than one node
    calls: int
    tokens: int
    errors: int
    rejected: int
    nodes: list[NodeSummary]
    experts: list[ExpertSummary]  # one per (uid, node), by uid then node
    # replicas (added with replica averaging; the defaults read views made before it)
    num_single_replica: int = 0  # uids held by a single node
    single_replica: list[str] = []  # those uids, sorted
    max_spread: float = 0.0  # largest spread over all experts
    expert_replicas: list[ExpertReplicas] = []  # one per uid, sorted by uid
    # demand (read when the trainers' demand records are given): trainers that published, the grids
    # they route over (prefix -> sizes), coverage per uid (sorted), the uids of those grids nobody hosts
    num_trainers: int = 0
    grids: dict[str, list[int]] = {}
    coverage: list[ExpertCoverage] = []
    no_replica: list[str] = []


def _replicas_of(uid: str, replicas: list[ReplicaSummary]) -> ExpertReplicas:
    versions = [r.version for r in replicas]
    return ExpertReplicas(
        uid=uid, num_replicas=len(replicas), replicas=replicas, min_version=min(versions),
        max_version=max(versions), max_spread=max(r.spread for r in replicas),
        last_averaged_at=max(r.averaged_at for r in replicas), single=len(replicas) == 1,
    )


def summarize(records: Mapping[str, NodeRecord], now: float | None = None,
              demand: Mapping[str, Mapping[str, DemandRecord]] | None = None) -> SwarmView:
    """The view of a swarm from its live node records (by node id), and, if given, the trainers' demand
    records (by prefix, then owner: :func:`dmoe.core.demand.find_demand`)."""
    now = time.time() if now is None else now
    nodes, experts = [], []
    owners: dict[str, list[ReplicaSummary]] = {}
    for node_id, record in sorted(records.items()):
        loads = record.load
        for uid in dict.fromkeys(record.experts):  # a uid listed twice by one node is one expert
            load = loads.get(uid)
            if load is None:  # hosted, numbers not published: a replica all the same
                load = ExpertLoad()
            else:
                experts.append(ExpertSummary(
                    uid=uid, node_id=node_id, endpoint=record.endpoint, forward_calls=load.forward_calls,
                    backward_calls=load.backward_calls, tokens=load.tokens, errors=load.errors,
                    rejected=load.rejected, queued_tokens=load.queued_tokens,
                    latency_p50_ms=load.latency_p50_ms, latency_p99_ms=load.latency_p99_ms,
                    version=load.version, spread=load.spread, averaged_at=load.averaged_at,
                ))
            owners.setdefault(uid, []).append(ReplicaSummary(
                node_id=node_id, endpoint=record.endpoint, version=load.version, spread=load.spread,
                averaged_at=load.averaged_at, calls=load.forward_calls + load.backward_calls,
                tokens=load.tokens, errors=load.errors + load.rejected, queued_tokens=load.queued_tokens,
                latency_p50_ms=load.latency_p50_ms,
            ))
        calls_by_expert = [(lo.forward_calls + lo.backward_calls, lo) for lo in loads.values()]
        num_calls = sum(c for c, _ in calls_by_expert)
        weighted = sum(c * lo.latency_p50_ms for c, lo in calls_by_expert)
        p50 = _finite(weighted / num_calls) if num_calls else 0.0
        hardware = record.hardware
        nodes.append(NodeSummary(
            node_id=node_id,
            endpoint=record.endpoint if record.reachable or not record.relay else f"{record.relay} (relay)",
            dmoe_version=record.dmoe_version,
            started_at=record.started_at, updated_at=record.updated_at,
            uptime_s=max(0.0, now - record.started_at) if record.started_at else 0.0,
            device=hardware.device if hardware else "", device_name=hardware.device_name if hardware else "",
            num_cpus=hardware.num_cpus if hardware else 0, ram_bytes=hardware.ram_bytes if hardware else 0,
            device_memory_bytes=hardware.device_memory_bytes if hardware else 0,
            num_experts=len(set(record.experts)),
            expert_prefixes=sorted({uid.split(".")[0] for uid in record.experts}),
            forward_calls=sum(lo.forward_calls for lo in loads.values()),
            backward_calls=sum(lo.backward_calls for lo in loads.values()),
            calls=num_calls, tokens=sum(lo.tokens for lo in loads.values()),
            errors=sum(lo.errors for lo in loads.values()),
            rejected=sum(lo.rejected for lo in loads.values()),
            queued_tokens=sum(lo.queued_tokens for lo in loads.values()), latency_p50_ms=round(p50, 3),
            latency_p99_ms=max((lo.latency_p99_ms for lo in loads.values()), default=0.0),
            optimizer_steps=sum(lo.version for lo in loads.values()),
        ))
    replicas = [_replicas_of(uid, owners[uid]) for uid in sorted(owners)]  # nodes were visited sorted
    single = [r.uid for r in replicas if r.single]
    return SwarmView(
        at=now, num_nodes=len(nodes), num_experts=len(owners),
        num_replicated=len(replicas) - len(single),
        calls=sum(n.calls for n in nodes), tokens=sum(n.tokens for n in nodes),
        errors=sum(n.errors for n in nodes), rejected=sum(n.rejected for n in nodes),
        nodes=nodes, experts=sorted(experts, key=lambda e: (e.uid, e.node_id)),
        num_single_replica=len(single), single_replica=single,
        max_spread=max((r.max_spread for r in replicas), default=0.0), expert_replicas=replicas,
        **({} if demand is None else _demand_fields(records, demand)),
    )


def _demand_fields(records: Mapping[str, NodeRecord], demand: Mapping[str, Mapping[str, DemandRecord]]
                   ) -> dict:
    found = [record for by_owner in demand.values() for record in by_owner.values()]
    if not found:  # no trainer said what it routes: nothing to cover
        return {}
    grids = {}
    for record in found:
        grids.setdefault(record.prefix, list(record.grid))
    in_grids = grid_uids(r for r in found if grids[r.prefix] == list(r.grid))  # the first grid of a prefix
    covered = coverage(total_demand(found), replica_throughputs(records), in_grids)
    return dict(
        num_trainers=len({record.owner for record in found}), grids=grids,
        coverage=[ExpertCoverage(uid=c.uid, demand=_finite(c.demand), throughput=_finite(c.throughput),
                                 num_replicas=c.num_replicas,
                                 ratio=_finite(c.ratio) if math.isfinite(c.ratio) else None)
                  for c in covered.values()],
        no_replica=[c.uid for c in covered.values() if c.uncovered],
    )


def _finite(value: float) -> float:
    """``value``, or the largest finite float of its sign for an infinity (0.0 for NaN)."""
    if math.isfinite(value):
        return value
    return 0.0 if math.isnan(value) else math.copysign(sys.float_info.max, value)


def json_safe(value: object) -> object:
    """``value`` (dicts, lists, tuples and scalars, as ``model_dump()`` makes them) with every float that
    is not finite replaced as :func:`_finite` does: strict JSON has no NaN or Infinity, and a browser
    cannot parse them."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


MAX_RECORD_TIME_OFFSET_S = 3600.0  # a record's own time further than this from the view's is not used
MIN_INTERVAL_S = 0.1  # shortest time a rate is taken over (no division by ~0)


class ThroughputPoint(_Model):
    at: float
    tokens_per_s: float
    calls_per_s: float
    errors_per_s: float


class ThroughputHistory:
    """Rates per node and for the whole swarm between consecutive views, the last ``maxlen`` kept.

    A node's rate is the growth of its counters between two of its records, over the time between
    them by its own clock (``updated_at``): a view that finds the same record as the last one adds
    no point for that node, so polling faster or slower than the heartbeat does not alias. A node
    that restarted (new ``started_at``) counts from zero again; a node seen for the first time has
    no rate until its second record. The swarm's rate is the sum of each node's latest rate."""

    def __init__(self, maxlen: int = 360):
        self.swarm: collections.deque[ThroughputPoint] = collections.deque(maxlen=maxlen)
        self.nodes: dict[str, collections.deque[ThroughputPoint]] = {}
        self.maxlen = maxlen
        self._last: dict[str, tuple[float, NodeSummary]] = {}

    def add(self, view: SwarmView) -> None:
        for node in view.nodes:
            previous = self._last.get(node.node_id)
            stamp = node.updated_at or view.at  # records of old nodes have no updated_at
            if abs(stamp - view.at) > MAX_RECORD_TIME_OFFSET_S:
                stamp = view.at  # a clock far off (or a made-up record): use the time of the view
            if previous is not None and stamp <= previous[0]:
                continue  # the same record as last time
            self._last[node.node_id] = (stamp, node)
            if previous is None:
                continue
            at, old = previous
            if old.started_at != node.started_at:  # restarted: its counters began again at zero
                old = old.model_copy(update={"tokens": 0, "calls": 0, "errors": 0, "rejected": 0})
                at = max(at, min(node.started_at, stamp))
            dt = max(stamp - at, MIN_INTERVAL_S)
            self.nodes.setdefault(node.node_id, collections.deque(maxlen=self.maxlen)).append(ThroughputPoint(
                at=view.at, tokens_per_s=max(0, node.tokens - old.tokens) / dt,
                calls_per_s=max(0, node.calls - old.calls) / dt,
                errors_per_s=max(0, node.errors + node.rejected - old.errors - old.rejected) / dt,
            ))
        live = {node.node_id for node in view.nodes}
        for node_id in list(self._last):
            if node_id not in live:  # gone: forget it (a node coming back starts a new series)
                del self._last[node_id]
                self.nodes.pop(node_id, None)
        latest = [points[-1] for points in self.nodes.values() if points]
        self.swarm.append(ThroughputPoint(
            at=view.at, tokens_per_s=sum(p.tokens_per_s for p in latest),
            calls_per_s=sum(p.calls_per_s for p in latest), errors_per_s=sum(p.errors_per_s for p in latest),
        ))

    def to_json(self) -> dict:
        return {"swarm": [p.model_dump() for p in self.swarm],
                "nodes": {node_id: [p.model_dump() for p in points]
                          for node_id, points in self.nodes.items()}}
