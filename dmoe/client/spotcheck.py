"""SpotChecker: a client's spot checks of an expert's replicas against each other.

A member of a swarm (it holds the key) can host a replica of an expert and answer outputs that are
finite, of the right shape, within ``max_reply_abs``, and wrong. The reply checks cannot see that;
another replica of the same expert can. With probability ``spot_check_rate``, an answer a forward
used is checked:

1. a few of its tokens (``spot_check_tokens``, drawn at random from the answered rows) are sent to a
   second replica of the same expert, drawn at random among those the step could call (not backed off
   or quarantined), and the two outputs for those tokens are compared;
2. they agree when their :func:`distance` is at most ``spot_check_tolerance``: honest replicas are not
   identical (each learns from its own clients between averaging rounds), so the tolerance is sized
   from how far they drift apart (``benchmarks/bench_spotcheck.py --drift``);
3. a disagreement is settled by a third replica, asked the same tokens: the one of the two that the
   third disagrees with, while it agrees with the other, is quarantined (``quarantine_time``). If no
   third replica is available or it does not answer, or it agrees with both or with neither, no one
   is quarantined (never on a coin toss): the disagreement is logged and counted, and the next
   ``SUSPECT_CHECKS`` answers of that expert are all checked (a spell of suspicion). Disagreements
   during a spell do not lengthen it, and after it the expert rests: for ``SUSPECT_CHECKS`` x 2^s of
   its answers after its s-th spell (at most ``SUSPECT_REST_MAX``), a disagreement starts no new
   spell. Two replicas that nothing can settle (an expert with only two, whose honest drift exceeds
   the tolerance, say) then add checks to a bounded share of that expert's answers, about
   ``SUSPECT_CHECKS / (SUSPECT_CHECKS + SUSPECT_REST_MAX)`` in the long run, not to all of them.

A check never delays or fails a step: it starts once the answer it checks is in, runs on the
swarm's event loop beside the rest of the step, and the forward returns without waiting for it. The
second replica's call ends by the forward's deadline, or ``MIN_CHECK_SECONDS`` after the check
started if that is later (but within the forward's timeout): an answer that came just before the
deadline still gets a check that can finish. A third's, asked after a disagreement, has the forward's
timeout from then (nothing waits for either). A check call that times out blames nobody (its time
is the check's own, shorter than a step's); one that fails otherwise is reported like any call
(back-off, or quarantine for a malformed reply); neither settles anything. The answer a check
convicts has been used by the step that made it: the lie costs that step those tokens' expert
output; the convicted replica is not called again, and a backward for it that has not been sent yet
is not sent (:mod:`dmoe.moe.remote`). The checks still in flight when the client closes are
cancelled first (:meth:`SpotChecker.stop`, from :meth:`dmoe.client.dispatch.Dispatcher.close`).

What it cannot catch: a lie smaller than the tolerance (it is then no larger than honest replicas
differ), an expert with a single replica, two replicas of three lying alike, and a liar that answers
honestly to the few-token calls a check sends while it lies to the larger calls of a step, when it is
the replica checked against (when its own answer is checked, it cannot tell: the check goes to
another node).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence

import torch

from dmoe.core.logsafe import printable
from dmoe.core.records import ExpertRecord

logger = logging.getLogger(__name__)

SUSPECT_CHECKS = 20  # answers of an expert checked in a row after a disagreement that nothing settled
SUSPECT_REST_MAX = 32 * SUSPECT_CHECKS  # the longest rest (in answers) between two such spells
MIN_CHECK_SECONDS = 1.0  # the least time a second replica's check call gets (if the forward's timeout allows)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far apart two replicas' outputs for the same tokens are: ``|a - b| / sqrt(|a| |b|)``
    (Frobenius norms over the checked tokens). Symmetric; 0 for equal outputs, about 1.4 for unrelated
    ones of equal norm, 2 for a sign flip, ``(s - 1) / sqrt(s)`` for one s times the other, and
    infinite when one is zero and the other is not."""
    gap = float((a.double() - b.double()).norm())
    if gap == 0.0:
        return 0.0
    scale = math.sqrt(float(a.double().norm()) * float(b.double().norm()))
    return gap / scale if scale > 0 else math.inf


