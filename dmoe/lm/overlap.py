"""Training steps in flight at once: one step's forward on the wire while another's backward travels.

A step through remote experts is two request-reply phases (forward, then backward), and the next step
waits for both: over a long link, each direction of the link idles for a round trip or more per step.
:class:`StepsInFlight` runs up to ``in_flight`` steps at once, each in its own thread on its own
*replica* of the model (the same architecture; for RemoteMoE layers, the same swarm), so that their
phases interleave on the wire. The model being trained (the *master*) stays in the caller's thread:

* when a step starts, its replica takes the master's current parameters and buffers (a copy);
* when a step ends, its replica's parameter gradients are applied to the master by the caller's
  optimizer (after clipping), in the order the steps started, whatever order they end in.

So a step's gradient is computed at parameters that miss up to ``in_flight - 1`` of the latest
updates (delayed gradients, as in asynchronous SGD with bounded staleness; Learning@home's trainers
ran many such jobs at once). With ``predict`` (the default) the replica starts from a guess of the
parameters its gradient will be applied to: the master's plus the last update once per step still in
flight (weight prediction, as PipeDream and SpecTrain do).

Delayed gradients cost Adam much more than their one or three steps of lateness. In a linear analysis
of Adam's update (momentum beta1 0.9) along one direction of the loss's curvature c, one step at a
time is stable while the step size (preconditioned) times c stays below 38, and Adam trains near that
edge; with the gradient one step late the bound falls to 1 (2.7 with the guess), three steps late to
0.3 (0.7). Guesses, delay compensation (DC-ASGD's g + lambda g*g*(w_now - w_used)), a smaller beta1,
or recomputing the client-side layers at fresh parameters with the experts' answers replayed (the
experts' outputs stay late, which costs as much) each recover little of it. Two measures recover
more, and are the defaults (``--steps-in-flight`` of ``dmoe train``):

* ``warmup`` (40): the first steps of a StepsInFlight (of a run, or of a resumed run) one at a time,
  when the parameters move fastest and late gradients do lasting harm;
* ``shorten``: a step that started with n > 0 others in flight has its update divided by n (as by a
  learning rate n times smaller): one step late, unchanged; three steps late, a third.

Held-out loss of the byte-level LM (default model, ``--local``, batch 16, 8 held-out batches; the
trainer's steps replayed one after the other with the same delays, which gives the same numbers)::

    two steps in flight (four where said)     80 steps, seed 0       seed 1        300 steps
    ----------------------------------------------------------------------------------------------
    one step at a time                        2.569                  2.597         2.105
    no guess                                  2.928
    guess (the former default)                2.899                  2.847         2.549
    guess from Adam's own moments             2.876
    DC-ASGD-a, lambda 0.1 / 1 / 10            2.880 / 2.881 / 2.891
    beta1 0.8                                 2.884
    client recomputed fresh, experts late     2.888
    late update x0.7 / x0.5                   2.819 / 2.810          2.778 (x0.5)  2.301 (x0.7)
    warm-up 10 / 20 / 40                      2.854 / 2.866 / 2.687  2.740 (40)    2.245 (40)
    warm-up 40, late update x0.7 / x0.5       2.659 / 2.687                        2.259 / 2.289
    warm-up 40, late update x0.25                                                  2.402
    four in flight: guess                     3.006
    four: warm-up 40, late update x1 / x0.58                                       2.687 / 2.506
    four: warm-up 40, x0.5 / x0.33            2.885 / 2.835
    four: warm-up 40, x0.25 / x0.125          2.813 / 2.801
    four: the defaults (late update / 3)      2.844                                2.465

(DC-ASGD-a: lambda times g*g/sqrt(v), v Adam's second moment; with the warm-up, lambda 100 / 1,000 /
10,000 gave 2.703 / 2.649 / 2.769, and beta2 0.95 / 0.99 gave 2.649 / 2.658, within what a change of
seed moves; beta1 0.5 / 0 without it, 2.922 / 3.000. Gradients clipped at a norm of 0.1 instead of 1,
with 4 held-out batches: two in flight 2.657 and 2.715 for seeds 0 and 1, one step at a time with the
same clipping 2.571 and 2.608 (2.593 and 2.635 at 1): the clipping helps both, and the gap stays.) The
defaults are the warm-up row with the update unchanged one step late (2.687 after 80 steps, +4.6%; 2.245
after 300, +6.7%) and divided by 3 three steps late (2.844, +10.7%; 2.465, +17%): they miss the goal of
a held-out loss within 2% of one step at a time at equal steps. Over a swarm
(``benchmarks/bench_learning.py``, one step at a time 2.595 after 80 steps, seeds 0 and 1): two in
flight 2.697 and 2.795 (2.906 and 2.850 before), four 2.844 and 2.925 (3.008 and 3.006 before). Without
a swarm, steps in flight cost learning per step and gain nothing: they are for links where round trips,
not the learning per step, bound the training.

Two ways around late gradients were built, measured and left out:

* *micro-batches* (a step's tokens in M parts, N in flight, one update; ``bench_network.py --micro``):
  at 50 ms and 50 Mbit/s on a 2-core machine, 8 parts with 4 in flight reached 65% / 48% / 32% of
  the bandwidth bound (no compression / fp16 / 8-bit), against 47% / 42% / 32% one step at a time
  and 84% / 87% / 74% with four steps in flight: each step still pays its round trips and the
  per-step work of client and node;
* *gradients at final parameters*: a step's forward sent at once (at the guessed parameters), its
  routing and the experts' answers recorded; on its turn, once the update before it had landed, the
  forward replayed at the master's parameters with the answers kept and the backward sent with the
  replayed inputs: no gradient late, only the forward's values (4 held-out batches; one step at a
  time 2.593 and 2.635 after 80 steps, seeds 0 and 1, 2.112 after 300). With the experts run again
  on the replayed input (in-process experts): 2.606 and 2.631, so late routing costs nothing. With
  the experts' answers kept, as a swarm must: 2.708 and 2.753, 2.255 after 300 steps; over a swarm
  (``bench_learning.py``, one step at a time 2.595 for both seeds, 2.110 after 300): 2.672 and 2.779,
  2.261 after 300, and four in flight 2.877 (2.642 after 300). The late values of the forward, not the late
  gradients, cost the learning: the guess misses the pending update by about 0.43 of its norm
  (Adam's step follows each batch's noise). Each backward waiting for the update before it, the link
  also fell to 60% / 54% / 42% with four in flight.

Nothing is shared between the threads but the swarm (thread-safe: each call runs on its loop); what
a replica keeps of a step besides its gradients (the gates' routed-token counters, which the demand
published from the master's layers reads) is handed to the master by ``on_end`` as the step ends.
The experts on the nodes see the calls of several steps interleaved, each Backward answered before
that expert's optimizer step, which the next call on it then sees.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")
WARMUP_STEPS = 40  # steps run one at a time before steps overlap (measured: see the module's docstring)


class StepsInFlight(Generic[T]):
    """``submit(compute)`` starts a step: ``compute(replica)`` runs the forward and ``backward()`` on a
    replica, in a worker thread, and returns what the caller wants back (its loss, statistics); it
    returns the results of the steps that had to end first to make room, oldest first, each after its
    gradients were applied to ``model``. ``drain()`` ends every step in flight (before an evaluation,
    a checkpoint or the end of training). ``close()`` waits for the steps in flight and stops the
    threads; a step that raised re-raises in ``submit``/``drain``.

    ``make_replica()`` builds a model of the same architecture as ``model`` (parameters in the same
    order; their values do not matter, they are copied before each step). ``apply()`` is called with
    a step's gradients in the master's ``.grad``, in the caller's thread; it applies them (clip,
    ``optimizer.step()``). ``on_end(master, replica)``, if given, is called after that, in the
    caller's thread too.

    ``predict``: a step starts from the master plus the last update once per step still in flight.
    ``warmup`` (default ``WARMUP_STEPS``, read when it is made): the first steps submitted run one at a
    time. ``shorten``: the update of a step that started with n > 0 others in flight (done by
    ``apply()``) is divided by n, by moving the parameters back toward where they were before it."""

    def __init__(self, model: nn.Module, make_replica: Callable[[], nn.Module], *, in_flight: int,
                 apply: Callable[[], None], on_end: Callable[[nn.Module, nn.Module], None] | None = None,
                 predict: bool = True, warmup: int | None = None, shorten: bool = True):
        if in_flight < 2:
            raise ValueError(f"in_flight must be at least 2 (1: one step after the other), got {in_flight}")
        warmup = WARMUP_STEPS if warmup is None else warmup
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.model, self.in_flight, self._apply, self._on_end = model, in_flight, apply, on_end
        self._params = list(model.parameters())
        self.predict, self.warmup, self.shorten = predict, warmup, shorten
        self._last_update: list[torch.Tensor | None] = [None] * len(self._params)
        self._buffers = list(model.buffers())
        self._free: collections.deque[nn.Module] = collections.deque()
        for _ in range(in_flight):
            replica = make_replica()
            if [p.shape for p in replica.parameters()] != [p.shape for p in self._params]:
                raise ValueError("make_replica() built a model whose parameters differ from the master's")
            self._free.append(replica)
        # (replica, its step, the steps in flight when it started: updates its gradient misses)
        self._pending: collections.deque[tuple[nn.Module, concurrent.futures.Future, int]]
        self._pending = collections.deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix="dmoe-step")
        self.num_started = self.num_ended = 0

    @property
    def num_in_flight(self) -> int:
        return len(self._pending)

    def submit(self, compute: Callable[[nn.Module], T]) -> list[T]:
        ended = []
        limit = 1 if self.num_started < self.warmup else self.in_flight  # one at a time while warming up
        while len(self._pending) >= limit:
            ended.append(self._end_oldest())
        replica = self._free.popleft()
        ahead = len(self._pending) if self.predict else 0  # updates that will land before this one
        with torch.no_grad():  # the master's parameters now, with every update ended so far
            for mine, master, delta in zip(replica.parameters(), self._params, self._last_update):
                mine.copy_(master)
                if ahead and delta is not None:  # ... and those still in flight, guessed
                    mine.add_(delta, alpha=ahead)
            for mine, master in zip(replica.buffers(), self._buffers):
                mine.copy_(master)
        replica.zero_grad(set_to_none=True)
        self._pending.append((replica, self._pool.submit(compute, replica), len(self._pending)))
        self.num_started += 1
        return ended

    def drain(self) -> list[T]:
        ended = []
        while self._pending:
            ended.append(self._end_oldest())
        return ended

    def _end_oldest(self) -> T:
        replica, future, late = self._pending.popleft()  # late: by that many updates
        try:
            result = future.result()
        except BaseException:
            replica.zero_grad(set_to_none=True)
            self._free.append(replica)
            raise
        for master, mine in zip(self._params, replica.parameters()):
            master.grad = mine.grad  # the replica's tensor: its own next step starts with zero_grad
        scale = 1 / late if late and self.shorten else 1.0
        before = [p.detach().clone() for p in self._params] if self.predict or scale != 1 else None
        try:
            self._apply()
            if before is not None:
                with torch.no_grad():
                    self._last_update = [p.detach() - b for p, b in zip(self._params, before)]
                    if scale != 1:  # a late step's update, shortened (as by a smaller learning rate)
                        for p, b, update in zip(self._params, before, self._last_update):
                            update.mul_(scale)
                            p.copy_(b + update)
            if self._on_end is not None:
                self._on_end(self.model, replica)
        finally:
            for master in self._params:
                master.grad = None
            replica.zero_grad(set_to_none=True)
            self._free.append(replica)
        self.num_ended += 1
        return result

    def close(self) -> None:
        """Wait for the steps in flight (their results and errors are dropped) and stop the threads."""
        self._pool.shutdown(wait=True)
        self._pending.clear()
