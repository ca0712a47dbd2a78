"""dmoe: a decentralized Mixture-of-Experts.

- ``wire.py``     tensors on the wire: serialize/deserialize with compression, chunking
- ``uids.py``     expert uids (``prefix.i.j``) and grid patterns (``ffn.[0:8]``)
- ``experts.py``  expert modules (ffn, transformer, module:Class) and their schemas
- ``peer.py``     DHTPeer: a hivemind DHTNode in this process, on an event loop of its own thread
- ``records.py``  DHT records of experts, nodes and relays; find_experts, find_nodes, find_relays
- ``relay.py``    Relay: serves nodes that nobody can dial over connections they dial (probe, register, attach)
- ``relayproto.py`` the relay's JSON-line protocol, RelayLimits, TokenBucket, splice: what both its sides use
- ``dialback.py`` dial_back: a relay's probe of a node's port, and the Info call that checks who answers
- ``swarmview.py`` SwarmView, ThroughputHistory: the swarm summarized from the nodes' records
- ``status.py``   StatusConfig, read_view, render: ``dmoe swarm status``
- ``swarm.py``    Swarm, SwarmConfig: a client's DHT peer, live-expert cache, back-off of failing endpoints
- ``dispatch.py`` Dispatcher: expert calls in flight at once, deadlines, per-token quorum, reply checks
- ``gating.py``   MoEGate: gates, top-k / Switch routing, aux and z losses, shared by both MoE layers
- ``moe.py``      RemoteMoE: the gated MoE layer whose experts are remote (autograd through them)
- ``local_moe.py`` LocalMoE: the same layer with its experts in this process
- ``lm.py``       MoELM, LMConfig: a byte-level transformer whose feed-forward sublayers are MoE layers
- ``data.py``     ByteCorpus: byte-level text (a file, a folder, or Python's standard library)
- ``train.py``    Trainer, TrainConfig: ``dmoe train`` (checkpoints, evaluation, metrics)
- ``averaging.py`` ParameterAverager: trainers of one run average their client-side parameters
- ``infer.py``    InferConfig, load_model, generate: ``dmoe infer``
- ``chaos.py``    ChaosRun, ChaosConfig: a swarm that trains while its nodes are killed, frozen, cut off
- ``netproxy.py`` TcpProxy: a userspace proxy that delays or cuts loopback links and counts bytes (tests, benchmarks)
- ``netlab.py``   NetLab: a network namespace behind a veth link shaped by tc tbf (tests, benchmarks)
- ``auth.py``     SwarmKey, CallVerifier, DHTAuthorizer: a private swarm's key, call tokens, signed DHT traffic
- ``tls.py``      mutual TLS with a CA derived from the swarm key
- ``config.py``   config dataclasses -> CLI options, TOML, DMOE_* environment
- ``local.py``    processes on this machine: listen addresses, atomic JSON files, ready files, process groups
- ``errors.py``   the errors dmoe raises for its users
- ``cli.py``      the ``dmoe`` command
- ``proto/``      generated wire-format code (from ``proto/dmoe/proto/*.proto``)
- ``dmoe.node``   the node daemon (package ``node/``)
- ``dmoe.coordinator`` the swarm's bootstrap peer, monitor and dashboard (package ``coordinator/``)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dmoe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from dmoe.local_moe import LocalMoE  # noqa: E402
from dmoe.moe import RemoteMoE  # noqa: E402
from dmoe.swarm import Swarm, SwarmConfig  # noqa: E402

__all__ = ["LocalMoE", "RemoteMoE", "Swarm", "SwarmConfig", "__version__"]
