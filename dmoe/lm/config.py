"""The language model's configs: LMConfig (the model), TrainConfig (``dmoe train``), InferConfig
(``dmoe infer``); the last two nest a SwarmConfig for joining the swarm. Torch-free, so the CLI can
build its options without importing torch."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

from dmoe.client.config import SwarmConfig
from dmoe.config import check_nested, nested, option
from dmoe.core.aggregates import AGGREGATES
from dmoe.core.compression import COMPRESSION_NAMES
from dmoe.errors import ConfigError


@dataclasses.dataclass(kw_only=True, slots=True)
class LMConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_LM_"

    d_model: int = option(128, "model width (the experts' hidden dim: nodes need --hidden-dim equal "
                               "to it)")
    num_layers: int = option(2, "transformer blocks, one MoE layer each")
    num_heads: int = option(4, "attention heads")
    seq_len: int = option(128, "context length in bytes")
    prefix: str = option("lm", "expert uids of layer i are <prefix><i>.<j>")
    num_experts: int = option(8, "experts per layer, a 1-D grid (with --grid: the grid's size, set from it)")
    grid: str = option("", "the experts of each layer as a grid of 1-4 dimensions, e.g. 32x32 (1,024 experts "
                           "lm<i>.<a>.<b>, found by beam search over the dimensions); empty: a 1-D grid of "
                           "num_experts")
    beam_size: int = option(0, "prefixes the beam search keeps per token at each level of the grid "
                               "(0: 2 x k)")
    k: int = option(2, "experts per token")
    expert_inner: int = option(256, "inner width of each expert (nodes need --inner-dim equal to it)")
    ffn: str = option("moe", "feed-forward sublayers: moe or dense (k x expert_inner wide)")
    aux_loss_weight: float = option(0.01, "weight of the load-balancing loss")
    z_loss_weight: float = option(0.001, "weight of the router z-loss")

    # fields left out of to_dict() at these values, so that the configs saved before they existed (in
    # checkpoints, compared on resume) still equal those of the same model now
    _OMITTED_AT: ClassVar[dict] = {"grid": "", "beam_size": 0}

    def __post_init__(self) -> None:
        if self.grid:
            self.num_experts = math.prod(parse_grid(self.grid))
        for name in ("d_model", "num_layers", "num_heads", "seq_len", "num_experts", "k",
                     "expert_inner"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.beam_size < 0 or 0 < self.beam_size < self.k:
            raise ConfigError(f"beam_size must be 0 (2 x k) or at least k ({self.k}), got {self.beam_size}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if self.k > self.num_experts:
            raise ConfigError(f"k ({self.k}) must be at most num_experts ({self.num_experts})")
        if self.ffn not in ("moe", "dense"):
            raise ConfigError(f"ffn must be moe or dense, got {self.ffn!r}")

    def layer_prefix(self, layer: int) -> str:
        return f"{self.prefix}{layer}"

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Each layer's grid of experts: ``(num_experts,)``, or the sizes of ``grid`` (``(32, 32)``)."""
        return parse_grid(self.grid) if self.grid else (self.num_experts,)

    def expert_patterns(self) -> list[str]:
        """What a node hosting every expert of this model passes to --experts: ``lm0.[0:8]``, or
        ``lm0.[0:32].[0:32]`` for a 32x32 grid."""
        dims = "".join(f".[0:{size}]" for size in self.grid_shape)
        return [f"{self.layer_prefix(i)}{dims}" for i in range(self.num_layers)]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in self._OMITTED_AT and getattr(self, f.name) == self._OMITTED_AT[f.name])}

    @classmethod
    def from_dict(cls, values: dict) -> LMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


MAX_GRID_DIMS, MAX_GRID_SIZE = 4, 4096  # those of a published model (dmoe.core.modelspec)


