"""ExpertBackend: one hosted expert: its module on the device, its optimizer, schema checks.

Requests are checked in two steps so that a hostile one costs little: :meth:`check_input_shapes`
and :meth:`check_grad_output_shapes` look only at the declared shapes and dtypes (before any
buffer is decoded, which also bounds the memory decoding may take), then :meth:`check_values` at
the decoded values.

The backend takes what it runs (module, input schema, an optimizer factory, a few limits) and
knows nothing of the node's config: :func:`dmoe.node.experts.build_backend` builds one from it.

Backward recomputes the forward on purpose instead of keeping activations between calls: a node
then holds no per-client state, so a client that never sends Backward costs nothing, a restarted
node can serve the backward of a forward it ran before the restart, and memory is bounded by the
batch size alone. The cost is one extra forward per backward (about a third more compute).

With ``autocast`` (the node's --autocast) the forward and backward passes compute in bf16 or fp16 where
torch's autocast allows, while parameters, optimizer state, and the inputs, outputs and gradients on
the wire keep their dtypes; fp16 output gradients are scaled (see :meth:`ExpertBackend.backward`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from dmoe.core.experts import FREE, TensorSpec, sample_inputs
from dmoe.core.wire import DTYPES, dtype_name
from dmoe.errors import CheckpointError
from dmoe.node.devicepath import to_host

if TYPE_CHECKING:
    from dmoe.node.pool import Member

logger = logging.getLogger(__name__)

_MAX_SHAPE_CACHE = 256
_PROBE_SIZES = (3, 4, 17)  # free-dimension sizes the start-up probes use: odd, even, longer
# the scale of fp16 output gradients, as torch's GradScaler: start, bounds, batches without overflow to double
INITIAL_GRAD_SCALE, MIN_GRAD_SCALE, MAX_GRAD_SCALE = 2.0**16, 2.0**-24, 2.0**24
SCALE_GROWTH_INTERVAL = 2000
Shape = tuple[int, ...]
# schemas (inputs, outputs) -> a small number, an ExpertBackend's packed_key (an int: cheap to hash)
_PACKED_KEYS: dict[tuple, int] = {}
_packed_keys_lock = threading.Lock()


def _packed_key(schemas: tuple) -> int:
    with _packed_keys_lock:
        return _PACKED_KEYS.setdefault(schemas, len(_PACKED_KEYS))


class ExpertBackend:
    """An expert as the node runs it. forward/backward are called by the runtime thread only."""

    def __init__(
        self,
        uid: str,
        *,
        module: nn.Module,
        input_schema: Sequence[TensorSpec],
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        device: torch.device,
        expert_cls: str,
        optimizer_name: str,
        max_grad_norm: float,
        max_batch_tokens: int,
        autocast: torch.dtype | None = None,
    ):
        """``module`` (moved to ``device`` here) with inputs of ``input_schema``; ``make_optimizer``
        builds its optimizer from its trainable parameters once they are on the device.
        ``expert_cls`` and ``optimizer_name`` label its checkpoints (a checkpoint loads only into
        the same expert, class and optimizer). ``max_grad_norm`` clips each step (0: no clipping);
        ``max_batch_tokens`` bounds the tokens of any one tensor a request may decode.

        ``autocast`` (torch.bfloat16 or torch.float16; None: off): the dtype the forward and backward
        passes compute in where autocast allows, unless the module opts out (a false ``allows_autocast``
        attribute). Parameters, optimizer state and the tensors on the wire keep their dtypes."""
        self.uid, self.expert_cls, self.device = uid, expert_cls, device
        if autocast is not None and not getattr(module, "allows_autocast", True):
            logger.info("%s: %s opts out of autocast; it computes in its own dtypes", uid, expert_cls)
            autocast = None
        self.autocast = autocast
        self.grad_scale = INITIAL_GRAD_SCALE  # fp16 only
        self._unscaled_since_overflow = 0
        self.overflows = 0  # fp16 backward batches whose scaled gradients overflowed (then recomputed)
        self.optimizer_name = optimizer_name
        self.input_schema = list(input_schema)
        self.module: nn.Module = module.to(device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.num_parameters = sum(p.numel() for p in params)
        self.optimizer: torch.optim.Optimizer = make_optimizer(params)
        self._make_optimizer = make_optimizer
        self._optimizer_slots: dict[torch.dtype, dict[str, tuple[Shape | None, str]]] = {}
        self.max_grad_norm = max_grad_norm
        self.version = 0  # optimizer steps applied
        self.skipped_steps = 0  # backward batches whose parameter gradients were not finite
        # where grouped execution keeps this expert's parameters and Adam state (dmoe.node.pool.Member):
        # its tensors are then views of that storage; None: its own tensors
        self.pooled: Member | None = None
        # held while parameters change or the module runs off the runtime thread
        self.lock = threading.Lock()
        # clear while a caller has its answer and the optimizer step after it has not ended (see backward)
        self.settled = threading.Event()
        self.settled.set()
        self._output_shapes: collections.OrderedDict[tuple, list[Shape]] = collections.OrderedDict()
        # probes with free dimensions of several sizes: an output dimension that varies with them is free too
        probes = [self._probe([tuple(t.shape[1:]) for t in sample_inputs(self.input_schema, free_size=size)])
                  for size in _PROBE_SIZES]
        self.output_schema = []
        for outputs in zip(*probes):  # one output's (shape, dtype) in each probe
            shapes = [shape for shape, _ in outputs]
            if len({len(shape) for shape in shapes}) > 1:  # its rank follows the inputs': nothing is fixed
                shape = tuple(FREE for _ in shapes[0])
            else:
                shape = tuple(dims[0] if len(set(dims)) == 1 else FREE for dims in zip(*shapes))
            self.output_schema.append(TensorSpec((FREE, *shape), outputs[0][1]))
        self._shape_preserving = self._preserves_free_dims()
        # experts of one packed_key pass the checks of a packed call's part alike, whatever its row count
        # (the service checks one part per key and call): one input of a free first dimension, output
        # shapes that follow from the schema (not from a probe of the module); None: checked part by part
        self.packed_key: int | None = None
        if self._shape_preserving and self.input_schema[0].shape[0] == FREE:
            self.packed_key = _packed_key((tuple(self.input_schema), tuple(self.output_schema)))
        # elements one request may decode: every tensor has at most max_batch_tokens tokens
        self._token_width = max(_token_width(spec) for spec in (*self.input_schema, *self.output_schema))
        self.max_numel = max_batch_tokens * self._token_width

    def set_max_batch_tokens(self, max_batch_tokens: int) -> None:
        """A new bound on the tokens of any one tensor a request may decode (the node's batch limit,
        once sized by device memory)."""
        self.max_numel = max_batch_tokens * self._token_width

    # ---- schema (any thread) --------------------------------------------------------------------
    def check_input_shapes(self, shapes: Sequence[Shape], dtypes: Sequence[str]) -> tuple[int, int]:
        """Raise ValueError unless the shapes and dtypes a request declares for its inputs fit the
        input schema; return (rows, tokens).

        rows is the shared first dimension; tokens counts every position but the feature dim
        (rows x seq for a transformer), which is what limits and batching count."""
        specs, what = self.input_schema, "inputs"
        if len(shapes) != len(specs):
            raise ValueError(f"{self.uid} takes {len(specs)} {what}, got {len(shapes)}")
        rows = tokens = None
        for i, (shape, dtype, spec) in enumerate(zip(shapes, dtypes, specs)):
            if dtype != spec.dtype:
                raise ValueError(f"{what}[{i}] of {self.uid} must be {spec.dtype}, got {dtype}")
            if len(shape) != len(spec.shape):
                raise ValueError(f"{what}[{i}] of {self.uid} must have rank {len(spec.shape)}, "
                                 f"got {len(shape)}")
            for axis, (size, want) in enumerate(zip(shape, spec.shape)):
                if want != FREE and size != want:
                    raise ValueError(f"{what}[{i}] of {self.uid}: dim {axis} must be {want}, got {size}")
            if any(size <= 0 for size in shape):
                raise ValueError(f"{what}[{i}] of {self.uid} has an empty or negative dimension: "
                                 f"{list(shape)}")
            if rows is None:
                rows, tokens = shape[0], math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
            elif shape[0] != rows:
                raise ValueError(f"{what} of {self.uid} disagree on the batch size")
        assert rows is not None and tokens is not None
        return rows, tokens

    def check_grad_output_shapes(self, input_shapes: Sequence[Shape], shapes: Sequence[Shape],
                                 dtypes: Sequence[str]) -> None:
        """Raise ValueError unless the shapes and dtypes a Backward request declares for its
        grad_outputs are those of the outputs for its inputs."""
        expected = self.output_shapes(input_shapes)
        if len(shapes) != len(expected):
            raise ValueError(f"{self.uid} has {len(expected)} outputs, got {len(shapes)} grad_outputs")
        for i, (shape, dtype, (want_shape, want_dtype)) in enumerate(zip(shapes, dtypes, expected)):
            if tuple(shape) != want_shape:
                raise ValueError(f"grad_outputs[{i}] of {self.uid} must have shape {list(want_shape)}, "
                                 f"got {list(shape)}")
            if dtype != want_dtype:
                raise ValueError(f"grad_outputs[{i}] of {self.uid} must be {want_dtype}, got {dtype}")

    def check_values(self, tensors: Sequence[torch.Tensor], what: str, max_abs: float = math.inf) -> None:
        """ValueError if a floating-point tensor holds NaN, Inf, or a value larger than max_abs in
        magnitude (an absurd gradient is refused before it can reach the optimizer)."""
        for i, tensor in enumerate(tensors):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            largest = float(tensor.abs().max())
            if not math.isfinite(largest):
                raise ValueError(f"{what}[{i}] of {self.uid} holds NaN or Inf")
            if largest > max_abs:
                limit = f"max_{'grad' if what == 'grad_outputs' else 'input'}_abs"
                raise OutOfBounds(f"{what}[{i}] of {self.uid} holds {largest:.3g}, above this node's bound "
                                  f"of {max_abs:g} ({limit})")

    def _preserves_free_dims(self) -> bool:
        """True if the expert has one input and one output of the same rank whose free dimensions
        are the input's (ffn, transformer): checked with probes of several sizes. Then output shapes
        follow from input shapes with no forward pass, so a request cannot make the node compute
        before it is accepted."""
        if len(self.input_schema) != 1 or len(self.output_schema) != 1:
            return False
        spec_in, spec_out = self.input_schema[0].shape, self.output_schema[0].shape
        if len(spec_in) != len(spec_out):
            return False
        if any((a == FREE) != (b == FREE) for a, b in zip(spec_in, spec_out)):
            return False
        for size in _PROBE_SIZES:
            trailing = tuple(size if d == FREE else d for d in spec_in[1:])
            if self._probe([trailing])[0][0] != tuple(size if d == FREE else d for d in spec_out[1:]):
                return False
        return True

    def output_shapes(self, input_shapes: Sequence[Shape]) -> list[tuple[Shape, str]]:
        """(shape, dtype) of each output for inputs of these shapes: from the schema when the expert
        preserves free dimensions, else from a cached one-row probe."""
        if self._shape_preserving:
            (shape,), (spec,) = input_shapes, self.output_schema
            return [(tuple(s if d == FREE else d for s, d in zip(shape, spec.shape)), spec.dtype)]
        trailing = [tuple(shape[1:]) for shape in input_shapes]
        per_row = self._probe(trailing)
        return [((input_shapes[0][0], *shape), dtype) for shape, dtype in per_row]

    def _probe(self, trailing: list[Shape]) -> list[tuple[Shape, str]]:
        key = tuple(trailing)
        cached = self._output_shapes.get(key)
        if cached is None:
            probe = [torch.zeros((1, *shape), dtype=DTYPES[spec.dtype], device=self.device)
                     for shape, spec in zip(trailing, self.input_schema)]
            with self.lock, torch.no_grad():
                outputs = _as_tuple(self.module(*probe))
            cached = [(tuple(o.shape[1:]), dtype_name(o.dtype)) for o in outputs]
            self._output_shapes[key] = cached
            if len(self._output_shapes) > _MAX_SHAPE_CACHE:
                self._output_shapes.popitem(last=False)
        return cached

    # ---- compute (runtime thread) ---------------------------------------------------------------
    def autocast_context(self) -> contextlib.AbstractContextManager:
        """What the expert's forward passes run under: autocast to ``self.autocast`` (matmuls and the
        like in reduced precision, parameters and their gradients float32), or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def to_wire(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Outputs in their dtypes of the output schema, whatever autocast computed them in (a cast in the
        graph: the output gradients flow back through it)."""
        if self.autocast is None:
            return outputs
        return tuple(o.to(DTYPES[spec.dtype]) if o.is_floating_point() else o
                     for o, spec in zip(outputs, self.output_schema))

    def forward(self, inputs: list[torch.Tensor],
                while_computing: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Outputs (on the CPU, in the output schema's dtypes) for inputs on the CPU or already on the
        device. ``while_computing``, if given, is called once the compute is launched and before its
        results are waited for (on CUDA the kernels run meanwhile: the runtime stages its next batch)."""
        with torch.inference_mode():
            with self.autocast_context():
                outputs = _as_tuple(self.module(*[x.to(self.device, non_blocking=True) for x in inputs]))
            outputs = self.to_wire(outputs)
        if while_computing is not None:
            while_computing()
        return to_host(outputs)

    def backward(self, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor],
                 update: torch.Tensor | None = None,
                 reply: Callable[[list[torch.Tensor]], None] | None = None,
                 while_computing: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Input gradients for grad_outputs; applies one optimizer step with the parameter gradients.
        Parameter gradients never outlive the call, even when it fails half-way.

        ``reply``, if given, is called with the input gradients (on the CPU) before the optimizer
        step, so that the caller can answer while the step runs; the step is still applied before
        this call returns, with the expert's lock held throughout, so no later call on this expert
        (forward, backward, state read) sees the parameters from before it; ``settled`` is clear
        from the reply to the step's end (the node's Info waits for it, so that the version it
        reports counts every step whose caller was answered).

        ``update``, a bool per row: only the rows marked True reach the parameter gradients (the
        others' callers are over their share of this expert's steps, see :mod:`dmoe.node.influence`);
        every row gets its input gradients all the same. None: every row updates.

        ``while_computing``: as in :meth:`forward`.

        Under fp16 autocast the output gradients are multiplied by ``grad_scale`` before the backward
        pass (so that small gradients do not vanish in float16) and the input and parameter gradients
        divided by it after. Input gradients must reach the caller, so a batch whose scaled gradients
        overflow is not skipped: the scale is halved and the batch recomputed in float32 (it doubles
        again after :data:`SCALE_GROWTH_INTERVAL` batches without overflow)."""
        if update is not None and bool(update.all()):
            update = None
        with self.lock:
            try:
                leaves = [x.to(self.device).detach().requires_grad_(x.is_floating_point()) for x in inputs]
                grad_outputs = [g.to(self.device) for g in grad_outputs]
                mask = None if update is None else update.to(self.device)
                scale = self.grad_scale if self.autocast == torch.float16 else None
                grads = self._gradients(leaves, grad_outputs, mask, scale)
                if while_computing is not None:
                    while_computing()
                if scale is not None:
                    grads = self._settle_scale(grads, leaves, grad_outputs, mask)
                grads = to_host(grads)
                if reply is not None:
                    self.settled.clear()
                    reply(grads)
                if update is None or bool(update.any()):
                    self._step()
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                self.settled.set()
        return grads

    def _gradients(self, leaves: list[torch.Tensor], grad_outputs: list[torch.Tensor],
                   mask: torch.Tensor | None, scale: float | None,
                   autocast: bool = True) -> list[torch.Tensor]:
        """The forward pass (under autocast unless told not to), then the backward pass with the output
        gradients times ``scale`` (None: as they are): returns the input gradients (on the device) and
        leaves the parameter gradients in .grad, both divided by ``scale`` again."""
        for leaf in leaves:
            leaf.grad = None
        if scale is not None:
            grad_outputs = [g * scale for g in grad_outputs]
        with torch.enable_grad():
            with self.autocast_context() if autocast else contextlib.nullcontext():
                outputs = _as_tuple(self.module(*leaves))
            outputs = self.to_wire(outputs)
            if mask is None:
                torch.autograd.backward(outputs, grad_outputs)
            else:
                self._backward_some_rows(outputs, leaves, grad_outputs, mask)
        grads = [(x.grad if x.grad is not None else torch.zeros_like(x)).detach() for x in leaves]
        if scale is not None:
            grads = [g / scale if g.is_floating_point() else g for g in grads]
            with torch.no_grad():
                for p in self._params_with_grad():
                    p.grad.div_(scale)
        return grads

    def _settle_scale(self, grads: list[torch.Tensor], leaves: list[torch.Tensor],
                      grad_outputs: list[torch.Tensor], mask: torch.Tensor | None) -> list[torch.Tensor]:
        """After a scaled fp16 backward: if any gradient overflowed, halve the scale and recompute the
        batch in float32; else count the batch towards doubling the scale. Returns the input gradients."""
        checked = [g for g in grads if g.is_floating_point()] + [p.grad for p in self._params_with_grad()]
        if not checked or bool(torch.stack([torch.isfinite(t).all() for t in checked]).all()):
            self._unscaled_since_overflow += 1
            if self._unscaled_since_overflow >= SCALE_GROWTH_INTERVAL and self.grad_scale < MAX_GRAD_SCALE:
                self.grad_scale *= 2
                self._unscaled_since_overflow = 0
            return grads
        self.grad_scale = max(MIN_GRAD_SCALE, self.grad_scale / 2)
        self._unscaled_since_overflow = 0
        self.overflows += 1
        logger.debug("%s: fp16 gradients overflowed; batch recomputed in float32, scale now %g",
                     self.uid, self.grad_scale)
        self.optimizer.zero_grad(set_to_none=True)
        return self._gradients(leaves, grad_outputs, mask, None, autocast=False)

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _backward_some_rows(self, outputs: tuple[torch.Tensor, ...], leaves: list[torch.Tensor],
                            grad_outputs: list[torch.Tensor], update: torch.Tensor) -> None:
        """Input gradients of every row into the leaves' .grad, parameter gradients of the rows
        marked in ``update`` alone. A vector-Jacobian product is linear in the output gradients, so
        zeroing a row's output gradient takes exactly that row's terms out of the parameter gradients."""
        wanted = [x for x in leaves if x.requires_grad]
        if wanted:  # input gradients of all rows, parameter gradients of none
            grads = torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True,
                                        retain_graph=bool(update.any()))
            for leaf, grad in zip(wanted, grads):
                leaf.grad = grad
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if params and bool(update.any()):
            kept = [g * update.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for g in grad_outputs]
            torch.autograd.backward(outputs, kept, inputs=params)

    def _step(self) -> None:
        params = self._params_with_grad()
        if not params:
            return
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

    # ---- checkpoints and state transfer ----------------------------------------------------------
    def state_tensors(self, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Copies of parameters and optimizer state (safetensors layout) and metadata, taken atomically;
        without ``optimizer``, of the module's state alone."""
        with self.lock:
            tensors = {f"module.{k}": v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            for index, slots in (self.optimizer.state_dict()["state"] if optimizer else {}).items():
                for name, value in slots.items():
                    value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                    tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().clone()
            metadata = {"uid": self.uid, "expert_cls": self.expert_cls, "optimizer": self.optimizer_name,
                        "version": str(self.version)}
        return tensors, metadata

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Restore what state_tensors saved. Hyper-parameters (lr, ...) stay those of the config.
        Raises CheckpointError, changing nothing, if the checkpoint belongs to another expert."""
        saved = (metadata.get("uid"), metadata.get("expert_cls"), metadata.get("optimizer"))
        if saved != (self.uid, self.expert_cls, self.optimizer_name):
            raise CheckpointError(f"checkpoint of {'/'.join(map(str, saved))} cannot load into "
                                  f"{self.uid}/{self.expert_cls}/{self.optimizer_name}")
        module_state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        try:
            version = int(metadata.get("version", "0"))
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, index, name = key.split(".", 2)
                    opt_state.setdefault(int(index), {})[name] = value
        except ValueError as e:
            raise CheckpointError(f"malformed checkpoint of {self.uid}: {e}") from None
        with self.lock:
            backup = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            try:
                self.module.load_state_dict(module_state, strict=True)
                groups = self.optimizer.state_dict()["param_groups"]
                self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
            except (RuntimeError, ValueError, KeyError) as e:
                self.module.load_state_dict(backup)
                raise CheckpointError(f"checkpoint does not fit {self.uid}: {e}") from None
            self.version = version


    def state_schema(self, optimizer: bool = True) -> dict[str, tuple[Shape, str]]:
        """Name -> (shape, dtype) of every tensor :meth:`state_tensors` can hold: the module's state
        and, with ``optimizer``, each parameter's optimizer slots (a parameter has either all of them
        or, before its first step, none). What another replica's state must match to be taken.
        Raises ValueError for an optimizer whose state is neither parameter-shaped nor scalar."""
        schema = {f"module.{k}": (tuple(v.shape), dtype_name(v.dtype))
                  for k, v in self.module.state_dict().items()}
        if optimizer:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            for index, param in enumerate(params):
                for slot, (shape, dtype) in self._slots(param.dtype).items():
                    shape = tuple(param.shape) if shape is None else shape
                    schema[f"optimizer.{index}.{slot}"] = (shape, dtype)
        return schema

    def _slots(self, dtype: torch.dtype) -> dict[str, tuple[Shape | None, str]]:
        """The optimizer's state of one parameter of ``dtype`` after a step: slot -> (shape, dtype),
        shape None for a slot shaped like its parameter. Found once per dtype by a step of a fresh
        optimizer of the same kind over a small stand-in parameter (the real one is not touched)."""
        if dtype not in self._optimizer_slots:
            probe = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
            probe.grad = torch.zeros_like(probe)
            optimizer = self._make_optimizer([probe])
            optimizer.step()
            slots: dict[str, tuple[Shape | None, str]] = {}
            for slot, value in optimizer.state_dict()["state"].get(0, {}).items():
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                if tuple(value.shape) == tuple(probe.shape):
                    slots[slot] = (None, dtype_name(value.dtype))
                elif value.dim() == 0:
                    slots[slot] = ((), dtype_name(value.dtype))
                else:
                    raise ValueError(f"{self.optimizer_name}: optimizer slot {slot!r} of shape "
                                     f"{list(value.shape)} is neither a parameter's shape nor a scalar")
            self._optimizer_slots[dtype] = slots
        return self._optimizer_slots[dtype]


class OutOfBounds(ValueError):
    """Finite values above the node's bound: the caller's values, refused with OUT_OF_RANGE."""


def _token_width(spec: TensorSpec) -> int:
    last = spec.shape[-1] if len(spec.shape) > 1 else 1
    return last if last != FREE else 1 << 16


def _as_tuple(outputs: torch.Tensor | tuple | list) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
