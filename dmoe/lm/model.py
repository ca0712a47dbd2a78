"""A byte-level transformer language model whose feed-forward sublayers are MoE layers.

Embeddings, attention, layer norms and the MoE gates live in this process; the experts of layer
``i`` are ``<prefix><i>.<j>`` (``lm0.3``), or, on a grid of several dimensions (``LMConfig.grid``),
``<prefix><i>.<a>.<b>`` (a 32x32 grid: one gate per dimension, the swarm's live candidates found by
beam search over them). They live on the swarm's nodes (:class:`dmoe.moe.remote.RemoteMoE`),
in this process (:class:`dmoe.moe.local.LocalMoE`, ``--local``), or are replaced by one dense
feed-forward block with the same number of active parameters per token (``ffn='dense'``: the
inner width is k x the expert's), the baseline that sparse models are measured against.

Each block is pre-norm: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``. A token whose experts all
failed gets a zero from its MoE sublayer and is carried by the residual path.

Generation (:meth:`MoELM.generate`) keeps a key/value cache of the attention (:class:`KVCache`): each
step runs only the new byte through the model, so every MoE layer sends one token to its experts,
whatever the context's length. That is exact because the feed-forward sublayers are per-position (an
``ffn`` expert's or the dense block's output for a token depends on that token alone, and top-k
routing is per token): the outputs of earlier positions never change. A model with a sublayer that
is not known to be per-position (``transformer``-class or Switch-routed experts, whose output for a
token depends on the other tokens of the call, or any other module) falls back to the full context:
it recomputes the whole window for every byte, as ``cache=False`` does.

Positions are absolute (learned embeddings of 0..seq_len-1), so a window that slides by one byte
moves every cached byte to another position and would leave nothing to reuse. When the context
outgrows ``seq_len``, generation therefore drops ``slide`` bytes at once (default ``seq_len // 2``)
and rebuilds the cache from the rest in one step; the full-context path uses the same windows, so
both give the same text, and ``slide=1`` is the window of the last ``seq_len`` bytes on every step
(the cache is then rebuilt on every step past ``seq_len``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.core.experts import FeedForwardExpert
from dmoe.lm.config import LMConfig
from dmoe.lm.data import VOCAB_SIZE
from dmoe.moe.gating import MoELayer


class KVCache:
    """The attention keys and values of the positions a model has run, per block ([B, H, S, Dh] each),
    so that the next forward runs only the new positions (:meth:`MoELM.forward` with ``cache``)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        """Positions held (by every block once a forward is done: it extends them in order)."""
        return self.num_positions(len(self.keys) - 1)

    def num_positions(self, layer: int) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[2]

    def extend(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values to block ``layer``'s; returns all of them."""
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None and past_v is not None:
            k_BHTd, v_BHTd = torch.cat([past_k, k_BHTd], dim=2), torch.cat([past_v, v_BHTd], dim=2)
        self.keys[layer], self.values[layer] = k_BHTd, v_BHTd
        return k_BHTd, v_BHTd


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Causal attention of the T positions of ``x_BTD``; with ``cache``, they follow the positions
        it holds, attend to those too, and their keys and values are added to it (as block ``layer``'s)."""
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        num_past = cache.num_positions(layer) if cache is not None else 0
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        if num_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # the newest position sees every position
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # query i (position num_past + i) sees keys 0..num_past + i
            mask_TS = torch.ones(T, num_past + T, dtype=torch.bool, device=x_BTD.device).tril(num_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS)
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

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), cache, layer)
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

    def per_position(self) -> bool:
        """Whether every feed-forward sublayer's output for a token depends on that token alone, so that
        a :class:`KVCache` gives the same outputs as the full context (see the module's docstring)."""
        return all(_per_position(block.ffn) for block in self.blocks)

    def forward(self, tokens_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, 256] of the next byte. With ``cache``, ``tokens_BT`` are the positions after
        those the cache holds (their keys and values are added to it): only they are run, and every
        MoE layer sends only them to its experts. Only for a model whose sublayers are per-position
        (:meth:`per_position`); :meth:`generate` checks."""
        T = tokens_BT.shape[1]
        start = len(cache) if cache is not None else 0
        if start + T > self.config.seq_len:
            raise ValueError(f"sequence of {start + T} bytes is longer than seq_len={self.config.seq_len}")
        x = self.embed(tokens_BT) + self.position(torch.arange(start, start + T, device=tokens_BT.device))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
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
                 top_k: int | None = None, generator: torch.Generator | None = None, cache: bool = True,
                 slide: int | None = None) -> list[int]:
        """Sample bytes after the prompt (temperature 0: greedy). Returns only the new bytes.

        The model sees a window of the context: the prompt's last ``seq_len`` bytes, then each new byte
        appended; when the window would pass ``seq_len`` bytes, its first ``slide`` bytes (default
        ``seq_len // 2``) are dropped. With ``cache`` (and a per-position model, :meth:`per_position`),
        each step runs only the new byte, or the whole window once after it slid; without, every step
        runs the whole window. Both give the same logits, up to float rounding."""
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError("need temperature >= 0 and top_k >= 1")
        seq_len = self.config.seq_len
        slide = default_slide(seq_len) if slide is None else slide
        if not 1 <= slide <= seq_len:
            raise ValueError(f"slide must be in [1, seq_len={seq_len}], got {slide}")
        cache = cache and self.per_position()
        tokens = list(prompt) or [ord("\n")]
        start = max(0, len(tokens) - seq_len)  # the window is tokens[start:]
        kv: KVCache | None = None  # the keys and values of the window's first len(kv) bytes
        new: list[int] = []
        for _ in range(max_new_tokens):
            if cache:
                kv = kv if kv is not None else KVCache(len(self.blocks))
                logits = self(torch.tensor([tokens[start + len(kv):]]), kv)[0, -1]
            else:
                logits = self(torch.tensor([tokens[start:]]))[0, -1]
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
            if len(tokens) - start > seq_len:  # the window slides: positions change, the cache is stale
                start += slide
                kv = None
        return new


def default_slide(seq_len: int) -> int:
    """Bytes dropped at once from a full window (:meth:`MoELM.generate`): half of it, so that the cache
    is rebuilt once every ``seq_len // 2`` bytes and the model always sees at least half a window."""
    return max(1, seq_len // 2)


def _per_position(ffn: nn.Module) -> bool:
    """Whether ``ffn``'s output for a token depends on that token alone: the dense block, or an MoE layer
    with top-k routing (per token; Switch's capacity is shared by the tokens of a call) whose experts
    are FFN experts. A LocalMoE's experts are checked; a RemoteMoE's are FFN experts unless its
    ``expert_schema`` names another class (the nodes' class is not known without one, and MoELM's
    feed-forward sublayers call their experts one token per row, as FFN experts take them)."""
    if isinstance(ffn, DenseFFN):
        return True
    if not isinstance(ffn, MoELayer) or ffn.routing != "topk":
        return False
    experts = getattr(ffn, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return all(isinstance(expert, FeedForwardExpert) for expert in experts)
    schema = getattr(ffn, "expert_schema", None)
    return schema is None or schema.split("/")[0] == "ffn"


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def local_moe_factory() -> MoEFactory:
    from dmoe.moe.local import LocalMoE

    return lambda config, i: LocalMoE(prefix=config.layer_prefix(i), grid=config.grid_shape,
                                      in_features=config.d_model, k=config.k, inner_dim=config.expert_inner)


def remote_moe_factory(swarm, **remote_options) -> MoEFactory:
    """RemoteMoE layers on ``swarm``, on the config's grid with its beam size; ``remote_options`` are
    RemoteMoE's (timeouts, k_min, compression)."""
    from dmoe.moe.remote import RemoteMoE

    return lambda config, i: RemoteMoE(swarm, prefix=config.layer_prefix(i), grid=config.grid_shape,
                                       in_features=config.d_model, k=config.k,
                                       beam_size=config.beam_size or None, **remote_options)


def num_active_params(config: LMConfig) -> int:
    """Parameters that touch one token in the feed-forward sublayers (both kinds of model match)."""
    inner = config.k * config.expert_inner
    return config.num_layers * (2 * config.d_model * inner + inner + config.k * config.d_model)

