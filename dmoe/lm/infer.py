"""Inference through the client: InferConfig and load_model (``dmoe infer``).

A checkpoint written by ``dmoe train --save`` holds the client-side parameters; the experts stay on
the swarm's nodes (or, for a model trained with ``--local``, are in the checkpoint too). Generation
runs the same RemoteMoE layers as training, with the same deadlines and fallbacks: a node that
dies mid-generation costs the tokens routed to it their expert output, not the generation.
"""

from __future__ import annotations

import torch

from dmoe.errors import CheckpointError, ConfigError
from dmoe.lm.config import InferConfig
from dmoe.lm.model import MoELM, local_moe_factory, remote_moe_factory


def load_model(config: InferConfig, swarm=None) -> MoELM:
    """The model of the checkpoint, its MoE layers on ``swarm`` unless it was trained --local."""
    from dmoe.lm.train import load_checkpoint, model_spec

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
            timeout_after_k_min=config.timeout_after_k_min, compression=config.compression,
            expert_schema=model_spec(model_config).expert_schema))  # nodes of other sizes are not called
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{config.checkpoint}: {e}") from None
    return model.eval()


def needs_swarm(checkpoint: str) -> bool:
    from dmoe.lm.train import load_checkpoint

    model_config, state, _ = load_checkpoint(checkpoint)
    return model_config.ffn == "moe" and not any(".experts." in name for name in state)


def generate(model: MoELM, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0) -> str:
    """The text the model writes after ``prompt`` (bytes decoded as UTF-8, bad sequences replaced)."""
    generator = torch.Generator().manual_seed(seed)
    new = model.generate(list(prompt.encode("utf-8")), max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=generator)
    return bytes(new).decode("utf-8", errors="replace")
