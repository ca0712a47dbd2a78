"""dmoe: a decentralized Mixture-of-Experts.

- ``wire.py``     tensors on the wire: serialize/deserialize with compression, chunking
- ``uids.py``     expert uids (``prefix.i.j``) and grid patterns (``ffn.[0:8]``)
- ``experts.py``  expert modules (ffn, transformer, module:Class) and their schemas
- ``records.py``  DHT records of experts and nodes; find_experts, find_nodes
- ``config.py``   config dataclasses -> CLI options, TOML, DMOE_* environment
- ``errors.py``   the errors dmoe raises for its users
- ``cli.py``      the ``dmoe`` command
- ``proto/``      generated wire-format code (from ``proto/dmoe/proto/*.proto``)
- ``dmoe.node``   the node daemon (package ``node/``)
- ``dmoe.coordinator`` the swarm's bootstrap peer (package ``coordinator/``)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dmoe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
