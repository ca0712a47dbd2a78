"""Pooled storage: the parameters and Adam state of same-shaped experts as rows of a few stacked tensors.

A group of small experts (:mod:`dmoe.node.grouped`) needs its members' parameters stacked along a first
dimension, and after the backward pass their Adam moments and step counts stacked too, stepped, and
written back. Stacking and writing back one member and one parameter at a time is Python work per member
(a node profile of 64 experts of 544 parameters each spent more there than in the arithmetic). Here every
member's parameters, moments and step counts are views of one row of a chunk's ``[capacity, numel]``
tensors (``[capacity, parameters]`` for the step counts), so that a group gathers them with one
``index_select`` per chunk and tensor and writes them back with one ``index_copy_``, whatever its size.

Each parameter stays the same ``nn.Parameter`` (its ``.data`` a view of its row), and its optimizer state
the dict torch's Adam keeps, its tensors views of the row; so the expert's own calls (its forward, its
backward with torch's own optimizer step), checkpoints, averaging and state transfer, which read the
tensors or write into them, read and write the pooled rows. What replaces tensors instead of writing into
them is detected when the member next runs in a group, and the member is pooled again from its tensors as
they are then: a parameter given other storage (its data pointer is not its row's), and
``optimizer.load_state_dict`` (checkpoint loads and state transfer: it builds a new state dict, whose
identity is checked). A member stepped alone by torch before its state was pooled has its state copied
into its row at its next grouped step.

Chunks are allocated as members come: the first sized for every expert of the kind the node knows, each
later one a quarter of the rows there are (at least MIN_CHUNK, and as many as a group needs at once), so
one expert more costs a fraction of the kind's memory, not as much again. A dead expert's row is reused,
and a chunk whose rows are all free (its experts all gone) is dropped; nothing is ever moved between
chunks, so pooling one member never touches another. A pool's rows are taken and given back under its
lock (runtimes of one process share pools), which is never held while waiting for anything else.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Sequence

import torch

from dmoe.node.backend import ExpertBackend

MIN_CHUNK = 16  # the fewest rows of a chunk
GROWTH = 4  # a new chunk holds at least 1/GROWTH of the rows the pool has
_SLOTS = ("exp_avg", "exp_avg_sq")


def scalar_dtype() -> torch.dtype:
    """The dtype torch's optimizers keep their step counts in."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _Chunk:
    """Rows of pooled members: parameters, Adam's two moments ([capacity, numel]) and step counts
    ([capacity, parameters]), on the members' device."""

    __slots__ = ("params", "exp_avg", "exp_avg_sq", "steps", "capacity", "free", "__weakref__")

    def __init__(self, capacity: int, numel: int, num_params: int, dtype: torch.dtype, device: torch.device):
        self.params = torch.zeros(capacity, numel, dtype=dtype, device=device)
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)
        # on the CPU, where torch's Adam keeps step counts (its bias corrections read them as numbers)
        self.steps = torch.zeros(capacity, num_params, dtype=scalar_dtype())
        self.capacity = capacity
        self.free = list(range(capacity - 1, -1, -1))


class Member:
    """Where a pooled expert lives: its pool, chunk and row, its parameters' data pointers as pooled,
    and the optimizer state dict whose tensors are views of the row (None: not pooled yet)."""

    __slots__ = ("pool", "chunk", "row", "ptrs", "state")

    def __init__(self, pool: Pool, chunk: _Chunk, row: int):
        self.pool, self.chunk, self.row = pool, chunk, row
        self.ptrs: list[int] = []
        self.state: dict | None = None


class Index:
    """Where a group's members are: per chunk, their rows there and their positions in the group (on the
    members' device, and on the CPU for the step counts)."""

    __slots__ = ("size", "parts", "host_parts")

    def __init__(self, members: Sequence[Member], device: torch.device):
        self.size = len(members)
        chunks: dict[int, tuple[_Chunk, list[int], list[int]]] = {}
        for position, member in enumerate(members):
            entry = chunks.get(id(member.chunk))
            if entry is None:
                entry = chunks[id(member.chunk)] = (member.chunk, [], [])
            entry[1].append(member.row)
            entry[2].append(position)
        one = len(chunks) == 1
        self.host_parts = [(chunk, torch.tensor(rows), None if one else torch.tensor(positions))
                           for chunk, rows, positions in chunks.values()]
        self.parts = self.host_parts if device.type == "cpu" else [
            (chunk, rows.to(device), None if positions is None else positions.to(device))
            for chunk, rows, positions in self.host_parts]

    def gather(self, what: str) -> torch.Tensor:
        """[members, ...]: the members' rows of the chunks' tensor ``what`` (a copy), in group order."""
        parts = self.host_parts if what == "steps" else self.parts
        if len(parts) == 1:
            chunk, rows, _ = parts[0]
            return getattr(chunk, what).index_select(0, rows)
        first = getattr(parts[0][0], what)
        out = first.new_empty((self.size, *first.shape[1:]))
        for chunk, rows, positions in parts:
            out.index_copy_(0, positions, getattr(chunk, what).index_select(0, rows))
        return out

    def scatter(self, what: str, values: torch.Tensor) -> None:
        """Write ``values`` ([members, ...], group order) into the members' rows of ``what``."""
        for chunk, rows, positions in self.host_parts if what == "steps" else self.parts:
            getattr(chunk, what).index_copy_(0, rows, values if positions is None
                                             else values.index_select(0, positions))