def parse_grid(text: str) -> tuple[int, ...]:
    """``"32x32"`` -> ``(32, 32)``; ConfigError for what is not 1-4 sizes of 1..4096 joined by x."""
    if not re.fullmatch(r"\d+(x\d+)*", text.strip()):
        raise ConfigError(f"grid must be sizes joined by x, e.g. 32x32 or 16x16x4; got {text!r}")
    sizes = tuple(int(size) for size in text.strip().split("x"))
    if len(sizes) > MAX_GRID_DIMS or not all(1 <= size <= MAX_GRID_SIZE for size in sizes):
        raise ConfigError(f"grid has 1..{MAX_GRID_DIMS} dimensions of 1..{MAX_GRID_SIZE} each; got {text!r}")
    return sizes


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainConfig(LMConfig):
    """The model's options (LMConfig) and the training run's."""

    ENV_PREFIX: ClassVar[str] = "DMOE_TRAIN_"

    # joining the swarm: option name -> SwarmConfig field (options, TOML keys, DMOE_TRAIN_* variables);
    # a [swarm] table in the TOML file sets any SwarmConfig field (cache_ttl, ban_max, ...)
    swarm: SwarmConfig = nested(SwarmConfig, {"swarm": "initial_peers", "swarm_key": "swarm_key",
                                              "host": "host", "lookup_timeout": "lookup_timeout"}, table=True)
    local: bool = option(False, "run the experts in this process instead of on a swarm")
    data: str = option("stdlib", "text: 'stdlib' (Python's standard library sources), a file or a folder")
    steps: int = option(1000, "training steps to run (counted from the start, so resume continues to it)")
    max_time: float = option(0.0, "stop after this many seconds of training, evaluate and save, as at "
                                  "--steps (0: no time limit)")
    batch_size: int = option(16, "sequences per step")
    steps_in_flight: int = option(1, "training steps run at once, each on its own copy of the client-side "
                                     "parameters (gradients applied in order, up to this many minus one "
                                     "steps late): a step's forward overlaps another's backward on the "
                                     "wire; the late gradients cost learning per step, less with the "
                                     "first 40 steps one at a time and a step n updates late having its "
                                     "update divided by n (dmoe.lm.overlap)")
    lr: float = option(1e-3, "learning rate of the client-side parameters (Adam)")
    max_grad_norm: float = option(1.0, "gradient clipping of the client-side parameters (0: none)")
    seed: int = option(0, "seed of the model's initialisation and of the data order")
    save: str | None = option(None, "directory for checkpoints of the client-side parameters and "
                                    "optimizer")
    save_interval: int = option(100, "steps between checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in --save")
    eval_interval: int = option(50, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = option(4, "held-out batches per evaluation")
    run_id: str | None = option(None, "average client-side parameters with the other trainers of this run")
    average_interval: float = option(10.0, "seconds between averaging rounds (with --run-id)")
    average_aggregate: str = option("mean", "how this trainer reduces its part of each averaging round: "
                                            "mean, or centered-clip (robust: one hostile trainer's pull "
                                            "is bounded by tau)")
    average_clip_tau: float = option(1.0, "centered-clip's tau, as a multiple of the median distance of "
                                          "the trainers' values from their coordinate-wise median (per part)")
    average_clip_iterations: int = option(20, "centered-clip's iterations at most (it stops once converged)")
    k_min: int = option(1, "experts that must answer for a token")
    forward_timeout: float = option(10.0, "deadline of an expert forward call (s)")
    timeout_after_k_min: float = option(1.0, "wait for the other experts after k_min answered (s)")
    backward_timeout: float = option(10.0, "deadline of an expert backward call (s)")
    compression: str = option("none", "activations and gradients on the wire: none, fp16, 8bit")
    metrics_file: str | None = option(None, "append one JSON line per step and per evaluation to this file")
    publish_demand: bool = option(True, "publish in the swarm the tokens/s the gates route to each expert, "
                                        "so that nodes can place themselves where they are needed")
    demand_interval: float = option(30.0, "seconds between publications of the demand (randomised by 20%)")

    def __post_init__(self) -> None:
        LMConfig.__post_init__(self)
        check_nested(self)
        for name in ("steps", "batch_size", "save_interval", "eval_batches", "steps_in_flight"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_interval < 0 or self.lr <= 0 or self.average_interval <= 0 or self.max_time < 0:
            raise ConfigError("need eval_interval >= 0, lr > 0, average_interval > 0 and max_time >= 0")
        if self.compression not in COMPRESSION_NAMES:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSION_NAMES)}, "
                              f"got {self.compression!r}")
        if self.average_aggregate not in AGGREGATES:
            raise ConfigError(f"average_aggregate must be one of {', '.join(AGGREGATES)}, "
                              f"got {self.average_aggregate!r}")
        if not self.average_clip_tau > 0 or self.average_clip_iterations < 1:
            raise ConfigError("need average_clip_tau > 0 and average_clip_iterations >= 1")
        if self.ffn == "moe" and not self.local:
            self.swarm.require_peers("give --swarm ADDR (printed by a coordinator or node), or --local")
        if self.run_id is not None and not self.swarm.initial_peers:
            raise ConfigError("--run-id averages with other trainers over a swarm: give --swarm too")
        if self.resume and not self.save:
            raise ConfigError("--resume needs --save DIR, where the checkpoints are")
        if not 0 < self.demand_interval <= 120:  # dmoe.core.demand.MAX_INTERVAL: records outlive the wait
            raise ConfigError(f"demand_interval must be in (0, 120] seconds, got {self.demand_interval}")

    @property
    def model_config(self) -> LMConfig:
        return LMConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(LMConfig)})


@dataclasses.dataclass(kw_only=True, slots=True)
class InferConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_INFER_"

    # joining the swarm (not needed for a model trained --local or dense): option name -> SwarmConfig
    # field; a [swarm] table in the TOML file sets any SwarmConfig field
    swarm: SwarmConfig = nested(SwarmConfig, {"swarm": "initial_peers", "swarm_key": "swarm_key",
                                              "host": "host"}, table=True)
    checkpoint: str = option("", "directory that dmoe train --save wrote")
    prompt: str = option("def ", "text to continue")
    max_new_tokens: int = option(200, "bytes to generate")
    temperature: float = option(0.8, "sampling temperature (0: greedy)")
    top_k: int | None = option(40, "sample among the k likeliest bytes (none: all)")
    seed: int = option(0, "sampling seed")
    k_min: int = option(1, "experts that must answer for a token")
    forward_timeout: float = option(10.0, "deadline of an expert call (s)")
    timeout_after_k_min: float = option(1.0, "wait for the other experts after k_min answered (s)")
    compression: str = option("none", "activations on the wire: none, fp16, 8bit")
    cache: bool = option(True, "keep the attention's keys and values: each byte sends one token per layer "
                               "to the experts (--no-cache: the whole context every byte; same text)")
    slide: int = option(0, "bytes dropped at once when the context outgrows the model's seq_len (0: half "
                           "of seq_len; 1: always the last seq_len bytes, the cache rebuilt every byte)")

    def __post_init__(self) -> None:
        check_nested(self)
        if self.slide < 0:
            raise ConfigError(f"slide must be >= 0 (0: half of the model's seq_len), got {self.slide}")
        if not self.checkpoint:
            raise ConfigError("give --checkpoint DIR, the directory dmoe train --save wrote")
        if self.max_new_tokens < 0 or self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise ConfigError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1")
        if self.compression not in COMPRESSION_NAMES:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSION_NAMES)}")
