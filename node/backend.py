"""ExpertBackend: one hosted expert: its module on the device, its optimizer, schema checks.

Backward recomputes the forward on purpose instead of keeping activations between calls: a node
then holds no per-client state, so a client that never sends Backward costs nothing, a restarted
node can serve the backward of a forward it ran before the restart, and memory is bounded by the
batch size alone. The cost is one extra forward per backward (about a third more compute).
"""

from __future__ import annotations

import collections
import json
import logging
import threading

import torch
from torch import nn

from dmoe.errors import CheckpointError
from dmoe.experts import FREE, TensorSpec, create_expert, sample_inputs
from dmoe.wire import DTYPES

logger = logging.getLogger(__name__)

_MAX_SHAPE_CACHE = 256


class ExpertBackend:
    """An expert as the node runs it. Forward/backward are called by the runtime thread only."""

    def __init__(
        self,
        uid: str,
        *,
        expert_cls: str,
        hidden_dim: int,
        inner_dim: int | None,
        seed: int,
        device: torch.device,
        optimizer: str,
        lr: float,
        max_grad_norm: float,
    ):
        self.uid, self.expert_cls, self.device = uid, expert_cls, device
        module, self.input_schema = create_expert(
            expert_cls, uid=uid, hidden_dim=hidden_dim, inner_dim=inner_dim, seed=seed
        )
        self.module: nn.Module = module.to(device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.num_parameters = sum(p.numel() for p in params)
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr)
        self.max_grad_norm = max_grad_norm
        self.version = 0  # optimizer steps applied
        self.skipped_steps = 0  # backward batches whose parameter gradients were not finite
        self.lock = threading.Lock()  # held while parameters change; checkpoints take it to read them
        self._output_shapes: collections.OrderedDict[tuple, list[tuple[int, ...]]] = collections.OrderedDict()
        probe = self.output_shapes(sample_inputs(self.input_schema))
        self.output_schema = [TensorSpec((FREE, *shape[1:])) for shape in probe]
        self.output_dtypes = ["float32"] * len(probe)

    # ---- schema -------------------------------------------------------------------------------
    def check_inputs(self, tensors: list[torch.Tensor], specs: list[TensorSpec], what: str) -> int:
        """Raise ValueError unless tensors match specs and share one batch size; return it."""
        if len(tensors) != len(specs):
            raise ValueError(f"{self.uid} takes {len(specs)} {what}, got {len(tensors)}")
        batch = None
        for i, (tensor, spec) in enumerate(zip(tensors, specs)):
            name = str(tensor.dtype).removeprefix("torch.")
            if name != spec.dtype:
                raise ValueError(f"{what}[{i}] of {self.uid} must be {spec.dtype}, got {name}")
            if tensor.dim() != len(spec.shape):
                raise ValueError(f"{what}[{i}] of {self.uid} must have rank {len(spec.shape)}, got {tensor.dim()}")
            for axis, (size, want) in enumerate(zip(tensor.shape, spec.shape)):
                if want != FREE and size != want:
                    raise ValueError(f"{what}[{i}] of {self.uid}: dim {axis} must be {want}, got {size}")
            if tensor.shape[0] == 0 or any(size == 0 for size in tensor.shape):
                raise ValueError(f"{what}[{i}] of {self.uid} is empty")
            if batch is None:
                batch = tensor.shape[0]
            elif tensor.shape[0] != batch:
                raise ValueError(f"{what} of {self.uid} disagree on the batch size")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{what}[{i}] of {self.uid} holds NaN or Inf")
        assert batch is not None
        return batch

    def output_shapes(self, inputs: list[torch.Tensor]) -> list[tuple[int, ...]]:
        """Output shapes for these inputs (batch dim included), from a cached one-row probe."""
        key = tuple(tuple(t.shape[1:]) for t in inputs)
        cached = self._output_shapes.get(key)
        if cached is None:
            probe = [torch.zeros((1, *t.shape[1:]), dtype=t.dtype, device=self.device) for t in inputs]
            with torch.no_grad():
                outputs = _as_tuple(self.module(*probe))
            cached = [tuple(o.shape[1:]) for o in outputs]
            self._output_shapes[key] = cached
            if len(self._output_shapes) > _MAX_SHAPE_CACHE:
                self._output_shapes.popitem(last=False)
        batch = inputs[0].shape[0]
        return [(batch, *shape) for shape in cached]

    def check_grad_outputs(self, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        expected = self.output_shapes(inputs)
        if len(grads) != len(expected):
            raise ValueError(f"{self.uid} has {len(expected)} outputs, got {len(grads)} grad_outputs")
        for i, (grad, shape) in enumerate(zip(grads, expected)):
            if tuple(grad.shape) != shape:
                raise ValueError(f"grad_outputs[{i}] of {self.uid} must have shape {list(shape)}, got {list(grad.shape)}")
            if grad.dtype != DTYPES[self.output_dtypes[i]]:
                raise ValueError(f"grad_outputs[{i}] of {self.uid} must be {self.output_dtypes[i]}")
            if not bool(torch.isfinite(grad).all()):
                raise ValueError(f"grad_outputs[{i}] of {self.uid} holds NaN or Inf")

    # ---- compute (runtime thread) ---------------------------------------------------------------
    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            outputs = _as_tuple(self.module(*[x.to(self.device, non_blocking=True) for x in inputs]))
        return [o.cpu() for o in outputs]

    def backward(self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Input gradients for grad_outputs; applies one optimizer step with the parameter gradients."""
        with self.lock:
            leaves = [x.to(self.device).requires_grad_(x.is_floating_point()) for x in inputs]
            with torch.enable_grad():
                outputs = _as_tuple(self.module(*leaves))
                torch.autograd.backward(outputs, [g.to(self.device) for g in grad_outputs])
            grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
            self._step()
        return [g.detach().cpu() for g in grads]

    def _step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            if self.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            if torch.isfinite(norm):
                self.optimizer.step()
                self.version += 1
            else:
                self.skipped_steps += 1
                logger.warning("%s: non-finite parameter gradients; optimizer step skipped", self.uid)
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Copies of parameters and optimizer state (safetensors layout) and metadata, taken atomically."""
        with self.lock:
            tensors = {f"module.{k}": v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            state = self.optimizer.state_dict()
            for index, slots in state["state"].items():
                for name, value in slots.items():
                    if not isinstance(value, torch.Tensor):
                        value = torch.tensor(value)
                    tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().clone()
            metadata = {
                "uid": self.uid,
                "expert_cls": self.expert_cls,
                "version": str(self.version),
                "param_groups": json.dumps(state["param_groups"]),
            }
        return tensors, metadata

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Restore what state_tensors saved; raises CheckpointError if it belongs to another expert."""
        if metadata.get("uid") != self.uid or metadata.get("expert_cls") != self.expert_cls:
            raise CheckpointError(
                f"checkpoint of {metadata.get('uid')}/{metadata.get('expert_cls')} cannot load into "
                f"{self.uid}/{self.expert_cls}"
            )
        module_state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                opt_state.setdefault(int(index), {})[name] = value
        with self.lock:
            try:
                self.module.load_state_dict(module_state, strict=True)
                self.optimizer.load_state_dict(
                    {"state": opt_state, "param_groups": json.loads(metadata["param_groups"])}
                )
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint does not fit {self.uid}: {e}") from None
            self.version = int(metadata.get("version", "0"))


def _as_tuple(outputs: torch.Tensor | tuple | list) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