class Pool:
    """The pooled storage of one kind of expert (one group key: the same parameter shapes, one dtype)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:j]) for j in range(len(params))]
        self.numel = sum(self.numels)
        self.dtype, self.device = params[0].dtype, params[0].device
        self.chunks: list[_Chunk] = []
        self._lock = threading.Lock()  # held around taking and freeing rows, nothing else taken meanwhile
        self._released: deque[tuple[_Chunk, int]] = deque()  # rows of experts gone, not yet freed

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's [..., *shape] view of ``flat`` ([..., numel])."""
        lead = flat.shape[:-1]
        return [flat[..., off:off + n].view(*lead, *shape)
                for off, n, shape in zip(self.offsets, self.numels, self.shapes)]

    def member(self, backend: ExpertBackend, params: Sequence[torch.nn.Parameter]) -> Member | None:
        """``backend``'s record if its parameters are its row's views (as pooled), else None."""
        member = backend.pooled
        if member is None or member.pool is not self or [p.data_ptr() for p in params] != member.ptrs:
            return None
        return member

    def adopt(self, backend: ExpertBackend, params: Sequence[torch.nn.Parameter]) -> Member:
        """Pool ``backend``'s parameters (their values copied into its row, each parameter's data then a
        view of it); its optimizer state is pooled at its first grouped step. The caller holds the
        expert's lock (nobody else may write its parameters meanwhile)."""
        member = backend.pooled
        if member is None or member.pool is not self:
            member = backend.pooled = self._allocate(backend)
        row = self.views(member.chunk.params[member.row])
        with torch.no_grad():
            for p, view in zip(params, row):
                view.copy_(p.detach())
                p.data = view
        member.ptrs = [p.data_ptr() for p in params]
        member.state = None  # the state's tensors, if any, are still torch's own
        return member

    def adopt_state(self, backend: ExpertBackend, member: Member,
                    params: Sequence[torch.nn.Parameter]) -> None:
        """Make ``backend``'s Adam state views of its row: the values of a parameter's state, where torch
        has one (its own steps, a checkpoint's), else zeros and a step count of 0, as torch's first step
        would create it. The caller holds the expert's lock."""
        chunk, row = member.chunk, member.row
        state = backend.optimizer.state
        moments = {slot: self.views(getattr(chunk, slot)[row]) for slot in _SLOTS}
        with torch.no_grad():
            for j, p in enumerate(params):
                kept = state[p]
                step = chunk.steps[row, j]
                if kept:
                    step.fill_(float(kept["step"]))
                    for slot in _SLOTS:
                        moments[slot][j].copy_(kept[slot])
                else:
                    step.zero_()
                    for slot in _SLOTS:
                        moments[slot][j].zero_()
                kept["step"] = step
                for slot in _SLOTS:
                    kept[slot] = moments[slot][j]
        member.state = state

    def reserve(self, count: int) -> None:
        """Make room for ``count`` more members: if the free rows are fewer, a chunk of at least ``count``
        rows (so that members pooled together share it), and of a quarter of the pool's rows, so that
        members coming one by one do not each need a chunk of their own."""
        with self._lock:
            self._collect()
            self._reserve(count)

    def _reserve(self, count: int) -> None:
        if sum(len(c.free) for c in self.chunks) < count:
            total = sum(c.capacity for c in self.chunks)
            capacity = max(MIN_CHUNK, count, total // GROWTH)
            self.chunks.append(_Chunk(capacity, self.numel, len(self.numels), self.dtype, self.device))

    def _allocate(self, backend: ExpertBackend) -> Member:
        with self._lock:
            self._collect()
            self._reserve(1)
            # the chunk with the fewest free rows that has one: members fill a chunk before the next
            chunk = min((c for c in self.chunks if c.free), key=lambda c: len(c.free))
            member = Member(self, chunk, chunk.free.pop())
        weakref.finalize(backend, _release, weakref.ref(self), weakref.ref(chunk), member.row)
        return member

    def _collect(self) -> None:
        """Free the rows of the experts gone since (the caller holds the lock); drop chunks left empty."""
        emptied: list[_Chunk] = []  # (not a chunk just made for members about to come)
        while self._released:
            chunk, row = self._released.popleft()
            chunk.free.append(row)
            if len(chunk.free) == chunk.capacity:
                emptied.append(chunk)
        if emptied:
            self.chunks = [c for c in self.chunks if all(c is not e for e in emptied)]

    def _give_back(self, chunk: _Chunk, row: int) -> None:
        self._released.append((chunk, row))
        # a finalizer may run on a thread in the middle of a pool operation (a garbage collection it set
        # off): then the row waits, and the next operation frees it
        if self._lock.acquire(blocking=False):
            try:
                self._collect()
            finally:
                self._lock.release()


def _release(pool_ref: weakref.ref, chunk_ref: weakref.ref, row: int) -> None:
    """A pooled expert is gone: its row is free for another (its views are the expert's own, gone with
    it); a chunk no longer in use is dropped from its pool."""
    pool, chunk = pool_ref(), chunk_ref()
    if pool is not None and chunk is not None:
        pool._give_back(chunk, row)


def poolable(params: Sequence[torch.Tensor]) -> bool:
    """Whether experts of these parameters can be pooled: all trainable, of one dtype, on one device."""
    return (bool(params) and all(p.requires_grad for p in params)
            and len({(p.dtype, p.device) for p in params}) == 1)
