"""Inference through the client: InferConfig and load_model (``dmoe infer``).

A checkpoint written by ``dmoe train --save`` holds the client-side parameters; the experts stay on
the swarm's nodes (or, for a model trained with ``--local``, are in the checkpoint too). Generation
runs the same RemoteMoE layers as training, with the same deadlines and fallbacks: a node that
dies mid-generation costs the tokens routed to it their expert output, not the generation.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from dmoe.config import option
from dmoe.errors import CheckpointError, ConfigError
from dmoe.lm import MoELM, local_moe_factory, remote_moe_factory
from dmoe.wire import COMPRESSION_NAMES


@dataclasses.dataclass(kw_only=True, slots=True)
class InferConfig:
    ENV_PREFIX: ClassVar[str] = "DMOE_INFER_"

    swarm: list[str] = option([], "multiaddr of a swarm peer (repeat for several); not needed for --local models")
    swarm_key: str | None = option(None, "file with the key of a private swarm (dmoe swarm keygen); none: an open swarm")
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
    host: str = option("127.0.0.1", "address this client's DHT peer listens on")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("give --checkpoint DIR, the directory dmoe train --save wrote")
        if self.max_new_tokens < 0 or self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise ConfigError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1")
        if self.compression not in COMPRESSION_NAMES:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSION_NAMES)}")


def load_model(config: InferConfig, swarm=None) -> MoELM:
    """The model of the checkpoint, its MoE layers on ``swarm`` unless it was trained --local."""
    from dmoe.train import load_checkpoint

    model_config, state, _ = load_checkpoint(config.checkpoint)
    local = any(".experts." in name for name in state)
    if model_config.ffn == "dense":
        model = MoELM(model_config)
    elif local:
        model = MoELM(model_config, local_moe_factory())
    else:
        if swarm is None:
            raise ConfigError("this model's experts live on a swarm: give --swarm ADDR")
        model = MoELM(model_config, remote_moe_factory(
            swarm, k_min=config.k_min, forward_timeout=config.forward_timeout,
            timeout_after_k_min=config.timeout_after_k_min, compression=config.compression))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{config.checkpoint}: {e}") from None
    return model.eval()


def needs_swarm(checkpoint: str) -> bool:
    from dmoe.train import load_checkpoint

    model_config, state, _ = load_checkpoint(checkpoint)
    return model_config.ffn == "moe" and not any(".experts." in name for name in state)


def generate(model: MoELM, prompt: str, max_new_tokens: int, *, temperature: float = 0.8, top_k: int | None = 40,
             seed: int = 0) -> str:
    """The text the model writes after ``prompt`` (bytes decoded as UTF-8, bad sequences replaced)."""
    generator = torch.Generator().manual_seed(seed)
    new = model.generate(list(prompt.encode("utf-8")), max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=generator)
    return bytes(new).decode("utf-8", errors="replace")
