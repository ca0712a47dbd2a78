"""Runtime: per-expert task queues and the one thread that runs batches on the device.

Each expert has two queues, forward and backward. The runtime thread always takes the queue whose
oldest task has waited longest, merges the tasks at its head into one batch (same trailing shapes,
at most ``max_batch_tokens`` tokens; one task per batch when batching is off), runs it, and hands
each task its slice of the result. The device is therefore busy whenever any task is queued, and
concurrent clients of one expert share one device call. A queue never holds more than
``max_queued_tokens``: past that, :meth:`Runtime.submit` raises :class:`Overloaded` at once.
Tasks whose caller has gone (deadline passed, call cancelled) are dropped before they run.

A batch's tensors reach the device through :func:`dmoe.node.devicepath.stage`. On a CUDA device the
thread takes the next batch while the current one computes and starts its copy on the copy stream, so
that host -> device copies overlap the compute; the next batch still runs only after the current one,
optimizer step included (on the CPU nothing is taken early: batches form as late as they can).

Each task carries its caller's peer key. Before a backward batch runs, the node's
:class:`~dmoe.node.influence.InfluenceLimits` says which of its callers may still update the expert
(their step budget and share): the others' rows get their input gradients but stay out of the step,
and each caller whose rows went into a step is charged its share of the batch's tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping

import torch

from dmoe.node import grouped
from dmoe.node.backend import ExpertBackend
from dmoe.node.devicepath import Staged, stage
from dmoe.node.grouped import group_key
from dmoe.node.influence import InfluenceLimits

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The expert's queue is full; the caller should answer RESOURCE_EXHAUSTED."""


class Parts:
    """The outcomes of several tasks (the parts of one packed call), each task's ``future`` one
    :meth:`part` of it: a lighter stand-in for a concurrent.futures.Future per task, which is a condition
    variable and a list of callbacks each (a packed call queues a part per expert, hundreds a step).
    ``on_done`` is called once, in the thread that settles the last part; :meth:`cancel` makes the runtime
    drop the parts that have not started (as cancelling their futures would)."""

    __slots__ = ("outcomes", "cancelled", "_left", "_lock", "_on_done")

    def __init__(self, count: int, on_done: Callable[[], None]):
        self.outcomes: list = [None] * count  # each part's result (a list of tensors) or exception
        self.cancelled = False
        self._left = count
        self._lock = threading.Lock()
        self._on_done = on_done

    def part(self, index: int) -> Part:
        return Part(self, index)

    def cancel(self) -> None:
        self.cancelled = True

    def _settle(self, index: int, outcome: object) -> None:
        with self._lock:
            self.outcomes[index] = outcome
            self._left -= 1
            last = self._left == 0
        if last:
            self._on_done()


class Part:
    """One task's outcome in its :class:`Parts`: what the runtime calls of a task's future."""

    __slots__ = ("_parts", "_index")

    def __init__(self, parts: Parts, index: int):
        self._parts, self._index = parts, index

    def set_running_or_notify_cancel(self) -> bool:
        return not self._parts.cancelled

    def set_result(self, result: list[torch.Tensor]) -> None:
        self._parts._settle(self._index, result)

    def set_exception(self, exception: BaseException) -> None:
        self._parts._settle(self._index, exception)


@dataclasses.dataclass(slots=True)
class Task:
    inputs: list[torch.Tensor]
    grad_outputs: list[torch.Tensor] | None  # None for forward
    rows: int  # size of the first dimension: results are split back along it
    num_tokens: int  # positions, rows x seq for sequence experts: what limits count
    future: concurrent.futures.Future | Part
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    peer: str = ""  # the caller as CallGuard.admit keys it; the influence limits count per peer
    _shape_key: tuple | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def shape_key(self) -> tuple:
        """The trailing shapes of the inputs (computed once: batches are formed by comparing them)."""
        if self._shape_key is None:
            self._shape_key = tuple(tuple(t.shape[1:]) for t in self.inputs)
        return self._shape_key


@dataclasses.dataclass(slots=True)
class _Queue:
    backend: ExpertBackend
    backward: bool
    tasks: collections.deque = dataclasses.field(default_factory=collections.deque)
    num_tokens: int = 0


