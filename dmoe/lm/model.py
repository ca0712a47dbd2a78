"""A byte-level transformer language model whose feed-forward sublayers are MoE layers.

Embeddings, attention, layer norms and the MoE gates live in this process; the experts of layer
``i`` are ``<prefix><i>.<j>`` (``lm0.3``) and live on the swarm's nodes (:class:`dmoe.moe.remote.RemoteMoE`),
in this process (:class:`dmoe.moe.local.LocalMoE`, ``--local``), or are replaced by one dense
feed-forward block with the same number of active parameters per token (``ffn='dense'``: the
inner width is k x the expert's), the baseline that sparse models are measured against.

Each block is pre-norm: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``. A token whose experts all
failed gets a zero from its MoE sublayer and is carried by the residual path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.lm.config import LMConfig
from dmoe.lm.data import VOCAB_SIZE
from dmoe.moe.gating import MoELayer


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, inner: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, inner), nn.GELU(), nn.Linear(inner, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, config: LMConfig, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.num_heads)
        self.ffn = ffn

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD))
        return x_BTD + self.ffn(self.ln2(x_BTD))


MoEFactory = Callable[[LMConfig, int], nn.Module]  # (config, layer index) -> the layer's MoE sublayer


class MoELM(nn.Module):
    def __init__(self, config: LMConfig, make_moe: MoEFactory | None = None):
        super().__init__()
        self.config = config
        if config.ffn == "moe" and make_moe is None:
            raise ValueError("an MoE model needs make_moe: remote_moe_factory(swarm) or local_moe_factory()")
        self.embed = nn.Embedding(VOCAB_SIZE, config.d_model)
        self.position = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config, DenseFFN(config.d_model, config.k * config.expert_inner) if config.ffn == "dense"
                  else make_moe(config, i))
            for i in range(config.num_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        # local experts keep the uid-seeded weights that a node would give them
        experts = {id(m) for layer in self.moe_layers()
                   for m in getattr(layer, "experts", nn.Module()).modules()}
        for module in self.modules():
            if id(module) not in experts:
                _init_weights(module)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, 256] of the next byte."""
        T = tokens_BT.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} bytes is longer than seq_len={self.config.seq_len}")
        x = self.embed(tokens_BT) + self.position(torch.arange(T, device=tokens_BT.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.T  # tied input and output embeddings

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise: cross-entropy + weighted aux and z losses, the cross-entropy alone)."""
        logits = self(tokens_BT)
        ce = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets_BT.reshape(-1))
        total = ce
        for layer in self.moe_layers():
            total = (total + self.config.aux_loss_weight * layer.aux_loss
                     + self.config.z_loss_weight * layer.z_loss)
        return total, ce.detach()

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
        """Sample bytes after the prompt (temperature 0: greedy). Returns only the new bytes."""
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError("need temperature >= 0 and top_k >= 1")
        tokens = list(prompt) or [ord("\n")]
        new: list[int] = []
        for _ in range(max_new_tokens):
            context = torch.tensor([tokens[-self.config.seq_len:]])
            logits = self(context)[0, -1]
            if temperature == 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, VOCAB_SIZE)).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            tokens.append(token)
            new.append(token)
        return new


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def local_moe_factory() -> MoEFactory:
    from dmoe.moe.local import LocalMoE

    return lambda config, i: LocalMoE(prefix=config.layer_prefix(i), grid=(config.num_experts,),
                                      in_features=config.d_model, k=config.k, inner_dim=config.expert_inner)


def remote_moe_factory(swarm, **remote_options) -> MoEFactory:
    """RemoteMoE layers on ``swarm``; ``remote_options`` are RemoteMoE's (timeouts, k_min, compression)."""
    from dmoe.moe.remote import RemoteMoE

    return lambda config, i: RemoteMoE(swarm, prefix=config.layer_prefix(i), grid=(config.num_experts,),
                                       in_features=config.d_model, k=config.k, **remote_options)


def num_active_params(config: LMConfig) -> int:
    """Parameters that touch one token in the feed-forward sublayers (both kinds of model match)."""
    inner = config.k * config.expert_inner
    return config.num_layers * (2 * config.d_model * inner + inner + config.k * config.d_model)

