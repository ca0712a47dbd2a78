"""dmoe.node: the node daemon that hosts experts and serves them over gRPC.

- ``config.py``     NodeConfig: every option of a node (CLI, TOML, DMOE_NODE_* environment)
- ``node.py``       Node: lifecycle of the DHT peer, experts, runtime and gRPC server; signals
- ``backend.py``    ExpertBackend: one expert on its device: schema checks, forward, backward + optimizer step
- ``runtime.py``    Runtime, Task: per-expert forward/backward queues, admission control, the batching device thread
- ``service.py``    ExpertServicer: the gRPC handlers (Forward, Backward, their streams, Info)
- ``guard.py``      CallGuard: the swarm key's token and the per-peer limits, checked before a request is read
- ``announcer.py``  Announcer: DHT heartbeat of the expert and node records, and their withdrawal
- ``relaylink.py`` RelayLink: a node nobody can dial keeps itself registered with a relay and attaches its clients
- ``checkpoint.py`` CheckpointStore: atomic safetensors checkpoints, the last few kept
- ``stats.py``      ExpertCounters: calls, tokens, errors, latency per expert
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
