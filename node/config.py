"""NodeConfig: every setting of a node, as CLI option, TOML key and DMOE_NODE_* variable."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from dmoe.config import option
from dmoe.core.addresses import check_announce_maddrs, split_address
from dmoe.core.aggregates import AGGREGATES
from dmoe.core.owner import MAX_RECORD_TTL
from dmoe.core.recordrules import MIN_BATCH_TOKENS, MIN_MESSAGE_BYTES
from dmoe.core.uids import expand_patterns
from dmoe.errors import ConfigError

MiB = 1 << 20
AUTOCAST = ("off", "bf16", "fp16")  # --autocast: none, torch.bfloat16, torch.float16


@dataclasses.dataclass(kw_only=True, slots=True)
class NodeConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_NODE_"

    swarm: list[str] = option([], "multiaddr of a swarm peer to join (repeat "
                                  "for several); none: start a new swarm")
    experts: list[str] = option(["ffn.[0:4]"], "expert uid patterns to host, e.g. "
                                               "'ffn.[0:8]' or 'ffn.[0:4].[0:16]'")
    model: str | None = option(None, "model published in the swarm (by dmoe train, or dmoe coordinator "
                                     "start --model) whose spec sets the expert class, sizes and "
                                     "optimizer; without --experts the node picks which of its uids to "
                                     "host by the demand trainers publish (and "
                                     "a node with --swarm and neither option follows the swarm's only "
                                     "model, if it publishes one); explicit options that disagree "
                                     "with the spec refuse the start")
    max_experts: int = option(64, "most experts the node hosts when it picks them itself (following a "
                                  "model without --experts): those whose demand their replicas cover "
                                  "least; fewer if --memory-fraction holds fewer")
    memory_fraction: float = option(0.5, "share of the memory free at start (the GPU's, or RAM on a CPU) "
                                         "the experts a node picks may take (parameters, gradients and "
                                         "optimizer state)")
    throughput: str = option("auto", "routed tokens/s one of the node's experts serves alone (forward and "
                                     "backward), which placement plans with and the node publishes: auto "
                                     "(measured at start on a scratch expert) or a number (for a machine "
                                     "that is busy at start, where the measure reads low)")
    rebalance_interval: float = option(300.0, "seconds between checks whether moving one of the experts "
                                              "the node picked would cover demand much better "
                                              "(randomised by +-50%); experts with no replica anywhere "
                                              "are covered at every heartbeat (0: never move)")
    rebalance_threshold: float = option(0.75, "move an expert for demand only when the ratio "
                                              "(demand/throughput) of the one dropped, once dropped, is at "
                                              "most this fraction of the one added's")
    expert_cls: str = option("ffn", "expert class: ffn, transformer or 'module:Class'")
    hidden_dim: int = option(1024, "model dimension of the experts' inputs and outputs")
    inner_dim: int | None = option(None, "inner dimension of built-in experts (default 4 x hidden-dim)")
    seed: int = option(0, "initialisation seed, mixed with each uid")
    device: str = option("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:N")
    num_threads: int | None = option(None, "torch CPU threads (default: torch's own choice)")
    autocast: str = option("off", "precision of the experts' compute: off (their own dtypes), bf16 or fp16 "
                                  "(autocast: matmuls in reduced precision; parameters, optimizer state and "
                                  "tensors on the wire keep their dtypes; fp16 scales the gradients); on a "
                                  "CPU only off or bf16; experts may opt out")
    host: str = option("127.0.0.1", "address the gRPC server and the DHT peer listen on")
    port: int = option(0, "gRPC port (0: any free port; the one taken is printed)")
    dht_port: int = option(0, "DHT (libp2p) port (0: any free port)")
    announce_host: str | None = option(None, "host others should dial for gRPC (default: --host)")
    announce_port: int | None = option(None, "port others should dial for gRPC, when a port forward or proxy "
                                             "sits in front of the node (default: the port it listens on)")
    identity_path: str | None = option(None, "file holding the DHT private key, "
                                             "so the peer id survives restarts")
    dht_announce: list[str] = option([], "multiaddr others dial for this DHT peer, behind a NAT "
                                         "or in a container (repeat), e.g. /dns4/node1/tcp/31341")
    checkpoint_dir: str | None = option(None, "directory for expert checkpoints (none: no checkpoints)")
    checkpoint_interval: float = option(60.0, "seconds between periodic checkpoints of experts that changed")
    keep_checkpoints: int = option(3, "checkpoints kept per expert; older ones are deleted")
    optimizer: str = option("adam", "expert optimizer: adam or sgd")
    lr: float = option(1e-3, "learning rate of the expert optimizers")
    max_grad_norm: float = option(1.0, "gradient clipping norm per expert step (0: no clipping)")
    batching: bool = option(True, "merge concurrent requests for one expert into one device call")
    grouping: bool = option(True, "run the waiting batches of many same-shaped small experts as one "
                                  "vectorised device call and one optimizer step (with batching)")
    max_batch_tokens: int = option(4096, "largest batch (tokens) run in one device call, and per request "
                                         "(on a CUDA device, when not given: sized by the device memory "
                                         "free once the experts are placed)")
    max_queued_tokens: int = option(32768, "tokens that may wait per expert and "
                                           "direction before new ones are shed")
    max_message_bytes: int = option(32 * MiB, "largest unary gRPC message; bigger requests use the streams")
    max_request_bytes: int = option(512 * MiB, "largest request accepted at all, streamed or not")
    max_concurrent_calls: int = option(512, "calls served at once; more get RESOURCE_EXHAUSTED")
    max_inflight_bytes: int = option(1024 * MiB, "bytes all request streams together may hold while arriving")
    max_watch_streams: int = option(16, "health Watch and reflection streams open at once, in all (at most "
                                        "half of max-concurrent-calls); more get RESOURCE_EXHAUSTED")
    max_info_uids: int = option(4096, "uids one Info call may name (each once); more get RESOURCE_EXHAUSTED")
    max_calls_per_peer: int = option(128, "calls one peer (IP address, IPv6 /64, or TLS client "
                                          "certificate) may have in flight; more get RESOURCE_EXHAUSTED")
    max_parts_per_peer: int = option(4096, "parts of batched calls (one per expert) one peer may have in "
                                           "flight; more parts are refused alone with RESOURCE_EXHAUSTED")
    peer_rate: float = option(2000.0, "requests per second one peer may send on average "
                                      "(each chunk of a stream is one)")
    peer_burst: float = option(4000.0, "requests one peer may send at once "
                                       "above peer_rate (token bucket size)")
    receive_timeout: float = option(60.0, "seconds a streamed request may take to arrive; "
                                          "slower ones are dropped (DEADLINE_EXCEEDED), "
                                          "so slow senders cannot hold calls forever")
    max_input_abs: float = option(1e4, "largest magnitude accepted in an expert's inputs; larger is refused")
    max_grad_abs: float = option(1e3, "largest magnitude accepted in grad_outputs of a Backward "
                                      "call; larger is refused before it reaches the optimizer")
    peer_steps_per_minute: float = option(3000.0, "optimizer steps per minute one peer's Backward calls "
                                                  "may cause on one expert (bursts of 10 s' worth); past "
                                                  "it they are still answered, but do not update the "
                                                  "expert, counted in Info's skipped_updates (0: no limit)")
    max_peer_step_share: float = option(0.5, "largest share of an expert's steps in the last minute one "
                                             "peer may cause, while others train it too (never less than "
                                             "this share of peer_steps_per_minute; 1: no cap)")
    swarm_key: str | None = option(None, "file with the key of a private swarm (dmoe swarm "
                                         "keygen): calls and DHT peers without it are refused")
    tls: bool = option(True, "in a private swarm, encrypt calls with "
                             "TLS (certificates made from the swarm key)")
    reachability: str = option("auto", "can others dial this node's gRPC port? auto: ask a relay to dial "
                                       "it back; direct: yes (a public address, or a port forward); "
                                       "relay: no (behind a NAT or firewall): serve through a relay")
    relay: list[str] = option([], "relay to serve through when not reachable, host:port "
                                  "(repeat; tried in order); default: the relays "
                                  "announced in the swarm (a coordinator offers one)")
    offer_relay: bool = option(False, "also run a relay for nodes that cannot "
                                      "be dialled (this node must be reachable)")
    relay_port: int = option(0, "port of the relay this node offers (0: any free port)")
    average_interval: float = option(30.0, "seconds between replica averaging rounds (randomised by "
                                           "+-20%): each expert also hosted by other nodes blends its "
                                           "parameters with one of them (0: never)")
    average_max_distance: float = option(4.0, "a replica's parameters more than this many times a "
                                              "tensor's norm away from ours are refused, and that "
                                              "replica avoided for a while")
    average_aggregate: str = option("mean", "replica averaging: mean (blend halfway with one replica) or "
                                            "centered-clip (with up to 4 replicas, robust: one hostile "
                                            "replica's pull is bounded; with one replica, as mean)")
    heartbeat_interval: float = option(10.0, "seconds between refreshes of the DHT records")
    record_ttl: float = option(30.0, "seconds a DHT record lives without a refresh")
    shutdown_grace: float = option(10.0, "seconds in-flight calls get to finish on shutdown")
    ready_file: str | None = option(None, "write a JSON file with the endpoint "
                                          "and swarm address once serving")

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

        for name in ("hidden_dim", "max_batch_tokens", "max_queued_tokens", "max_message_bytes",
                     "max_request_bytes", "max_concurrent_calls", "max_inflight_bytes", "heartbeat_interval",
                     "record_ttl", "checkpoint_interval", "keep_checkpoints", "lr", "max_calls_per_peer",
                     "max_parts_per_peer", "peer_rate", "peer_burst", "receive_timeout", "max_input_abs",
                     "max_grad_abs", "average_max_distance"):
            positive(name)
        if self.max_batch_tokens < MIN_BATCH_TOKENS or self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(f"max_batch_tokens must be at least {MIN_BATCH_TOKENS} and max_message_bytes "
                              f"at least {MIN_MESSAGE_BYTES}: clients skip records announcing less")
        for name in ("port", "dht_port", "relay_port", "max_grad_norm", "shutdown_grace", "average_interval"):
            positive(name, allow_zero=True)
        if self.inner_dim is not None:
            positive("inner_dim")
        if self.num_threads is not None:
            positive("num_threads")
        if self.announce_port is not None and not 0 < self.announce_port <= 65535:
            raise ConfigError(f"announce_port must be in 1..65535, got {self.announce_port}")
        if self.average_aggregate not in AGGREGATES:
            raise ConfigError(f"average_aggregate must be one of {', '.join(AGGREGATES)}, "
                              f"got {self.average_aggregate!r}")
        if self.reachability not in ("auto", "direct", "relay"):
            raise ConfigError(f"reachability must be auto, direct or relay, got {self.reachability!r}")
        if self.reachability == "relay" and not self.swarm:
            raise ConfigError("a node that cannot be dialled cannot start a swarm (nobody could join it): "
                              "give --swarm")
        if self.offer_relay and self.reachability == "relay":
            raise ConfigError("a node that cannot be dialled cannot offer a relay: drop --offer-relay or "
                              "--reachability relay")
        for address in self.relay:
            try:
                split_address(address)
            except ValueError as e:
                raise ConfigError(f"relay: {e}") from None
        if self.port > 65535 or self.dht_port > 65535 or self.relay_port > 65535:
            raise ConfigError("ports must be at most 65535")
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        if self.autocast == "fp16" and self.device.split(":")[0] == "cpu":
            raise ConfigError("autocast fp16 needs a CUDA device (on a CPU float16 is slow and not "
                              "better than bf16): use --autocast bf16 or off, or a CUDA --device")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.record_ttl <= self.heartbeat_interval:
            raise ConfigError("record_ttl must be longer than heartbeat_interval, or records lapse "
                              "between beats")
        if self.record_ttl >= MAX_RECORD_TTL:
            raise ConfigError(f"record_ttl must be below {MAX_RECORD_TTL:.0f}s: DHT peers refuse records "
                              "that live longer")
        positive("peer_steps_per_minute", allow_zero=True)
        if not 0 < self.max_peer_step_share <= 1:
            raise ConfigError(f"max_peer_step_share must be in (0, 1], got {self.max_peer_step_share}")
        positive("max_experts")
        if self.throughput != "auto":
            try:
                value = float(self.throughput)
            except ValueError:
                value = math.nan
            if not 0 < value < 1e9:
                raise ConfigError(f"throughput must be auto or a number of tokens/s in (0, 1e9), "
                                  f"got {self.throughput!r}")
        positive("rebalance_interval", allow_zero=True)
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if not 0 < self.rebalance_threshold <= 1:
            raise ConfigError(f"rebalance_threshold must be in (0, 1], got {self.rebalance_threshold}")
        positive("max_watch_streams")
        positive("max_info_uids")
        if self.peer_burst < 1:
            raise ConfigError(f"peer_burst must be at least 1, got {self.peer_burst}")
        if self.max_queued_tokens < self.max_batch_tokens:
            raise ConfigError("max_queued_tokens must be at least max_batch_tokens")
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ConfigError("max_inflight_bytes must be at least max_request_bytes")
        if self.max_request_bytes < self.max_message_bytes:
            raise ConfigError("max_request_bytes must be at least max_message_bytes")
        check_announce_maddrs("dht_announce", self.dht_announce)
        if not self.experts:
            raise ConfigError("no experts to host: give --experts, e.g. 'ffn.[0:8]'")
        try:
            expand_patterns(self.experts)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model is not None and not self.swarm:
            raise ConfigError("--model follows a model published in a swarm: give --swarm too")
        if self.host in ("0.0.0.0", "::") and not self.announce_host:
            raise ConfigError(f"listening on {self.host}: give --announce-host, the address others dial")

    @property
    def uids(self) -> list[str]:
        return expand_patterns(self.experts)


def explicit_fields(config: NodeConfig) -> frozenset[str]:
    """The fields of ``config`` that differ from their defaults: what a config made in Python sets
    explicitly (the CLI knows exactly: :func:`dmoe.config.given_fields`)."""
    defaults = NodeConfig()
    return frozenset(f.name for f in dataclasses.fields(NodeConfig)
                     if getattr(config, f.name) != getattr(defaults, f.name))