@dataclasses.dataclass(slots=True)
class SpotCheckStats:
    """What a SpotChecker did. ``checks``: answers compared with a second replica; ``agreed``,
    ``disagreed`` (their outcomes); ``convicted``: replicas quarantined; ``unsettled``: disagreements
    that convicted no one; ``failed``: checks whose second (or third) replica gave no usable answer;
    ``tokens``: rows sent by check calls; ``bytes``: their inputs and outputs (float bytes);
    ``largest_agreed``: the largest distance between two replicas that agreed (how far honest ones
    drift, as this client sees them)."""
    checks: int = 0
    agreed: int = 0
    disagreed: int = 0
    convicted: int = 0
    unsettled: int = 0
    failed: int = 0
    tokens: int = 0
    bytes: int = 0
    largest_agreed: float = 0.0


@dataclasses.dataclass(slots=True)
class _Suspicion:
    """An expert's spells of suspicion: answers still to check in this spell, answers of rest still
    to go after it (no new spell starts before they are over), and spells so far."""
    checks_left: int = 0
    rest_left: int = 0
    spells: int = 0


CallFn = Callable[[ExpertRecord, torch.Tensor, torch.Tensor, float], Awaitable[torch.Tensor]]


class SpotChecker:
    """Spot checks of one client's answers (see the module docstring). ``quarantine(endpoint, uid, why)``
    puts a convicted replica in quarantine (the Swarm's). Lives on the swarm's event loop: the
    dispatcher calls :meth:`wants` and :meth:`start` from its forward; ``stats`` may be read from any
    thread."""

    def __init__(self, *, rate: float, tolerance: float, tokens: int,
                 quarantine: Callable[[str, str, str], None], seed: int | None = None):
        if not 0 <= rate <= 1 or tolerance <= 0 or tokens < 1:
            raise ValueError("need 0 <= rate <= 1, tolerance > 0 and tokens >= 1")
        self.rate, self.tolerance, self.tokens = rate, tolerance, tokens
        self.quarantine = quarantine
        self.stats = SpotCheckStats()
        self._rng = random.Random(seed)
        self._suspects: dict[str, _Suspicion] = {}  # uid -> its spells of suspicion (unsettled disagreements)
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_config(cls, config, quarantine: Callable[[str, str, str], None]) -> SpotChecker:
        """The checker a :class:`dmoe.client.config.SwarmConfig` describes."""
        return cls(rate=config.spot_check_rate, tolerance=config.spot_check_tolerance,
                   tokens=config.spot_check_tokens, quarantine=quarantine)

    @property
    def running(self) -> int:
        """Checks still in flight."""
        return len(self._tasks)

    def wants(self, uid: str) -> bool:
        """Whether to check this answer of ``uid`` (a draw at ``rate``; always during a spell of
        suspicion). Each call is one answer of ``uid`` that could be checked: it also counts down the
        spell, or the rest after it."""
        suspicion = self._suspects.get(uid)
        if suspicion is not None:
            if suspicion.checks_left > 0:
                suspicion.checks_left -= 1
                if suspicion.checks_left == 0:  # the spell is over: rest, twice as long as the last time
                    suspicion.rest_left = min(SUSPECT_REST_MAX, SUSPECT_CHECKS << min(suspicion.spells, 30))
                return True
            if suspicion.rest_left > 0:
                suspicion.rest_left -= 1
        return self.rate > 0 and self._rng.random() < self.rate

    def start(self, uid: str, answered_by: str, output: torch.Tensor, inputs: torch.Tensor,
              token_ids: torch.Tensor, others: Sequence[ExpertRecord], *, deadline: float, timeout: float,
              call: CallFn, clock: Callable[[], float]) -> bool:
        """Check the answer ``output`` of the replica at ``answered_by`` for ``inputs`` against
        ``others`` (replicas of ``uid`` the step could call), in a task of the running loop; False if
        there is no other replica. ``call(record, inputs, token_ids, timeout)`` makes one forward call
        (and reports its fate); ``deadline`` is the forward's, on the clock ``clock``, and ``timeout``
        its length (a third replica's time)."""
        others = [r for r in others if r.dial_endpoint and r.dial_endpoint != answered_by]
        if not others:
            return False
        count = min(self.tokens, int(inputs.shape[0]))
        rows = torch.tensor(sorted(self._rng.sample(range(int(inputs.shape[0])), count)), dtype=torch.long)
        order = list(others)
        self._rng.shuffle(order)
        task = asyncio.get_running_loop().create_task(self._check(
            uid, answered_by, output[rows], inputs[rows], token_ids[rows], order, deadline, timeout, call,
            clock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def cancel(self) -> None:
        """Cancel the checks still in flight (on the loop)."""
        for task in list(self._tasks):
            task.cancel()

    async def join(self) -> None:
        """Wait until the checks in flight (and any they start meanwhile) have ended (on the loop)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def stop(self) -> None:
        """Cancel the checks still in flight and wait until they have ended (on the loop): before the
        channels their calls use are closed."""
        tasks = list(self._tasks)
        self.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, record: ExpertRecord, inputs: torch.Tensor, token_ids: torch.Tensor,
                   timeout: float, call: CallFn) -> torch.Tensor | None:
        if timeout <= 0:
            return None
        self.stats.tokens += int(inputs.shape[0])
        self.stats.bytes += 2 * inputs.numel() * inputs.element_size()
        try:
            return await call(record, inputs, token_ids, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported by call(); a check that gets no answer settles nothing
            logger.debug("spot check of %s at %s got no answer: %s: %s", printable(record.uid),
                         printable(record.dial_endpoint), type(e).__name__, printable(e))
            return None

    async def _check(self, uid: str, first: str, first_out: torch.Tensor, inputs: torch.Tensor,
                     token_ids: torch.Tensor, others: list[ExpertRecord], deadline: float, timeout: float,
                     call: CallFn, clock: Callable[[], float]) -> None:
        second = others[0]
        second_out = await self._ask(second, inputs, token_ids,
                                     max(deadline - clock(), min(timeout, MIN_CHECK_SECONDS)), call)
        if second_out is None:
            self.stats.failed += 1
            return
        self.stats.checks += 1
        apart = distance(first_out, second_out)
        if apart <= self.tolerance:
            self.stats.agreed += 1
            self.stats.largest_agreed = max(self.stats.largest_agreed, apart)
            return
        self.stats.disagreed += 1
        names = (first, second.dial_endpoint)
        if len(others) < 2:
            self._unsettled(uid, names, f"{apart:.3g} apart and no third replica to settle it")
            return
        third = others[1]
        third_out = await self._ask(third, inputs, token_ids, timeout, call)
        if third_out is None:
            self.stats.failed += 1
            self._unsettled(uid, names, f"{apart:.3g} apart and the third replica, at "
                                        f"{third.dial_endpoint}, did not answer")
            return
        to_first, to_second = distance(first_out, third_out), distance(second_out, third_out)
        agrees = (to_first <= self.tolerance, to_second <= self.tolerance)
        if agrees[0] == agrees[1]:
            self._unsettled(uid, names, f"{apart:.3g} apart; the third replica, at {third.dial_endpoint}, is "
                                        f"{to_first:.3g} and {to_second:.3g} away")
            return
        liar, honest, off = (names[1], names[0], to_second) if agrees[0] else (names[0], names[1], to_first)
        self.stats.convicted += 1
        self.quarantine(liar, uid, f"spot check: its output for {int(inputs.shape[0])} tokens was {off:.3g} "
                                   f"from the replica at {third.dial_endpoint} and {apart:.3g} from the one "
                                   f"at {honest}, which agree (tolerance {self.tolerance:g})")

    def _unsettled(self, uid: str, endpoints: tuple[str, str], why: str) -> None:
        self.stats.unsettled += 1
        suspicion = self._suspects.setdefault(uid, _Suspicion())
        if suspicion.checks_left > 0 or suspicion.rest_left > 0:  # in a spell, or resting after one
            logger.debug("spot check of %s: the replicas at %s and %s disagree (%s; tolerance %g); nobody "
                         "quarantined, %s", printable(uid), printable(endpoints[0]), printable(endpoints[1]),
                         printable(why), self.tolerance,
                         "already suspect" if suspicion.checks_left else "resting from its last spell")
            return
        suspicion.spells += 1
        suspicion.checks_left = SUSPECT_CHECKS
        logger.warning("spot check of %s: the replicas at %s and %s disagree (%s; tolerance %g); nobody "
                       "quarantined, its next %d answers checked", printable(uid), printable(endpoints[0]),
                       printable(endpoints[1]), printable(why), self.tolerance, SUSPECT_CHECKS)
