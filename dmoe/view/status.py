"""``dmoe swarm status``: join a swarm, read the nodes' records, print a table (rich) or JSON.

The summary line counts experts held by a single node; ``--experts`` adds one row per expert uid:
its replicas (nodes and their versions), version range, largest spread and when a replica last
averaged, with single-replica experts marked ``SINGLE`` (and red on a terminal).

Nothing here asks the coordinator: any peer's records give the same view (:mod:`dmoe.view.swarmview`).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import dht_authorizer
from dmoe.core.records import find_nodes
from dmoe.view.config import StatusConfig
from dmoe.view.swarmview import ExpertReplicas, SwarmView, summarize


def read_view(config: StatusConfig) -> SwarmView:
    """Join the swarm, read the node records (until ``wait_nodes`` are seen or the timeout), leave."""
    deadline = time.monotonic() + config.timeout
    swarm = config.swarm  # StatusConfig made sure it has peers
    peer = DHTPeer(initial_peers=swarm.initial_peers, host=swarm.host, client_mode=True,
                   authorizer=dht_authorizer(swarm.swarm_key)).start(config.timeout)
    try:
        while True:
            view = summarize(find_nodes(peer))
            if view.num_nodes >= config.wait_nodes or time.monotonic() > deadline:
                return view
            time.sleep(0.5)
    finally:
        peer.shutdown()


def _cell(value: object) -> Text:
    """Text from a peer's record, shown as is: no rich markup, no control characters."""
    return Text("".join(c if c.isprintable() else "?" for c in str(value)))


def _short(node_id: str) -> str:
    return node_id if len(node_id) <= 14 else f"{node_id[:6]}…{node_id[-6:]}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _spread(e: ExpertReplicas) -> str:
    """The largest spread as a percentage; ``-`` where no replica measured one yet."""
    return f"{e.max_spread:.2%}" if e.max_spread or e.last_averaged_at else "-"


def _experts_held_by_one(view: SwarmView) -> str:
    n = view.num_single_replica
    return f"{n} expert is held" if n == 1 else f"{n} experts are held"


def _versions(e: ExpertReplicas) -> str:
    return str(e.min_version) if e.min_version == e.max_version else f"{e.min_version}..{e.max_version}"


MAX_NODES_SHOWN = 4  # replicas named per row of the experts table; more are counted


def _holders(e: ExpertReplicas) -> str:
    """The nodes holding an expert, each with its replica's version: ``a1b2c3…d4e5f6 v12``."""
    named = [f"{_short(r.node_id)} v{r.version}" for r in e.replicas[:MAX_NODES_SHOWN]]
    more = len(e.replicas) - len(named)
    return ", ".join(named) + (f", +{more} more" if more > 0 else "")


def render(view: SwarmView, console: Console, experts: bool = False) -> None:
    console.print(f"[bold]{view.num_nodes}[/] nodes, [bold]{view.num_experts}[/] experts"
                  f" ({view.num_replicated} on more than one node, {view.num_single_replica} on a single"
                  f" node), {view.calls:,} calls served, {view.tokens:,} tokens, {view.errors:,} failed,"
                  f" {view.rejected:,} shed")
    if not view.nodes:
        console.print("no live node: is a node running with --swarm pointing at this swarm?")
        return
    table = Table(title="nodes", title_justify="left")
    for name in ("node", "endpoint", "device", "experts", "prefixes", "up"):
        table.add_column(name)
    for name in ("calls", "failed", "shed", "tokens", "p50 ms", "p99 ms", "queued"):
        table.add_column(name, justify="right")
    for n in view.nodes:
        table.add_row(*map(_cell, (
            _short(n.node_id), n.endpoint, n.device_name or n.device, n.num_experts,
            " ".join(n.expert_prefixes), _duration(n.uptime_s), f"{n.calls:,}", f"{n.errors:,}",
            f"{n.rejected:,}", f"{n.tokens:,}",
            f"{n.latency_p50_ms:.1f}", f"{n.latency_p99_ms:.1f}", f"{n.queued_tokens:,}")))
    console.print(table)
    if experts:
        _render_experts(view, console)
    elif view.num_single_replica:
        console.print(f"[bold red]{_experts_held_by_one(view)} by a single node[/] (lost if it leaves for"
                      " good): --experts lists them")


def _render_experts(view: SwarmView, console: Console) -> None:
    """One row per expert uid: its replicas (nodes and versions), version range, largest spread and
    when a replica last averaged; experts held by a single node are marked and shown in red."""
    table = Table(title="experts", title_justify="left")
    table.add_column("uid")
    table.add_column("replicas", justify="right")
    table.add_column("nodes (version)")
    for name in ("versions", "spread", "averaged", "calls", "tokens", "failed", "queued"):
        table.add_column(name, justify="right")
    for e in view.expert_replicas:
        age = max(0.0, view.at - e.last_averaged_at)  # the node's clock against ours: never below 0
        averaged = f"{_duration(age)} ago" if e.last_averaged_at else "never"
        table.add_row(*map(_cell, (
            e.uid, f"{e.num_replicas} SINGLE" if e.single else e.num_replicas, _holders(e), _versions(e),
            _spread(e), averaged, f"{sum(r.calls for r in e.replicas):,}",
            f"{sum(r.tokens for r in e.replicas):,}", f"{sum(r.errors for r in e.replicas):,}",
            f"{sum(r.queued_tokens for r in e.replicas):,}",
        )), style="bold red" if e.single else None)
    console.print(table)
    if view.num_single_replica:
        console.print(f"[bold red]{_experts_held_by_one(view)} by a single node[/] (SINGLE above): a node"
                      " started elsewhere with the same --experts replicates them")
