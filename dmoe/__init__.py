"""dmoe: a decentralized Mixture-of-Experts.

The public API (``dmoe.RemoteMoE``, ``dmoe.LocalMoE``, ``dmoe.Swarm``, ``dmoe.SwarmConfig``) is
imported lazily, on first use, so that ``dmoe --help`` and commands that need neither torch nor
hivemind start at once.

- ``core/``     what client, node, relay and coordinator share: wire, uids, experts, DHT peer and
                records, auth and TLS, addresses, checkpoints, rate limiting
- ``moe/``      the layer: MoELayer (gating), RemoteMoE, LocalMoE
- ``client/``   Swarm (live experts, endpoint health) and the Dispatcher (calls, deadlines, quorum)
- ``relay/``    the relay for nodes behind a NAT: server, protocol, dial-back
- ``lm/``       the language model, data, training, averaging, inference
- ``view/``     the swarm view computed from records; ``dmoe swarm status``
- ``testing/``  lab tools for tests and benchmarks (never imported by the library)
- ``config.py`` config dataclasses -> CLI options, TOML, DMOE_* environment
- ``errors.py`` the errors dmoe raises for its users
- ``cli.py``    the ``dmoe`` command
- ``proto/``    generated wire-format code (from ``proto/dmoe/proto/*.proto``)
- ``dmoe.node``   the node daemon (package ``node/``)
- ``dmoe.coordinator`` the swarm's bootstrap peer, monitor and dashboard (package ``coordinator/``)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("dmoe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from dmoe.client.config import SwarmConfig
    from dmoe.client.swarm import Swarm
    from dmoe.moe.local import LocalMoE
    from dmoe.moe.remote import RemoteMoE

_LAZY = {
    "LocalMoE": "dmoe.moe.local",
    "RemoteMoE": "dmoe.moe.remote",
    "Swarm": "dmoe.client.swarm",
    "SwarmConfig": "dmoe.client.config",
}

__all__ = ["LocalMoE", "RemoteMoE", "Swarm", "SwarmConfig", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
