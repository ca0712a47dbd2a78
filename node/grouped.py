"""Grouped execution: the batches of many same-shaped experts run as one vectorised device call.

A node hosting thousands of small experts receives, per training step, a few rows for each of a hundred
of them. Run one expert at a time, each pays a forward, a backward, a clip and an optimizer step of its
own, ~1 ms of interpreter and dispatch overhead for a few microseconds of arithmetic. Here the experts'
parameters are stacked along a new first dimension and one :func:`torch.func.vmap` of the module runs
every expert's rows (padded to the longest member's) at once; the parameter gradients come out stacked,
are clipped per expert in a few tensor operations, and one multi-tensor optimizer step (torch's own
``foreach`` Adam or SGD) updates every member's parameters and optimizer state in place.

With Adam (the node's optimizer) the members' parameters and Adam state live in pooled storage
(:mod:`dmoe.node.pool`): each expert's tensors are views of a row of a few stacked tensors, so a group
gathers its members' parameters with one index operation, its gradients come out as one [members, numel]
tensor, and the step (torch's formula) gathers, updates and writes back every member's parameters,
moments and step counts with a handful of tensor operations, with no Python work per member and
parameter. The members' rows are padded into the stack, and taken back out of it, with one index
operation each.

Each member keeps the semantics of :meth:`ExpertBackend.backward` exactly: padding rows carry zero output
gradients (so they add nothing to any parameter gradient), each expert is clipped by the norm of its own
gradients, an expert whose gradients are not finite skips its step alone, callers are answered with their
input gradients before the step, every member's lock is held from the forward to the end of the step, and
``settled`` is clear in between. What a group changes is rounding only: a stacked matmul and a
multi-tensor optimizer add in another order than one expert's own (differences of about 1e-7 relative).

Experts group when :func:`group_key` gives them the same key: the same module class (one that declares
``runs_grouped = True``, as the built-in ``ffn`` does: a pure function of its parameters that vmap can
run, with no buffers), parameter names, shapes and dtypes, device, autocast (fp16, with its loss
scaling, never groups), optimizer class and hyper-parameters, and clipping norm.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch.optim.adam import adam as adam_step
from torch.optim.sgd import sgd as sgd_step

from dmoe.node.backend import ExpertBackend
from dmoe.node.devicepath import to_host
from dmoe.node.pool import Index, Member, Pool, poolable, scalar_dtype

logger = logging.getLogger(__name__)

# a member with more rows than this runs alone: its own call is already one efficient device call, and
# padding the others to its length would waste more than the group saves
MAX_GROUP_ROWS = 64
MAX_GROUP_SIZE = 1024  # experts in one group
_keys: weakref.WeakKeyDictionary[ExpertBackend, tuple | None] = weakref.WeakKeyDictionary()
# each expert's parameters, in the module's order (the same objects for its life: state loads copy into them)
_params: weakref.WeakKeyDictionary[ExpertBackend, list[torch.nn.Parameter]] = weakref.WeakKeyDictionary()
_UNKNOWN = object()
_pools: dict[tuple, Pool | None] = {}  # group key -> the pool of its experts (None: they are not pooled)
# held around inserting into _keys (the event loop's add_expert) and reading it whole (a runtime thread's
# group), and around creating pools; nothing else is taken while it is held
_lock = threading.Lock()


def _parameters(backend: ExpertBackend) -> list[torch.nn.Parameter]:
    params = _params.get(backend)
    if params is None:
        params = _params[backend] = list(backend.module.parameters())
    return params


def group_key(backend: ExpertBackend) -> tuple | None:
    """What must be equal for experts to run as one group; None: this expert always runs alone."""
    key = _keys.get(backend, _UNKNOWN)
    if key is _UNKNOWN:
        key = _compute_key(backend)
        with _lock:
            key = _keys.setdefault(backend, key)
    return key  # type: ignore[return-value]


def _compute_key(backend: ExpertBackend) -> tuple | None:
    module, optimizer = backend.module, backend.optimizer
    if not getattr(type(module), "runs_grouped", False) or backend.autocast == torch.float16:
        return None
    if any(True for _ in module.buffers()) or len(optimizer.param_groups) != 1:
        return None
    params = tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in module.named_parameters())
    trainable = [p for p in module.parameters() if p.requires_grad]
    # the optimizer steps exactly these, in this order (compared by identity: == on tensors is elementwise)
    if [id(p) for p in optimizer.param_groups[0]["params"]] != [id(p) for p in trainable]:
        return None
    settings = optimizer.param_groups[0]
    if any(settings.get(flag) for flag in ("fused", "capturable", "differentiable")):
        return None
    hyper = tuple(sorted((k, repr(v)) for k, v in settings.items() if k != "params"))
    return (type(module), params, backend.device, backend.autocast, type(optimizer), hyper,
            backend.max_grad_norm, tuple((tuple(s.shape), s.dtype) for s in backend.input_schema))


# per thread, per group key: the module a group's vmapped call runs. torch.func.functional_call puts the
# stacked parameters into its module for the length of the call, so that module must be no served expert's
# (another thread may read the expert meanwhile, under its lock: a state export, a checkpoint, a replica
# blend) and no other thread's (two runtimes of one process may run groups of one kind at once)
_templates = threading.local()


def _template(member: ExpertBackend) -> torch.nn.Module:
    """A copy of ``member``'s module whose parameters are on the meta device (no memory), for this thread."""
    by_key = getattr(_templates, "by_key", None)
    if by_key is None:
        by_key = _templates.by_key = {}
    key = group_key(member)
    template = by_key.get(key)
    if template is None:
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in _parameters(member)}
        template = by_key[key] = copy.deepcopy(member.module, memo)
    return template


