"""SwarmCollector: Prometheus metrics of the swarm, read from the monitor's latest view at scrape time.

The numbers are the nodes' own cumulative counters (from their DHT records), exported with a
``node`` label, so Prometheus' ``rate()`` gives throughput per node; a node that restarts starts
its counters again, which ``rate()`` treats as a counter reset.

Replicas: swarm-wide gauges always (``dmoe_experts_single_replica``, ``dmoe_experts_by_replicas``
with a ``replicas`` label of 1, 2, 3 or 4+, the largest spread and version lag over all experts);
per-expert gauges with a ``uid`` label (``dmoe_expert_replicas``, ``dmoe_expert_spread``,
``dmoe_expert_version_lag``) only while the swarm has at most ``MAX_EXPERT_SERIES`` experts. A
swarm of thousands of experts would otherwise make thousands of series per metric, a load on
Prometheus that grows with the swarm (and that any peer could inflate by announcing made-up uids);
the swarm-wide gauges say whether something is wrong, and ``/api/swarm`` or ``dmoe swarm status
--experts`` say which expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dmoe.coordinator.monitor import SwarmMonitor
from dmoe.view.swarmview import SwarmView

MAX_EXPERT_SERIES = 256  # per-expert series (uid label) only for swarms of at most this many experts
REPLICA_BUCKETS = ("1", "2", "3", "4+")  # the replicas label of dmoe_experts_by_replicas


class SwarmCollector(Collector):
    def __init__(self, monitor: SwarmMonitor, max_expert_series: int = MAX_EXPERT_SERIES):
        self.monitor, self.max_expert_series = monitor, max_expert_series

    def collect(self) -> Iterator[Metric]:
        view = self.monitor.view
        yield GaugeMetricFamily("dmoe_swarm_nodes", "live nodes (unexpired online records)",
                                value=view.num_nodes)
        yield GaugeMetricFamily("dmoe_swarm_experts", "distinct live expert uids", value=view.num_experts)
        yield GaugeMetricFamily("dmoe_swarm_replicated_experts", "uids served by more than one node",
                                value=view.num_replicated)
        yield CounterMetricFamily("dmoe_monitor_polls", "reads of the swarm's records by this coordinator",
                                  value=self.monitor.num_polls)
        labels = ["node", "endpoint", "device"]
        families = {
            "calls": CounterMetricFamily("dmoe_node_calls", "calls served by the node",
                                         labels=[*labels, "kind"]),
            "tokens": CounterMetricFamily("dmoe_node_tokens", "tokens processed (forward + backward)",
                                          labels=labels),
            "errors": CounterMetricFamily("dmoe_node_errors", "calls that failed on the node", labels=labels),
            "rejected": CounterMetricFamily("dmoe_node_rejected", "calls shed for overload", labels=labels),
            "steps": CounterMetricFamily("dmoe_node_optimizer_steps",
                                         "optimizer steps over the node's experts", labels=labels),
            "experts": GaugeMetricFamily("dmoe_node_experts", "experts hosted", labels=labels),
            "queued": GaugeMetricFamily("dmoe_node_queued_tokens", "tokens waiting on the node",
                                        labels=labels),
            "p50": GaugeMetricFamily("dmoe_node_latency_p50_seconds",
                                     "call-weighted mean of the experts' median time to serve a call",
                                     labels=labels),
            "p99": GaugeMetricFamily("dmoe_node_latency_p99_seconds",
                                     "worst 99th percentile over the node's experts", labels=labels),
            "uptime": GaugeMetricFamily("dmoe_node_uptime_seconds", "seconds since the node started",
                                        labels=labels),
        }
        for n in view.nodes:
            values = [n.node_id, n.endpoint, n.device]
            families["calls"].add_metric([*values, "forward"], n.forward_calls)
            families["calls"].add_metric([*values, "backward"], n.backward_calls)
            families["tokens"].add_metric(values, n.tokens)
            families["errors"].add_metric(values, n.errors)
            families["rejected"].add_metric(values, n.rejected)
            families["steps"].add_metric(values, n.optimizer_steps)
            families["experts"].add_metric(values, n.num_experts)
            families["queued"].add_metric(values, n.queued_tokens)
            families["p50"].add_metric(values, n.latency_p50_ms / 1e3)
            families["p99"].add_metric(values, n.latency_p99_ms / 1e3)
            families["uptime"].add_metric(values, n.uptime_s)
        yield from families.values()
        yield from replica_metrics(view, self.max_expert_series)


def replica_metrics(view: SwarmView, max_expert_series: int = MAX_EXPERT_SERIES) -> Iterator[Metric]:
    """The replica gauges of a view: swarm-wide ones, and per-expert ones (``uid`` label) while the
    swarm has at most ``max_expert_series`` experts (see the module docstring)."""
    groups = view.expert_replicas
    yield GaugeMetricFamily("dmoe_experts_single_replica",
                            "experts held by a single node (lost if it leaves for good)",
                            value=view.num_single_replica)
    by_replicas = GaugeMetricFamily("dmoe_experts_by_replicas", "experts by their number of replicas",
                                    labels=["replicas"])
    counts = dict.fromkeys(REPLICA_BUCKETS, 0)
    for g in groups:
        counts[REPLICA_BUCKETS[min(g.num_replicas, len(REPLICA_BUCKETS)) - 1]] += 1
    for bucket, count in counts.items():
        by_replicas.add_metric([bucket], count)
    yield by_replicas
    yield GaugeMetricFamily("dmoe_experts_max_spread",
                            "largest |theirs - ours| / |ours| a replica measured before averaging",
                            value=view.max_spread)
    yield GaugeMetricFamily("dmoe_experts_max_version_lag",
                            "largest difference of optimizer steps between replicas of an expert",
                            value=max((g.max_version - g.min_version for g in groups), default=0))
    only_small = f" (only while the swarm has at most {max_expert_series} experts)"
    replicas = GaugeMetricFamily("dmoe_expert_replicas", "nodes hosting the expert" + only_small,
                                 labels=["uid"])
    spread = GaugeMetricFamily("dmoe_expert_spread", "largest spread its replicas measured" + only_small,
                               labels=["uid"])
    lag = GaugeMetricFamily("dmoe_expert_version_lag",
                            "optimizer steps between its newest and oldest replica" + only_small,
                            labels=["uid"])
    if len(groups) <= max_expert_series:
        for g in groups:
            replicas.add_metric([g.uid], g.num_replicas)
            spread.add_metric([g.uid], g.max_spread)
            lag.add_metric([g.uid], g.max_version - g.min_version)
    yield from (replicas, spread, lag)


class RelayCollector(Collector):
    """The coordinator's relay (dmoe.relay.server): nodes it serves, connections, bytes and refusals."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield GaugeMetricFamily("dmoe_relay_nodes", "nodes served through this relay", value=stats["nodes"])
        yield GaugeMetricFamily("dmoe_relay_connections", "client connections spliced to them",
                                value=stats["connections"])
        yield CounterMetricFamily("dmoe_relay_forwarded_bytes", "bytes forwarded, both directions",
                                  value=stats["forwarded_bytes"])
        yield CounterMetricFamily("dmoe_relay_refused", "registrations, probes and connections refused",
                                  value=stats["refused"])


def make_registry(monitor: SwarmMonitor,
                  relay_stats: Callable[[], dict[str, Any]] | None = None) -> CollectorRegistry:
    """A registry of its own per coordinator (several may run in one process, as in tests)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SwarmCollector(monitor))
    if relay_stats is not None:
        registry.register(RelayCollector(relay_stats))
    return registry
