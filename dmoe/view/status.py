"""``dmoe swarm status``: join a swarm, read the nodes' records, print a table (rich) or JSON.

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
from dmoe.view.swarmview import SwarmView, summarize


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


def render(view: SwarmView, console: Console, experts: bool = False) -> None:
    console.print(f"[bold]{view.num_nodes}[/] nodes, [bold]{view.num_experts}[/] experts"
                  f" ({view.num_replicated} on more than one node), {view.calls:,} calls served,"
                  f" {view.tokens:,} tokens, {view.errors:,} failed, {view.rejected:,} shed")
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
        table = Table(title="experts", title_justify="left")
        table.add_column("uid")
        table.add_column("node")
        for name in ("calls", "tokens", "failed", "p50 ms", "version"):
            table.add_column(name, justify="right")
        for e in view.experts:
            table.add_row(*map(_cell, (
                e.uid, _short(e.node_id), f"{e.forward_calls + e.backward_calls:,}", f"{e.tokens:,}",
                f"{e.errors + e.rejected:,}", f"{e.latency_p50_ms:.1f}", e.version)))
        console.print(table)
