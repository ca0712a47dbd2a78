"""Expert modules that a node can host, and their schemas.

Built in: ``ffn`` (Linear -> GELU -> Linear, one token at a time, input ``[tokens, hidden]``) and
``transformer`` (a pre-norm self-attention + MLP block over sequences, input ``[batch, seq, hidden]``).
Any ``module:Class`` names a user's ``nn.Module`` whose constructor takes ``hidden_dim``; it may
define ``input_schema(hidden_dim) -> list[TensorSpec]`` (default: one float32 ``[-1, hidden_dim]``),
and ``allows_autocast = False`` to compute in its own dtypes on a node started with ``--autocast``, and
``runs_grouped = True`` to let a node run the batches of many such experts as one vectorised call (it must
then be a pure function of its parameters that ``torch.func.vmap`` can run, with no buffers).

Parameters are initialised from a seed derived from the uid, so every node that hosts ``ffn.3``
with the same class and sizes starts from the same weights, and a client can rebuild them locally.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
import zlib
from collections.abc import Callable

import torch
from torch import nn

FREE = -1  # a dimension of any size in a TensorSpec
_SEEDED_BUILD = threading.Lock()  # held while an expert is built from its seed (see create_expert)


@dataclasses.dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape (with FREE for any size; dimension 0 is always the batch) and dtype of one tensor."""

    shape: tuple[int, ...]
    dtype: str = "float32"


class FeedForwardExpert(nn.Module):
    """hidden -> inner -> hidden with a GELU; tokens are independent."""

    allows_autocast = True  # a node's --autocast may run it in bf16 / fp16 (parameters stay float32)
    runs_grouped = True  # a node may run many of these at once, vmapped over stacked parameters

    def __init__(self, hidden_dim: int, inner_dim: int):
        super().__init__()
        self.up = nn.Linear(hidden_dim, inner_dim)
        self.down = nn.Linear(inner_dim, hidden_dim)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x_TD)))

    @staticmethod
    def input_schema(hidden_dim: int) -> list[TensorSpec]:
        return [TensorSpec((FREE, hidden_dim))]


class TransformerBlockExpert(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then + mlp(ln(x)); input [batch, seq, hidden]."""

    allows_autocast = True

    def __init__(self, hidden_dim: int, inner_dim: int):
        super().__init__()
        num_heads = max(1, hidden_dim // 64)
        while hidden_dim % num_heads:
            num_heads -= 1
        self.norm_attn = nn.LayerNorm(hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden_dim)
        self.mlp = FeedForwardExpert(hidden_dim, inner_dim)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        h_BSD = self.norm_attn(x_BSD)
        x_BSD = x_BSD + self.attn(h_BSD, h_BSD, h_BSD, need_weights=False)[0]
        return x_BSD + self.mlp(self.norm_mlp(x_BSD))

    @staticmethod
    def input_schema(hidden_dim: int) -> list[TensorSpec]:
        return [TensorSpec((FREE, FREE, hidden_dim))]


BUILTIN_EXPERTS: dict[str, type[nn.Module]] = {"ffn": FeedForwardExpert,
                                                "transformer": TransformerBlockExpert}


def _resolve(expert_cls: str) -> type[nn.Module]:
    if expert_cls in BUILTIN_EXPERTS:
        return BUILTIN_EXPERTS[expert_cls]
    if ":" not in expert_cls:
        raise ValueError(
            f"unknown expert class {expert_cls!r}: use one of {', '.join(BUILTIN_EXPERTS)} or 'module:Class'"
        )
    module_name, _, class_name = expert_cls.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load expert class {expert_cls!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{expert_cls!r} is not a torch.nn.Module subclass")
    return cls


def uid_seed(uid: str, seed: int = 0) -> int:
    """The initialisation seed of expert ``uid`` (stable across processes and machines)."""
    return (zlib.crc32(uid.encode()) + 1_000_003 * seed) % (2**63)


def create_expert(
    expert_cls: str, *, uid: str, hidden_dim: int, inner_dim: int | None = None, seed: int = 0
) -> tuple[nn.Module, list[TensorSpec]]:
    """Build the expert module for ``uid`` on the CPU with its deterministic initial weights."""
    cls = _resolve(expert_cls)
    constructor: Callable[[], nn.Module]
    if cls in BUILTIN_EXPERTS.values():
        inner = inner_dim if inner_dim is not None else 4 * hidden_dim
        constructor = lambda: cls(hidden_dim=hidden_dim, inner_dim=inner)  # noqa: E731
    else:
        constructor = lambda: cls(hidden_dim=hidden_dim)  # noqa: E731
    # the constructor draws from torch's global generator, seeded here: one build at a time, or two
    # threads' builds would draw from each other's seeds
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(uid_seed(uid, seed))
        module = constructor()
    schema_fn = getattr(cls, "input_schema", None)
    schema = list(schema_fn(hidden_dim)) if schema_fn is not None else [TensorSpec((FREE, hidden_dim))]
    if not schema or any(not spec.shape or spec.shape[0] != FREE for spec in schema):
        raise ValueError(f"{expert_cls}: every input needs a free batch dimension first")
    return module, schema


def sample_inputs(schema: list[TensorSpec], batch: int = 2, free_size: int = 3) -> list[torch.Tensor]:
    """Small random inputs matching a schema (free dims get ``free_size``) to probe a module."""
    from dmoe.core.wire import DTYPES

    tensors = []
    for spec in schema:
        shape = [batch] + [free_size if d == FREE else d for d in spec.shape[1:]]
        tensors.append(torch.randn(shape).to(DTYPES[spec.dtype]))
    return tensors