class Runtime:
    """Owns the queues and the device thread. start() / shutdown(); submit() is thread-safe."""

    def __init__(self, backends: Mapping[str, ExpertBackend], *, max_batch_tokens: int,
                 max_queued_tokens: int, batching: bool, influence: InfluenceLimits | None = None,
                 stage_ahead: bool | None = None, grouping: bool = False):
        """``influence``: the step budgets and shares per peer (None: every Backward updates).
        ``stage_ahead``: take and stage the next batch while one computes (None: on CUDA devices only,
        where its copy then overlaps the compute; elsewhere it would only make batches form earlier).
        ``grouping``: run the batches of same-shaped small experts waiting together as one group (one
        vectorised call and one optimizer step, see :mod:`dmoe.node.grouped`); needs ``batching``."""
        self.max_batch_tokens, self.max_queued_tokens = max_batch_tokens, max_queued_tokens
        self.batching, self.grouping = batching, grouping
        self.influence = influence
        self.stage_ahead = stage_ahead
        self.num_staged_ahead = 0  # batches taken and staged while the one before them computed
        self._queues = {
            (uid, backward): _Queue(backend, backward)
            for uid, backend in backends.items() for backward in (False, True)
        }
        if grouping:  # known up front: a group's pooled storage is sized for every expert of its kind
            for backend in backends.values():
                group_key(backend)
        # the queues holding tasks: the next batch is chosen among these, not among every queue (a node
        # may host thousands of experts, a step touch a hundred of them)
        self._ready: dict[int, _Queue] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._retired: set[str] = set()  # experts no longer hosted, whose queues go once drained
        self._thread = threading.Thread(target=self._run, name="dmoe-runtime", daemon=True)
        # a batch taken, its copy to the device started, while the one before it computed (CUDA only)
        self._next: tuple[list[tuple[_Queue, list[Task]]], Staged | None] | None = None
        self.num_batches = 0
        self.num_groups = 0  # batches of several experts run as one group

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def add_expert(self, uid: str, backend: ExpertBackend) -> None:
        """Queues for an expert the node hosts from now on (thread-safe). An expert hosted before keeps
        its queues, with what waits in them, and runs on ``backend`` from now on."""
        with self._cond:
            self._retired.discard(uid)
            if self.grouping:
                group_key(backend)
            for backward in (False, True):
                queue = self._queues.get((uid, backward))
                if queue is None:
                    self._queues[uid, backward] = _Queue(backend, backward)
                else:
                    queue.backend = backend

    def remove_expert(self, uid: str) -> None:
        """Drop an expert's queues (thread-safe): at once if they are empty, else once what waits in them
        has run. New tasks for it are refused from now on."""
        with self._cond:
            self._retired.add(uid)
            self._forget_drained(uid)

    def _forget_drained(self, uid: str) -> None:
        """With the lock held: forget a retired expert's queues, and its backend, once both are empty."""
        queues = [self._queues.get((uid, backward)) for backward in (False, True)]
        if uid in self._retired and not any(q is not None and q.tasks for q in queues):
            for backward in (False, True):
                self._queues.pop((uid, backward), None)
            self._retired.discard(uid)

    def queued_tokens(self, uid: str) -> int:
        queues = [self._queues.get((uid, backward)) for backward in (False, True)]
        return sum(q.num_tokens for q in queues if q is not None)

    def submit(self, uid: str, task: Task) -> concurrent.futures.Future | Part:
        result = self.submit_many([(uid, task)])[0]
        if isinstance(result, Overloaded):
            raise result
        return result

    def submit_many(self, items: list[tuple[str, Task]]
                    ) -> list[concurrent.futures.Future | Part | Overloaded]:
        """Queue several tasks at once (a batched call's parts): the device thread sees all of them
        together, so that the parts of one call for many experts can run as one group. Each task's
        future, or the Overloaded its own submit would have raised (the others are queued all the same)."""
        results: list[concurrent.futures.Future | Part | Overloaded] = []
        with self._cond:
            for uid, task in items:
                queue = self._queues.get((uid, task.grad_outputs is not None))
                if queue is None or uid in self._retired:
                    results.append(Overloaded(f"{uid} is no longer served here"))
                elif self._stopping:
                    results.append(Overloaded("node is shutting down"))
                elif queue.num_tokens + task.num_tokens > self.max_queued_tokens:
                    results.append(Overloaded(
                        f"{uid} has {queue.num_tokens} tokens queued; limit {self.max_queued_tokens}"))
                else:
                    queue.tasks.append(task)
                    queue.num_tokens += task.num_tokens
                    self._ready[id(queue)] = queue
                    results.append(task.future)
            self._cond.notify()
        return results

    def _take_batch(self) -> list[tuple[_Queue, list[Task]]] | None:
        """Pop the next batch: the oldest queue's, and with grouping the batches of other ready experts
        that can run with it as one group (see :mod:`dmoe.node.grouped`); None when stopping with
        nothing left. Called with the lock held."""
        while not self._ready:
            if self._stopping:
                return None
            self._cond.wait()
        queue = min(self._ready.values(), key=lambda q: q.tasks[0].enqueued_at)
        taken = [(queue, self._pop(queue, self.max_batch_tokens))]
        key = group_key(queue.backend) if self.grouping and self.batching else None
        if key is None or not taken[0][1] or sum(t.rows for t in taken[0][1]) > grouped.MAX_GROUP_ROWS:
            return taken
        shape_key = taken[0][1][0].shape_key
        tokens = sum(task.num_tokens for task in taken[0][1])
        for other in list(self._ready.values()):
            if len(taken) >= grouped.MAX_GROUP_SIZE or tokens >= self.max_batch_tokens:
                break
            head = other.tasks[0]
            if (other is queue or other.backward != queue.backward or head.shape_key != shape_key
                    or head.rows > grouped.MAX_GROUP_ROWS or tokens + head.num_tokens > self.max_batch_tokens
                    or group_key(other.backend) != key):
                continue
            batch = self._pop(other, self.max_batch_tokens - tokens, max_rows=grouped.MAX_GROUP_ROWS)
            tokens += sum(task.num_tokens for task in batch)
            taken.append((other, batch))
        self.num_groups += len(taken) > 1
        return taken

    def _pop(self, queue: _Queue, max_tokens: int, max_rows: int | None = None) -> list[Task]:
        """Pop the tasks at the head of ``queue`` that form one batch (same trailing shapes, at most
        ``max_tokens`` tokens and ``max_rows`` rows, but at least one task; one task when batching is
        off). Called with the lock held."""
        batch: list[Task] = []
        num_tokens = num_rows = 0
        while queue.tasks:
            task = queue.tasks[0]
            if batch and (not self.batching or task.shape_key != batch[0].shape_key
                          or num_tokens + task.num_tokens > max_tokens
                          or (max_rows is not None and num_rows + task.rows > max_rows)):
                break
            queue.tasks.popleft()
            queue.num_tokens -= task.num_tokens
            if task.future.set_running_or_notify_cancel():  # False: its caller has gone
                batch.append(task)
                num_tokens += task.num_tokens
                num_rows += task.rows
        if not queue.tasks:
            del self._ready[id(queue)]
        self._forget_drained(queue.backend.uid)
        return batch

    def _run(self) -> None:
        # the process's torch thread count (the node's --num-threads) for this thread too: a thread started
        # after torch.set_num_threads gets OpenMP's default count, whose idle workers spin between the
        # tiny ops of small experts (a node of 1,000 of them spent as much CPU there as in the experts)
        torch.set_num_threads(torch.get_num_threads())
        while True:
            taken, self._next = self._next, None
            if taken is None:
                with self._cond:
                    batches = self._take_batch()
                if batches is None:
                    return
                taken = (batches, None)
            batches, staged = taken
            batches = [(queue, batch) for queue, batch in batches if batch]
            if len(batches) == 1:
                self._run_batch(*batches[0], staged)
            elif batches:
                self._run_group(batches)

    def _stage_next(self) -> None:
        """While a batch computes on a CUDA device: take the next batch, if one is waiting, and start its
        host -> device copy on the copy stream, so that it overlaps the compute (run next by :meth:`_run`).
        Only copies: nothing of the next batch runs before the current one, optimizer step included, ends."""
        if self._next is not None:
            return
        with self._cond:
            if not self._ready:
                return
            taken = self._take_batch()
        if taken is None:
            return
        staged = None
        self.num_staged_ahead += 1
        (queue, batch), *others = taken
        if batch and not others:  # a group stages its members when it runs
            try:
                staged = _stage(queue, batch)
            except Exception:  # staged again, and failed with its callers, when it runs
                logger.debug("%s: staging ahead failed", queue.backend.uid, exc_info=True)
        self._next = (taken, staged)

    def _run_batch(self, queue: _Queue, batch: list[Task], staged: Staged | None = None) -> None:
        """Run one batch and answer its tasks. A backward's callers are answered with their input
        gradients as soon as those exist, before the expert's optimizer step (which the client does not
        wait for); the step still ends before this thread runs another batch, of any expert (on CUDA
        the next batch's inputs may already be copying to the device meanwhile: see :meth:`_stage_next`)."""
        backend, allowed, version, answered = queue.backend, None, 0, False
        ahead = self.stage_ahead if self.stage_ahead is not None else backend.device.type == "cuda"
        overlap = self._stage_next if ahead else None

        def answer(outputs: list[torch.Tensor]) -> None:
            nonlocal answered
            sizes = [t.rows for t in batch]
            per_task = list(zip(*(o.split(sizes) for o in outputs)))
            answered = True
            for task, result in zip(batch, per_task):
                task.future.set_result(list(result))

        try:
            if staged is None:
                staged = _stage(queue, batch)
            staged.wait()
            if queue.backward:
                assert staged.grad_outputs is not None
                update = None
                if self.influence is not None:
                    allowed = self.influence.allowed(backend.uid, [t.peer for t in batch])
                    if not all(allowed):
                        update = torch.cat([torch.full((t.rows,), ok) for t, ok in zip(batch, allowed)])
                version = backend.version
                backend.backward(staged.inputs, staged.grad_outputs, update, reply=answer,
                                 while_computing=overlap)
            else:
                answer(backend.forward(staged.inputs, while_computing=overlap))
        except BaseException as e:  # a bug, a device error, a user module that exits: fail these calls only
            logger.exception("%s: batch of %d tasks failed", queue.backend.uid, len(batch))
            if not answered:
                # an exception that is not an Exception (SystemExit, ...) must not reach the caller's loop
                error = e if isinstance(e, Exception) else RuntimeError(f"expert raised {e!r}")
                for task in batch:
                    task.future.set_exception(error)
            return
        self.num_batches += 1
        if allowed is not None:
            self._account(backend, batch, allowed, stepped=backend.version > version)

    def _run_group(self, batches: list[tuple[_Queue, list[Task]]]) -> None:
        """Run the batches of several experts as one group and answer their tasks (as :meth:`_run_batch`
        would each). A backward member some of whose callers may not update its expert now runs alone."""
        if batches[0][0].backward and self.influence is not None:
            alone = [(q, b) for q, b in batches
                     if not all(self.influence.allowed(q.backend.uid, [t.peer for t in b]))]
            if alone:
                batches = [(q, b) for q, b in batches if all(other is not q for other, _ in alone)]
                for queue, batch in alone:
                    self._run_batch(queue, batch)
                if len(batches) == 1:
                    self._run_batch(*batches[0])
                if len(batches) <= 1:
                    return
        members = [queue.backend for queue, _ in batches]
        inputs = [[torch.cat(parts) if len(parts) > 1 else parts[0]
                   for parts in zip(*(t.inputs for t in batch))] for _, batch in batches]
        answered = False

        def answer(outputs: list[list[torch.Tensor]]) -> None:
            nonlocal answered
            answered = True
            for (_, batch), member_outputs in zip(batches, outputs):
                if len(batch) == 1:  # most members of a group: one caller's rows
                    batch[0].future.set_result(list(member_outputs))
                    continue
                sizes = [t.rows for t in batch]
                for task, result in zip(batch, zip(*(o.split(sizes) for o in member_outputs))):
                    task.future.set_result(list(result))

        versions = [member.version for member in members]
        try:
            if batches[0][0].backward:
                grads = [[torch.cat(parts) if len(parts) > 1 else parts[0]
                          for parts in zip(*(t.grad_outputs or [] for t in batch))] for _, batch in batches]
                grouped.backward(members, inputs, grads, reply=answer)
            else:
                answer(grouped.forward(members, inputs))
        except BaseException as e:  # as in _run_batch: fail these calls only
            logger.exception("group of %d experts (%s, ...) failed", len(members), members[0].uid)
            if not answered:
                error = e if isinstance(e, Exception) else RuntimeError(f"expert raised {e!r}")
                for _, batch in batches:
                    for task in batch:
                        task.future.set_exception(error)
            return
        self.num_batches += len(batches)
        if batches[0][0].backward and self.influence is not None:
            for (queue, batch), version in zip(batches, versions):
                self._account(queue.backend, batch, [True] * len(batch),
                              stepped=queue.backend.version > version)

    def _account(self, backend: ExpertBackend, batch: list[Task], allowed: list[bool], stepped: bool) -> None:
        """Charge the callers whose rows went into a step (by tokens), count those left out."""
        assert self.influence is not None
        tokens_by_peer: dict[str, int] = collections.defaultdict(int)
        for task, ok in zip(batch, allowed):
            if not ok:
                self.influence.skip(backend.uid, task.peer)
            elif stepped:
                tokens_by_peer[task.peer] += task.num_tokens
        if tokens_by_peer:
            self.influence.charge(backend.uid, tokens_by_peer)


def _stage(queue: _Queue, batch: list[Task]) -> Staged:
    """The batch's inputs (and output gradients, for a backward) concatenated on the expert's device."""
    grads = [t.grad_outputs or [] for t in batch] if queue.backward else None
    return stage([t.inputs for t in batch], grads, queue.backend.device)
