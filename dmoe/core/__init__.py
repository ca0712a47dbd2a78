"""dmoe.core: what the client, the node, the relay and the coordinator share. Imports no other dmoe
package (checked by the import contract in pyproject.toml).

- ``wire.py``        tensors on the wire: serialize/deserialize with compression (none, fp16, 8-bit), chunking
- ``compression.py`` COMPRESSION_NAMES: the compressions by their user names and wire codes (no torch)
- ``uids.py``        expert uids (``prefix.i.j``) and grid patterns (``ffn.[0:8]``)
- ``experts.py``     expert modules (ffn, transformer, module:Class), TensorSpec schemas, seeds from uids
- ``dht.py``         DHTPeer: a hivemind DHTNode in this process, on an event loop of its own thread
- ``records.py``     DHT records of experts, nodes and relays (owned; replicas); find_experts, find_nodes, ...
- ``owner.py``       OwnerKey: the Ed25519 key that owns a peer's records; owned subkeys; MAX_RECORD_TTL
- ``recordguard.py`` OwnedRecordValidator (signatures, lifetimes) and guard_node (storage without early loss)
- ``modelspec.py``   ModelSpec: the model a swarm trains, owned record under ``_dmoe.models``; SpecPublisher
- ``demand.py``      DemandRecord, DemandMeter, DemandPublisher: trainers' tokens/s per expert; coverage
- ``placement.py``   choose, plan_moves, balance: which experts a node hosts and when it moves one
- ``auth.py``        SwarmKey, CallVerifier: a private swarm's key and call tokens
- ``dhtauth.py``     DHTAuthorizer: signed DHT traffic (needs hivemind, which auth.py does not)
- ``tls.py``         mutual TLS with a CA derived from the swarm key
- ``addresses.py``   ``host:port`` and libp2p multiaddrs: split, join, check; address_group (IPv4, IPv6 /64)
- ``contribution.py`` check_contribution: the guard on tensors a peer offers to average (trainers, replicas)
- ``robust.py``      centered_clip: a robust aggregate (CenteredClip) of peers' tensors, instead of the mean
- ``aggregates.py``  AGGREGATES: the names of the averaging aggregates the configs accept (no torch)
- ``checkpoint.py``  CheckpointStore: atomic safetensors checkpoints, the last few kept; TrainingState
- ``ratelimit.py``   TokenBucket: the rate limiter of the node's per-peer limits and of the relay
- ``files.py``       write_json_atomic: files that readers see whole or not at all (never through a symlink)
- ``recordrules.py`` what a record read from a peer may say: check_endpoint, floors of limits, bounds
- ``logsafe.py``     printable: peer-controlled text escaped and cut for a log line
"""
