"""``dmoe swarm status``: join a swarm, read the nodes' records, print a table (rich) or JSON.

The summary line counts experts held by a single node; ``--experts`` adds one row per expert uid:
its replicas (nodes and their versions), version range, largest spread and when a replica last
averaged, with single-replica experts marked ``SINGLE`` (and red on a terminal). Where trainers
publish their demand (:mod:`dmoe.core.demand`), each row also says the tokens/s routed to the expert,
what its replicas can serve and the ratio of the two, experts of the trainers' grids that no node
hosts get a row marked ``NONE``, and each grid is drawn as a heatmap of that ratio (one character
per expert; rows and columns are the first two coordinates).

Nothing here asks the coordinator: any peer's records give the same view (:mod:`dmoe.view.swarmview`).
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dmoe.core.demand import find_demand
from dmoe.core.dht import DHTPeer
from dmoe.core.dhtauth import dht_authorizer
from dmoe.core.records import find_nodes
from dmoe.view.config import StatusConfig
from dmoe.view.swarmview import ExpertCoverage, ExpertReplicas, SwarmView, summarize


def read_view(config: StatusConfig) -> SwarmView:
    """Join the swarm, read the node records (until ``wait_nodes`` are seen or the timeout) and the
    trainers' demand for the prefixes the nodes host, leave."""
    deadline = time.monotonic() + config.timeout
    swarm = config.swarm  # StatusConfig made sure it has peers
    peer = DHTPeer(initial_peers=swarm.initial_peers, host=swarm.host, client_mode=True,
                   authorizer=dht_authorizer(swarm.swarm_key)).start(config.timeout)
    try:
        while True:
            nodes = find_nodes(peer)
            if len(nodes) >= config.wait_nodes or time.monotonic() > deadline:
                prefixes = sorted({uid.split(".")[0] for record in nodes.values() for uid in record.experts})
                return summarize(nodes, demand=find_demand(peer, prefixes, config.timeout))
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
    covered = {c.uid: c for c in view.coverage}
    if covered:
        for name in ("demand tok/s", "serves tok/s", "ratio"):
            table.add_column(name, justify="right")
    rows = {e.uid: e for e in view.expert_replicas}
    for uid in sorted({*rows, *covered}):
        e, c = rows.get(uid), covered.get(uid)
        demand = (_rate(c.demand), _rate(c.throughput), _ratio(c)) if covered and c else ("-",) * 3
        if e is None:  # in a trainer's grid, hosted by no node
            table.add_row(*map(_cell, (uid, "0 NONE", "", "", "", "", "", "", "", "", *demand)),
                          style="bold red")
            continue
        age = max(0.0, view.at - e.last_averaged_at)  # the node's clock against ours: never below 0
        averaged = f"{_duration(age)} ago" if e.last_averaged_at else "never"
        table.add_row(*map(_cell, (
            e.uid, f"{e.num_replicas} SINGLE" if e.single else e.num_replicas, _holders(e), _versions(e),
            _spread(e), averaged, f"{sum(r.calls for r in e.replicas):,}",
            f"{sum(r.tokens for r in e.replicas):,}", f"{sum(r.errors for r in e.replicas):,}",
            f"{sum(r.queued_tokens for r in e.replicas):,}", *(demand if covered else ()),
        )), style="bold red" if e.single else None)
    console.print(table)
    if view.num_single_replica:
        console.print(f"[bold red]{_experts_held_by_one(view)} by a single node[/] (SINGLE above): a node"
                      " started elsewhere with the same --experts replicates them")
    _render_demand(view, console)


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.1f}" if tokens_per_s < 100 else f"{tokens_per_s:,.0f}"


def _ratio(c: ExpertCoverage) -> str:
    """demand / throughput, ``inf`` for demand that no replica serves, ``-`` for no demand."""
    if c.ratio is None:
        return "inf"
    return f"{c.ratio:.2f}" if c.demand > 0 else "-"


# heatmap: (character, style) by ratio, the first whose bound the ratio does not exceed
_LEVELS = ((0.0, "·", "dim"), (0.5, "░", "green"), (1.0, "▒", "yellow"), (2.0, "▓", "dark_orange"),
           (float("inf"), "█", "red"))
_NO_REPLICA = ("X", "bold white on red")


def _mark(c: ExpertCoverage | None) -> tuple[str, str]:
    if c is None or c.num_replicas == 0:
        return _NO_REPLICA
    ratio = 0.0 if c.ratio is None else c.ratio
    return next((char, style) for bound, char, style in _LEVELS if ratio <= bound)


def heatmap(view: SwarmView, prefix: str) -> Text:
    """The coverage of a trainers' grid, one character per expert: rows by the first coordinate,
    columns by the second (a 1-D grid is one row; deeper coordinates of a 3-D or deeper grid are
    folded into the columns)."""
    grid = view.grids[prefix]
    covered = {c.uid: c for c in view.coverage if c.uid.split(".")[0] == prefix}
    rows = grid[0] if len(grid) > 1 else 1
    columns = math.prod(grid) // rows
    text = Text()
    for row in range(rows):
        for column in range(columns):
            index = row * columns + column
            coords = [index // math.prod(grid[d + 1:]) % grid[d] for d in range(len(grid))]
            text.append(*_mark(covered.get(".".join([prefix, *map(str, coords)]))))
        text.append("\n")
    return text


def _render_demand(view: SwarmView, console: Console) -> None:
    if not view.grids:
        console.print("no trainer publishes its demand for these experts (dmoe train does, unless "
                      "--no-publish-demand)")
        return
    total = sum(c.demand for c in view.coverage)
    console.print(f"demand: {view.num_trainers} trainer(s) route {_rate(total)} tokens/s")
    for prefix, grid in sorted(view.grids.items()):
        title = f"{prefix} {'x'.join(map(str, grid))}: demand / throughput per expert"
        console.print(Text(title, style="bold"))
        console.print(heatmap(view, prefix), end="")
    legend = Text("  ")
    for (bound, char, style), (low, _, _) in zip(_LEVELS, ((-1.0, "", ""), *_LEVELS)):
        legend.append(char, style)
        legend.append(" no demand  " if bound == 0 else f" <= {bound:g}  " if math.isfinite(bound)
                      else f" > {low:g}  ")
    legend.append(*_NO_REPLICA)
    legend.append(" no replica")
    console.print(legend)
    if view.no_replica:
        shown = ", ".join(view.no_replica[:16]) + (f", +{len(view.no_replica) - 16} more"
                                                   if len(view.no_replica) > 16 else "")
        console.print(Text(f"{len(view.no_replica)} expert(s) of the trainers' grids have no replica: "
                           f"{shown}", style="bold red"))
