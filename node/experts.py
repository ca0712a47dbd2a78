"""A node's device and the experts its config asks for: :func:`resolve_device`,
:func:`read_hardware`, :func:`build_backend`.

:class:`~dmoe.node.backend.ExpertBackend` takes a module, an optimizer factory and plain limits;
this is where a :class:`~dmoe.node.config.NodeConfig` turns into them (the expert class and sizes,
the seed, the optimizer and its learning rate, gradient clipping, the batch limit).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from dmoe.core.experts import create_expert
from dmoe.core.records import Hardware
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def resolve_device(name: str) -> torch.device:
    """The torch device of ``--device``: auto is cuda when torch sees one, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; "
                         "use --device cpu or auto")
    return device


def read_hardware(device: torch.device) -> Hardware:
    """What the node record says of the machine: the device, its name and memory, CPUs and RAM."""
    name, memory = "", 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    return Hardware(
        device=str(device), device_name=name, num_cpus=os.cpu_count() or 0,
        ram_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), device_memory_bytes=memory,
    )


def build_backend(uid: str, config: NodeConfig, device: torch.device) -> ExpertBackend:
    """Expert ``uid`` as ``config`` describes it, on ``device``, with its deterministic initial
    weights (the same on every node that hosts it with the same class, sizes and seed)."""
    module, input_schema = create_expert(config.expert_cls, uid=uid, hidden_dim=config.hidden_dim,
                                         inner_dim=config.inner_dim, seed=config.seed)
    optimizer_cls, lr = OPTIMIZERS[config.optimizer], config.lr

    def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return optimizer_cls(params, lr=lr)

    return ExpertBackend(
        uid, module=module, input_schema=input_schema, make_optimizer=make_optimizer, device=device,
        expert_cls=config.expert_cls, optimizer_name=config.optimizer, max_grad_norm=config.max_grad_norm,
        max_batch_tokens=config.max_batch_tokens,
    )
