"""A node's device and the experts its config asks for: :func:`resolve_device`,
:func:`read_hardware`, :func:`build_backend`, and the batch limit a CUDA device's memory allows
(:func:`device_batch_tokens`).

:class:`~dmoe.node.backend.ExpertBackend` takes a module, an optimizer factory and plain limits;
this is where a :class:`~dmoe.node.config.NodeConfig` turns into them (the expert class and sizes,
the seed, the optimizer and its learning rate, gradient clipping, the batch limit, autocast).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Collection, Mapping

import torch
from torch import nn

from dmoe.core.experts import FREE, create_expert, sample_inputs
from dmoe.core.recordrules import MIN_BATCH_TOKENS
from dmoe.core.records import Hardware
from dmoe.core.wire import DTYPES
from dmoe.errors import ConfigError
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig

logger = logging.getLogger(__name__)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# batch sizing by device memory (see batch_tokens_for_memory)
ACTIVATION_MEMORY_FRACTION = 0.5  # of the device memory free once the experts are placed
ACTIVATION_HEADROOM = 2.0  # bytes reserved per byte of measured activations: buffers no backward keeps
MAX_SIZED_BATCH_TOKENS = 65536  # a bigger batch gains a GPU nothing, and costs the host its queue memory
SIZED_BATCH_MULTIPLE = 64


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
    if config.autocast == "fp16" and device.type != "cuda":
        raise ConfigError(f"autocast fp16 needs a CUDA device, and this node runs on {device}: "
                          "use --autocast bf16 or off")

    def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return optimizer_cls(params, lr=lr)

    return ExpertBackend(
        uid, module=module, input_schema=input_schema, make_optimizer=make_optimizer, device=device,
        expert_cls=config.expert_cls, optimizer_name=config.optimizer, max_grad_norm=config.max_grad_norm,
        max_batch_tokens=config.max_batch_tokens, autocast=AUTOCAST_DTYPES[config.autocast],
    )


def batch_tokens_for_memory(free_bytes: int, bytes_per_token: float, *,
                            fraction: float = ACTIVATION_MEMORY_FRACTION,
                            headroom: float = ACTIVATION_HEADROOM, ceiling: int = MAX_SIZED_BATCH_TOKENS,
                            multiple: int = SIZED_BATCH_MULTIPLE) -> int:
    """The most tokens one device call may take: ``fraction`` of ``free_bytes`` over ``headroom`` times
    the activation bytes of a token, rounded down to a ``multiple``, within [MIN_BATCH_TOKENS, ceiling]
    (the floor even where less would fit: a node below it announces a limit clients skip)."""
    if free_bytes < 0 or bytes_per_token <= 0 or not 0 < fraction <= 1 or headroom < 1:
        raise ValueError(f"cannot size a batch from {free_bytes} free bytes, {bytes_per_token} bytes per "
                         f"token, fraction {fraction}, headroom {headroom}")
    tokens = int(free_bytes * fraction / (bytes_per_token * headroom))
    tokens -= tokens % multiple
    return max(MIN_BATCH_TOKENS, min(ceiling, tokens))


def activation_bytes_per_token(backend: ExpertBackend, rows: tuple[int, int] = (8, 16),
                               free_size: int = 64) -> float:
    """Device bytes one more token of a backward batch takes: what the forward pass keeps for the
    backward (measured on the backend's device and precision with saved-tensor hooks, as the slope
    between batches of ``rows[0]`` and ``rows[1]`` rows, so that what does not grow with the batch, such
    as autocast's reduced-precision copies of the weights, is left out), plus the inputs, outputs, output
    gradients and input gradients of a token (each storage once). Free dimensions other than the batch
    are ``free_size``."""
    params = {p.untyped_storage().data_ptr() for p in backend.module.parameters()}
    measured = []
    for count in rows:
        inputs = [x.to(backend.device) for x in sample_inputs(backend.input_schema, batch=count,
                                                               free_size=free_size)]
        shapes = [tuple(x.shape) for x in inputs]
        _, tokens = backend.check_input_shapes(shapes, [spec.dtype for spec in backend.input_schema])
        # storages by address: a tensor kept for the backward counts once, the inputs among them
        saved = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in inputs}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        leaves = [x.requires_grad_(x.is_floating_point()) for x in inputs]
        with backend.lock, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with backend.autocast_context():
                outputs = backend.module(*leaves)
            outputs = backend.to_wire((outputs,) if isinstance(outputs, torch.Tensor)
                                      else tuple(outputs))
        # besides the inputs: their gradients, the outputs and the output gradients
        wire = sum(x.nbytes for x in inputs) + 2 * sum(o.nbytes for o in outputs)
        del outputs
        measured.append((tokens, sum(saved.values()) + wire))
    (t0, b0), (t1, b1) = measured
    return max(1.0, (b1 - b0) / (t1 - t0))


def wire_bytes_per_token(backend: ExpertBackend) -> int:
    """Bytes a token takes in a Backward request (inputs and output gradients), free dimensions other
    than the batch counted as one position each."""
    return sum(math.prod(d for d in spec.shape[1:] if d != FREE) * DTYPES[spec.dtype].itemsize
               for spec in (*backend.input_schema, *backend.output_schema))


def device_batch_tokens(backend: ExpertBackend, max_request_bytes: int) -> int:
    """The batch limit a CUDA device allows for experts like ``backend`` (already on it, with the node's
    other experts): from the memory free now (the CUDA driver's free memory plus what torch's allocator
    holds unused) and :func:`activation_bytes_per_token`; at most what ``max_request_bytes`` carries."""
    free, _ = torch.cuda.mem_get_info(backend.device)
    free += torch.cuda.memory_reserved(backend.device) - torch.cuda.memory_allocated(backend.device)
    by_wire = max_request_bytes // wire_bytes_per_token(backend)
    ceiling = min(MAX_SIZED_BATCH_TOKENS, max(MIN_BATCH_TOKENS, by_wire))
    return batch_tokens_for_memory(free, activation_bytes_per_token(backend), ceiling=ceiling)


def sized_batch_config(config: NodeConfig, given: Collection[str],
                       backends: Mapping[str, ExpertBackend]) -> NodeConfig:
    """``config`` with its batch limit sized by device memory (:func:`device_batch_tokens`) where that
    applies: experts on a CUDA device, and no --max-batch-tokens given (see :func:`with_batch_tokens` for
    --max-queued-tokens). The backends take the new limit."""
    first = next(iter(backends.values()), None)
    if "max_batch_tokens" in given or first is None or first.device.type != "cuda":
        return config
    try:
        tokens = device_batch_tokens(first, config.max_request_bytes)
    except (RuntimeError, ValueError) as e:  # an expert the probe does not fit: keep the default
        logger.warning("could not size batches by device memory (%s); --max-batch-tokens stays %d",
                       e, config.max_batch_tokens)
        return config
    sized = with_batch_tokens(config, given, tokens)
    logger.info("batches sized by the memory of %s: up to %d tokens per device call (--max-batch-tokens)",
                first.device, sized.max_batch_tokens)
    for backend in backends.values():
        backend.set_max_batch_tokens(sized.max_batch_tokens)
    return sized


def with_batch_tokens(config: NodeConfig, given: Collection[str], tokens: int) -> NodeConfig:
    """``config`` with a batch limit of ``tokens``: --max-queued-tokens, unless given, grows to two such
    batches (never shrinks); given, it caps the batch."""
    queued = config.max_queued_tokens
    if "max_queued_tokens" in given:
        tokens = min(tokens, queued)
    else:
        queued = max(queued, 2 * tokens)
    return dataclasses.replace(config, max_batch_tokens=tokens, max_queued_tokens=queued)
