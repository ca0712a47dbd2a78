"""dmoe.node: the node daemon that hosts experts and serves them over gRPC.

- ``config.py``       NodeConfig: every option of a node (CLI, TOML, DMOE_NODE_* environment)
- ``node.py``         Node: lifecycle of the DHT peer, experts, runtime and gRPC server, start-up in
                      named steps; signals
- ``experts.py``      build_backend, resolve_device, read_hardware: the experts a config asks for, on
                      the node's device
- ``backend.py``      ExpertBackend: one expert on its device: schema checks, forward, backward +
                      optimizer step
- ``checkpoints.py``  ExpertCheckpoints: the experts restored at start, saved when they changed
- ``transfer.py``     GetState's wire: export_state, receive_state (every check), fetch_expert_state
                      (the client call), ExpertState
- ``placement.py``    the node's side of placement by demand: memory budget, measured throughput,
                      read_picture, Rebalancer (covers experts with no replica, moves for demand)
- ``joining.py``      take_live_states, TransferPolicy: at start, experts alive elsewhere take a
                      live replica's state before they are announced
- ``averaging.py``    ReplicaAverager: replicas of an expert blend their parameters (GetState) in
                      the background, every --average-interval; bad ones refused and avoided
- ``runtime.py``      Runtime, Task: per-expert forward/backward queues, admission control, the
                      batching device thread
- ``influence.py``    InfluenceLimits: each peer's optimizer steps per expert: a budget per minute
                      and a share of the expert's recent steps; past them, calls update nothing
- ``service.py``      ExpertServicer: the gRPC handlers (Forward, Backward, their batched forms
                      for several experts in one call, their streams, Info, GetState)
- ``server.py``       NodeServer: the gRPC server: ExpertService, health, reflection, TLS or not
- ``guard.py``        CallGuard: the swarm key's token and the per-peer limits, checked before a
                      request is read
- ``announcer.py``    Announcer: DHT heartbeat of the expert and node records, and their withdrawal
- ``reachability.py`` relay_candidates, trusted_relays, dial_back, dialable: can others dial this
                      node? trusted relays say, or two at distinct addresses
- ``relaylink.py``    RelayLink: a node nobody can dial keeps itself registered with a relay and
                      attaches its clients
- ``stats.py``        ExpertCounters: calls, tokens, errors, latency per expert
"""

from __future__ import annotations

import importlib
from typing import Any

# imported on first use, so that the CLI can read a config without starting torch or hivemind
_LAZY = {
    "Node": "dmoe.node.node",
    "NodeConfig": "dmoe.node.config",
}

__all__ = ["Node", "NodeConfig"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
