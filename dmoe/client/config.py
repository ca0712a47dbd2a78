"""SwarmConfig: how a process joins a swarm and treats its peers (peers, key, host, lookups, back-off,
quarantine, spot checks of replicas, one call per node). Declared once here and nested in the configs
of ``dmoe train``, ``dmoe infer``, ``dmoe swarm status`` and ``dmoe coordinator start``
(:func:`dmoe.config.nested`), which take their swarm options, help texts and defaults from it.

Torch-free and hivemind-free, so the CLI can build its options without importing either.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dmoe.config import option
from dmoe.errors import ConfigError


@dataclasses.dataclass(kw_only=True, slots=True)
class SwarmConfig:
    """No peers is a valid config (a coordinator starts a swarm, a ``--local`` run needs none); what
    joins a swarm calls :meth:`require_peers`."""

    ENV_PREFIX: ClassVar[str] = "DMOE_SWARM_"

    initial_peers: list[str] = option([], "multiaddr of a swarm peer to join, as a coordinator or node "
                                          "printed it (repeat for several; any live peer will do)")
    swarm_key: str | None = option(None, "file with the key of a private swarm (dmoe swarm keygen); "
                                         "none: an open swarm")
    host: str = option("127.0.0.1", "address this process's DHT peers listen on")
    cache_ttl: float = option(5.0, "seconds a lookup of live experts is reused")
    cache_grace: float | None = option(None, "seconds past cache_ttl that a lookup is still used while a "
                                             "newer one runs in the background (so that a step does not "
                                             "wait for the DHT); past them a step waits for it (none: "
                                             "cache_ttl; 0: always wait)")
    lookup_timeout: float = option(5.0, "seconds a lookup of live experts may take; past it the last "
                                        "known experts are used")
    # a cold lookup of 256 tokens (bench_lookup.py: gating and the DHT reads of 64 prefix keys holding 4,096
    # records, 4 nodes and a coordinator) took 500-680 ms merging every peer's copy of each key and
    # 250-350 ms merging the 2 nearest peers'. A narrow read misses a record only where the nearest peers
    # joined after its node's last store and before the node's early beat for them (node/announcer.py);
    # the background reads (cache_grace) merge every peer's copy and find it
    lookup_breadth: int = option(2, "how many of the DHT peers nearest each prefix key a lookup that a step "
                                    "waits for merges the copies of (0: hivemind's default, its bucket "
                                    "size, every peer of a small swarm; fewer is faster, and makes it "
                                    "easier for a peer placed near a key to hide records from those reads)")
    ban_base: float = option(1.0, "seconds a failing endpoint is avoided after its first failure")
    ban_max: float = option(60.0, "longest time a failing endpoint is avoided")
    quarantine_time: float = option(600.0, "seconds an expert that answered malformed, non-finite or absurd "
                                           "values (or denied hosting its uid) is avoided")
    max_reply_abs: float = option(1e6, "largest magnitude accepted in an expert's reply (outputs or input "
                                       "gradients); larger counts as that expert's failure")
    # spot checks (dmoe/client/spotcheck.py), sized by benchmarks/bench_spotcheck.py: a check per 20 answers
    # adds 5% calls and well under 1% of a step's bytes, beside the step; the tolerance is above how far
    # honest replicas of the default model drift apart between averaging rounds (up to 1.24 measured)
    spot_check_rate: float = option(0.05, "probability that an expert's answer is spot-checked: a few of its "
                                          "tokens also sent to another replica of the expert and the "
                                          "outputs compared (0: never)")
    spot_check_tolerance: float = option(1.5, "largest distance |a - b| / sqrt(|a| |b|) between two "
                                              "replicas' outputs that counts as agreement; a disagreement "
                                              "settled by a third replica quarantines the one that lied")
    spot_check_tokens: int = option(4, "tokens of a checked answer sent to the other replica")
    # uvloop stays the default by measurement on the batched calls (bench_lookup.py --event-loop both, a full
    # step of 256 tokens on 4 nodes, 4 runs; bench_moe.py --event-loop both): asyncio's time per step was
    # 0.95-1.23x uvloop's on 4,096 experts, its CPU per step 1.02-1.06x, and 0.95x on one node of 32 experts,
    # within the runs' noise. asyncio was ahead with many small calls, one per expert; batching removed them
    event_loop: str = option("uvloop", "event loop of the swarm thread: uvloop or asyncio")
    batch_per_node: bool = option(True, "send a node one call per step for all the experts it hosts that "
                                        "the step uses (ForwardBatch/BackwardBatch), instead of a call per "
                                        "expert (off: a call per expert, as before; nodes without batched "
                                        "calls get calls per expert either way)")
    packed_calls: bool = option(True, "in a node's call, send every expert's rows in one tensor "
                                      "(ForwardPacked/BackwardPacked) where they share a row shape and "
                                      "dtype and compression is not 8-bit (off: a message per expert "
                                      "in the call; nodes without packed calls get those either way)")

    def __post_init__(self) -> None:
        if (self.cache_ttl < 0 or self.ban_base <= 0 or self.ban_max < self.ban_base
                or self.lookup_timeout <= 0 or self.lookup_breadth < 0
                or (self.cache_grace is not None and self.cache_grace < 0)):
            raise ConfigError("need cache_ttl >= 0, cache_grace >= 0, lookup_timeout > 0, "
                              "lookup_breadth >= 0 and 0 < ban_base <= ban_max")
        if self.quarantine_time < 0 or self.max_reply_abs <= 0:
            raise ConfigError("need quarantine_time >= 0 and max_reply_abs > 0")
        if not 0 <= self.spot_check_rate <= 1 or self.spot_check_tolerance <= 0 or self.spot_check_tokens < 1:
            raise ConfigError("need 0 <= spot_check_rate <= 1, spot_check_tolerance > 0 and "
                              "spot_check_tokens >= 1")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"event_loop must be uvloop or asyncio, got {self.event_loop!r}")

    def require_peers(self, how: str = "give the address a coordinator or node printed") -> None:
        """Raise ConfigError unless there is a peer to join; ``how`` tells the user what to give."""
        if not self.initial_peers:
            raise ConfigError(f"no swarm address: {how}")