def _stacked_call(template: torch.nn.Module, names: list[str]) -> Callable:
    def call(params: tuple[torch.Tensor, ...], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = torch.func.functional_call(template, dict(zip(names, params)), inputs)
        return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    return call


def _destinations(rows: Sequence[int], padded_rows: int, device: torch.device) -> torch.Tensor:
    """[sum(rows)]: where each member's rows go in a flattened [members * padded_rows, ...] stack (the
    members' rows in order, as their concatenation holds them)."""
    counts = torch.tensor(rows)
    mask = torch.arange(padded_rows) < counts[:, None]
    return mask.view(-1).nonzero().squeeze(1).to(device)


class _Stack:
    """The members' parameters stacked (copies: gathered from their pool, else stacked one by one), and
    the padded inputs, on the members' device. ``pooled``: the members' places in ``pool`` (None: not
    pooled)."""

    def __init__(self, members: Sequence[ExpertBackend], inputs: Sequence[Sequence[torch.Tensor]],
                 grad: bool, pool: Pool | None = None, pooled: list[Member] | None = None):
        self.members, self.pool, self.pooled = members, pool, pooled
        self.template = _template(members[0])
        self.names = [name for name, _ in self.template.named_parameters()]
        self.device = members[0].device
        self.rows = [member_inputs[0].shape[0] for member_inputs in inputs]
        self.padded_rows = max(self.rows)
        self.destinations = _destinations(self.rows, self.padded_rows, self.device)
        self.flat: torch.Tensor | None = None  # pooled: [members, numel], every parameter of each member
        if pool is not None and pooled is not None:
            self.index = Index(pooled, self.device)
            self.flat = self.index.gather("params")
            if grad:
                self.flat.requires_grad_(True)
            self.params = pool.views(self.flat)
        else:
            per_member = [_parameters(m) for m in members]
            self.params = []
            for position, (_, param) in enumerate(self.template.named_parameters()):
                stacked = torch.stack([params[position].detach() for params in per_member])
                if grad and param.requires_grad:
                    stacked.requires_grad_(True)
                self.params.append(stacked)
        self.inputs = [self.pad([m[j] for m in inputs]) for j in range(len(inputs[0]))]
        if grad:
            for x in self.inputs:
                x.requires_grad_(x.is_floating_point())

    def pad(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """[members, padded rows, ...]: each member's rows (``tensors``, one per member), then zeros."""
        with torch.no_grad():  # a leaf of its own, whatever the tensors are part of
            rows = torch.cat(list(tensors)).to(self.device, non_blocking=True)
            out = rows.new_zeros((len(self.rows) * self.padded_rows, *rows.shape[1:]))
            out.index_copy_(0, self.destinations, rows)
        return out.view(len(self.rows), self.padded_rows, *rows.shape[1:])

    def unpad(self, stacked: torch.Tensor) -> torch.Tensor:
        """[sum of rows, ...]: the members' rows of a [members, padded rows, ...] tensor, concatenated."""
        return stacked.reshape(-1, *stacked.shape[2:]).index_select(0, self.destinations)

    def outputs(self) -> tuple[torch.Tensor, ...]:
        call = torch.func.vmap(_stacked_call(self.template, self.names))
        with self.members[0].autocast_context():
            outputs = call(tuple(self.params), *self.inputs)
        return self.members[0].to_wire(outputs)

    def split(self, stacked: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each member's rows of [members, padded rows, ...] tensors, on the host."""
        flat = to_host([self.unpad(t).contiguous() for t in stacked])
        return [list(parts) for parts in zip(*(t.split(self.rows) for t in flat))]


def _pool_of(member: ExpertBackend) -> Pool | None:
    """The pool of experts like ``member`` (same group key), if they can be pooled: plain Adam (the only
    optimizer whose step runs on pooled state) over parameters :func:`poolable` takes."""
    key = group_key(member)
    if key is None:
        return None
    pool = _pools.get(key, _UNKNOWN)
    if pool is _UNKNOWN:
        params = _parameters(member)
        with _lock:  # one pool per key, whichever runtime's group comes first
            pool = _pools.setdefault(
                key, Pool(params) if _plain_adam(member.optimizer) and poolable(params) else None)
    return pool  # type: ignore[return-value]


def _pooled(members: Sequence[ExpertBackend], pool: Pool, locked: bool) -> list[Member]:
    """Each member's place in ``pool``, pooling those not (or no longer) in it under their lock (held
    already if ``locked``). The first time, the node's other experts of this kind (those the runtime
    knows) are pooled too, with their optimizer state: they share the members' chunk, and their own
    tensors are freed at once instead of living on beside rows kept for them."""
    places = [pool.member(member, _parameters(member)) for member in members]
    if None in places:
        key, ours = group_key(members[0]), set(members)
        with _lock:  # add_expert may be inserting meanwhile
            known = list(_keys.items())
        others = [backend for backend, k in known
                  if k == key and backend.pooled is None and backend not in ours]
        pool.reserve(places.count(None) + len(others))
        for i, (member, place) in enumerate(zip(members, places)):
            if place is None:
                if locked:
                    places[i] = pool.adopt(member, _parameters(member))
                else:
                    with member.lock:
                        places[i] = pool.adopt(member, _parameters(member))
        for backend in others:
            # one lock at a time. A caller that holds its members' locks (``locked``) only takes a free one:
            # another runtime of this process may hold that expert's lock while it waits for one of ours
            # (its own group's first backward); an expert skipped here is pooled when it next runs
            if not backend.lock.acquire(blocking=not locked):
                continue
            try:
                params = _parameters(backend)
                place = pool.adopt(backend, params)
                if all(backend.optimizer.state.get(p) for p in params):  # stepped: its state moves too
                    pool.adopt_state(backend, place, params)
            finally:
                backend.lock.release()
    return places  # type: ignore[return-value]


def forward(members: Sequence[ExpertBackend],
            inputs: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each member's outputs (on the CPU) for its inputs: as ``member.forward(inputs[i])`` would give."""
    pool = _pool_of(members[0])
    pooled = None if pool is None else _pooled(members, pool, locked=False)  # not in inference mode
    with torch.inference_mode():
        stack = _Stack(members, inputs, grad=False, pool=pool, pooled=pooled)
        return stack.split(stack.outputs())


def backward(members: Sequence[ExpertBackend], inputs: Sequence[Sequence[torch.Tensor]],
             grad_outputs: Sequence[Sequence[torch.Tensor]],
             reply: Callable[[list[list[torch.Tensor]]], None]) -> list[bool]:
    """As ``member.backward(inputs[i], grad_outputs[i], reply=...)`` for every member, in one group:
    ``reply`` gets every member's input gradients (on the CPU) before any step; returns, per member,
    whether its optimizer step was applied (False: its gradients were not finite, the step skipped)."""
    locks = sorted(members, key=lambda m: m.uid)
    for member in locks:
        member.lock.acquire()
    replied = False
    try:
        pool = _pool_of(members[0])
        pooled = None if pool is None else _pooled(members, pool, locked=True)
        stack = _Stack(members, inputs, grad=True, pool=pool, pooled=pooled)
        with torch.enable_grad():
            outputs = stack.outputs()
            grads_padded = [stack.pad([g[j] for g in grad_outputs]) for j in range(len(outputs))]
            torch.autograd.backward(outputs, grads_padded)
        input_grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in stack.inputs]
        answers = stack.split([g.detach() for g in input_grads])
        for member in members:
            member.settled.clear()
        replied = True
        reply(answers)
        return _step_pooled(members, stack) if stack.flat is not None else _step(members, stack)
    finally:
        for member in members:
            member.settled.set()
        for member in reversed(locks):
            member.lock.release()
        if not replied:
            logger.debug("group of %d experts failed before its reply", len(members))


def _clip(grads: list[torch.Tensor], norms: torch.Tensor, members: Sequence[ExpertBackend]) -> list[bool]:
    """Clip each member's stacked gradients by its own norm (``norms``, one per member); whether each one's
    are finite (those that are not are counted and logged: their step is skipped)."""
    max_norm = members[0].max_grad_norm
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    finite = torch.isfinite(norms).tolist()
    for i, ok in enumerate(finite):
        if not ok:
            members[i].skipped_steps += 1
            logger.warning("%s: non-finite parameter gradients; optimizer step skipped", members[i].uid)
    return finite


def _step_pooled(members: Sequence[ExpertBackend], stack: _Stack) -> list[bool]:
    """As :func:`_step`, for pooled members: their gradients are one [members, numel] tensor, clipped by
    the norms of its rows, and Adam steps their pooled rows with a handful of tensor operations."""
    assert stack.flat is not None and stack.pool is not None and stack.pooled is not None
    flat = stack.flat.detach()
    grad = stack.flat.grad if stack.flat.grad is not None else torch.zeros_like(flat)
    with torch.no_grad():
        finite = _clip([grad], torch.linalg.vector_norm(grad, dim=1), members)
        stepped = [i for i, ok in enumerate(finite) if ok]
        if not stepped:
            return finite
        index = stack.index
        if len(stepped) < len(members):
            rows = torch.tensor(stepped, device=flat.device)
            flat, grad = flat.index_select(0, rows), grad.index_select(0, rows)
            index = Index([stack.pooled[i] for i in stepped], flat.device)
        for i in stepped:
            member, place = members[i], stack.pooled[i]
            if place.state is not member.optimizer.state:  # not pooled yet, or replaced (a load)
                stack.pool.adopt_state(member, place, _parameters(member))
        _pooled_adam(members[0].optimizer.param_groups[0], stack.pool, index, flat, grad)
        for i in stepped:
            members[i].version += 1
    return finite


def _pooled_adam(settings: dict, pool: Pool, index: Index, param: torch.Tensor, grad: torch.Tensor) -> None:
    """Adam's step (torch's formula) of the members at ``index``: ``param`` and ``grad`` are their
    [members, numel] parameters and gradients; their moments and step counts are gathered from the pool,
    and all of it written back."""
    beta1, beta2 = settings["betas"]
    lr, eps = settings["lr"], settings["eps"]
    steps = index.gather("steps").add_(1)  # on the CPU, as torch keeps them
    count = steps.to(torch.float64)
    # as torch's Adam: bias corrections in double precision, then applied as float32 scalars would be;
    # [members, parameters] of them, each parameter's column broadcast over its elements
    step_size = (lr / (1 - beta1 ** count)).to(grad.dtype).to(grad.device, non_blocking=True)
    correction2_sqrt = (1 - beta2 ** count).sqrt().to(grad.dtype).to(grad.device, non_blocking=True)
    exp_avg = index.gather("exp_avg").lerp_(grad, 1 - beta1)
    exp_avg_sq = index.gather("exp_avg_sq").mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt()
    update = exp_avg.clone()
    if steps.shape[1] == 1:
        denom.div_(correction2_sqrt)
        update.mul_(step_size)
    else:
        for j, (offset, numel) in enumerate(zip(pool.offsets, pool.numels)):
            denom[:, offset:offset + numel].div_(correction2_sqrt[:, j:j + 1])
            update[:, offset:offset + numel].mul_(step_size[:, j:j + 1])
    param.sub_(update.div_(denom.add_(eps)))
    index.scatter("params", param)
    index.scatter("exp_avg", exp_avg)
    index.scatter("exp_avg_sq", exp_avg_sq)
    index.scatter("steps", steps)


def _step(members: Sequence[ExpertBackend], stack: _Stack) -> list[bool]:
    """Clip each member's stacked gradients by its own norm, then one multi-tensor optimizer step."""
    trainable = [(p, i) for i, p in enumerate(stack.params) if p.requires_grad]
    if not trainable:
        return [False] * len(members)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p, _ in trainable]
    with torch.no_grad():
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
        finite = _clip(grads, norms, members)
        stepped = [i for i, ok in enumerate(finite) if ok]
        if stepped:
            per_member = [[p for p in _parameters(members[i]) if p.requires_grad] for i in stepped]
            if _plain_adam(members[0].optimizer):
                if len(stepped) < len(members):
                    index = torch.tensor(stepped, device=grads[0].device)
                    grads = [g.index_select(0, index) for g in grads]
                _stacked_adam([members[i] for i in stepped], per_member, grads)
            else:
                unbound = [g.unbind(0) for g in grads]  # one view per member and parameter, one call each
                member_grads = [[u[i] for u in unbound] for i in stepped]
                _optimizer_step([members[i] for i in stepped], per_member, member_grads)
            for i in stepped:
                members[i].version += 1
    return finite


def _plain_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam with the settings the node gives it (and most do): no weight decay, amsgrad or maximize."""
    if type(optimizer) is not torch.optim.Adam:
        return False
    settings = optimizer.param_groups[0]
    return (not settings["amsgrad"] and not settings["maximize"] and settings["weight_decay"] == 0
            and not isinstance(settings["lr"], torch.Tensor))


def _stacked_adam(members: list[ExpertBackend], params: list[list[torch.nn.Parameter]],
                  grads: list[torch.Tensor]) -> None:
    """Adam's step (torch's formula, each member's state where torch keeps it) for every member at once:
    ``grads[j]`` is the members' gradients of their j-th parameter stacked [members, ...]; the parameters
    and moments of position j are stacked, stepped with a handful of tensor operations, and copied back."""
    settings = members[0].optimizer.param_groups[0]
    beta1, beta2 = settings["betas"]
    lr, eps = settings["lr"], settings["eps"]
    for j, grad in enumerate(grads):
        states = []
        for member, ps in zip(members, params):
            state = member.optimizer.state[ps[j]]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                state["exp_avg"] = torch.zeros_like(ps[j], memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(ps[j], memory_format=torch.preserve_format)
            states.append(state)
        targets = [ps[j] for ps in params]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        shape = (-1, *[1] * (grad.dim() - 1))
        count = torch.stack(steps).to(torch.float64)
        # as torch's Adam: bias corrections in double precision, then applied as float32 scalars would be
        step_size = (lr / (1 - beta1 ** count)).to(grad.dtype).view(shape)
        correction2_sqrt = (1 - beta2 ** count).sqrt().to(grad.dtype).view(shape)
        param, exp_avg, exp_avg_sq = torch.stack(targets), torch.stack(exp_avgs), torch.stack(exp_avg_sqs)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
        param.sub_(step_size * exp_avg / denom)
        torch._foreach_copy_(targets, list(param.unbind(0)))
        torch._foreach_copy_(exp_avgs, list(exp_avg.unbind(0)))
        torch._foreach_copy_(exp_avg_sqs, list(exp_avg_sq.unbind(0)))


def _optimizer_step(members: list[ExpertBackend], params: list[list[torch.nn.Parameter]],
                    grads: list[list[torch.Tensor]]) -> None:
    """One step of every member's optimizer with these gradients: a single multi-tensor step for Adam and
    SGD (each member's state, lazily created as torch's optimizer creates it), else each one's own."""
    optimizer = members[0].optimizer
    flat_params = [p for ps in params for p in ps]
    flat_grads = [g for gs in grads for g in gs]
    settings = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.Adam:
        exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
        for member, ps in zip(members, params):
            for p in ps:
                state = member.optimizer.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if settings["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if settings["amsgrad"]:
                    max_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
        adam_step(
            flat_params, flat_grads, exp_avgs, exp_avg_sqs, max_sqs, steps, foreach=True,
            decoupled_weight_decay=settings.get("decoupled_weight_decay", False),
            amsgrad=settings["amsgrad"], beta1=settings["betas"][0], beta2=settings["betas"][1],
            lr=settings["lr"], weight_decay=settings["weight_decay"], eps=settings["eps"],
            maximize=settings["maximize"])
    elif type(optimizer) is torch.optim.SGD:
        buffers = [member.optimizer.state.get(p, {}).get("momentum_buffer")
                   for member, ps in zip(members, params) for p in ps]
        sgd_step(
            flat_params, flat_grads, buffers, foreach=True, weight_decay=settings["weight_decay"],
            momentum=settings["momentum"], lr=settings["lr"], dampening=settings["dampening"],
            nesterov=settings["nesterov"], maximize=settings["maximize"])
        if settings["momentum"] != 0:
            owners = [(member, p) for member, ps in zip(members, params) for p in ps]
            for (member, p), buffer in zip(owners, buffers):
                member.optimizer.state[p]["momentum_buffer"] = buffer
    else:
        for member, ps, gs in zip(members, params, grads):
            for p, g in zip(ps, gs):
                p.grad = g
            try:
                member.optimizer.step()
            finally:
                member.optimizer.zero_grad(set_to_none=True)
