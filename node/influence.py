"""InfluenceLimits: how far one peer may move an expert: its optimizer steps per minute, and its share
of the expert's recent steps.

Gradient clipping bounds a gradient, not a step: Adam divides each step by the gradients' running
scale, so every step moves every weight by about the learning rate whatever the gradient's size, and
thousands of tiny Backward calls of one sign add up. What bounds one peer's pull on an expert is the
number of steps it causes. Per expert and per peer (the key :meth:`CallGuard.admit` returns), two
bounds, both counted in steps:

- **a budget** of ``steps_per_minute``: a token bucket refilled at that rate, holding up to
  ``BURST_SECONDS`` of it. It is what bounds a peer that trains an expert alone;
- **a share cap** ``max_share``: while other peers' steps on the expert in the last minute add up to
  at least one, a peer's own steps in that minute may not exceed ``max_share`` of all of them. The
  cap never holds a peer below ``max_share`` of the budget, so a stray call, or a hostile trickle,
  can at most cut a lone trainer's steps to that (half, by default). "The last minute" is a sum that
  decays with a time constant of ``WINDOW_SECONDS``.

Both are sized so that honest training never meets them: the node's default budget, 3000 steps a
minute (50 a second, bursts of 500), is above what one trainer process causes on a small expert over
loopback (a step every ~45 ms), with room for several trainers behind one address (a host, a NAT, an
IPv6 /64); the cap's floor, half of it (25 a second), lets trainers at unequal rates (say 15 and 5
steps a second) keep every update.

A step is a batch, which may hold several peers' Backward calls: each peer in it is charged its share
of the batch's tokens. A peer over its budget or its share still gets its input gradients, so its own
backpropagation stays exact, but its rows are taken out of the step's parameter gradients
(:meth:`dmoe.node.backend.ExpertBackend.backward`): over the limit, the expert learns from a
subsample of its calls (the bucket lets one through as often as it refills), never from all of them.
Skipped updates are counted per expert (:meth:`skipped`, the ``skipped_updates`` of the node's
``Info``) and logged at WARNING, at most once a minute per peer and expert.

The tables are bounded (least recently seen peers forgotten first); a forgotten peer starts again
with a full bucket, as a new one does. Called from the runtime thread; :meth:`stats` from any.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0  # time constant of the decaying sums the share cap compares
BURST_SECONDS = 10.0  # the budget's bucket holds this many seconds of steps
MIN_OTHER_STEPS = 1.0  # the share cap applies while other peers' recent steps add up to this
MAX_PEERS = 10_000  # peers remembered per expert
LOG_EVERY_S = 60.0  # a peer's skipped updates are logged at most this often


@dataclasses.dataclass(slots=True)
class PeerSteps:
    """One peer's account on one expert. ``steps`` and ``skipped`` count since the node started."""

    bucket: float  # steps the budget still allows (may dip below 0 by at most one step)
    recent: float = 0.0  # steps in the last minute, decayed to ``updated``
    updated: float = 0.0  # when bucket and recent were last brought up to date
    steps: float = 0.0  # steps charged, in all (fractions of shared batches)
    skipped: int = 0  # Backward calls whose update was skipped
    logged_at: float = -math.inf


@dataclasses.dataclass(slots=True)
class _Expert:
    peers: collections.OrderedDict[str, PeerSteps] = dataclasses.field(
        default_factory=collections.OrderedDict)
    recent: float = 0.0  # every peer's recent steps together, decayed to ``updated``
    updated: float = 0.0
    skipped: int = 0  # Backward calls whose update was skipped, every peer's (forgotten ones' too)


class InfluenceLimits:
    """Per expert and peer: may this peer's Backward update the expert now (:meth:`allowed`), and the
    account of the steps that did (:meth:`charge`) or did not (:meth:`skip`)."""

    def __init__(self, *, steps_per_minute: float, max_share: float,
                 clock: Callable[[], float] = time.monotonic):
        """``steps_per_minute`` 0: no budget; ``max_share`` 1: no cap."""
        if steps_per_minute < 0 or not 0 < max_share <= 1:
            raise ValueError(f"steps_per_minute must be >= 0 and max_share in (0, 1], got "
                             f"{steps_per_minute}, {max_share}")
        self.steps_per_minute, self.max_share, self.clock = steps_per_minute, max_share, clock
        self.burst = max(1.0, steps_per_minute * BURST_SECONDS / 60.0)
        self._experts: dict[str, _Expert] = {}
        self._lock = threading.Lock()

    def allowed(self, uid: str, peers: Sequence[str]) -> list[bool]:
        """For each peer (one per task of a batch, repeats allowed): may its rows update ``uid`` now?"""
        if self.steps_per_minute == 0 and self.max_share == 1:
            return [True] * len(peers)
        now = self.clock()
        with self._lock:
            expert = self._expert(uid, now)
            verdict: dict[str, bool] = {}
            for peer in peers:
                if peer not in verdict:
                    verdict[peer] = self._why_not(expert, self._peer(expert, peer, now), now) is None
            return [verdict[peer] for peer in peers]

    def charge(self, uid: str, tokens_by_peer: Mapping[str, int]) -> None:
        """One optimizer step of ``uid`` was taken with these peers' rows: each pays its share of
        the tokens."""
        total = sum(tokens_by_peer.values())
        if total <= 0:
            return
        now = self.clock()
        with self._lock:
            expert = self._expert(uid, now)
            expert.recent += 1.0
            for peer, tokens in tokens_by_peer.items():
                account = self._peer(expert, peer, now)
                share = tokens / total
                account.bucket -= share
                account.recent += share
                account.steps += share

    def skip(self, uid: str, peer: str) -> None:
        """One Backward call of ``peer`` was served without updating ``uid``; logged now and then."""
        now = self.clock()
        with self._lock:
            expert = self._expert(uid, now)
            account = self._peer(expert, peer, now)
            account.skipped += 1
            expert.skipped += 1
            if now - account.logged_at >= LOG_EVERY_S:
                account.logged_at = now
                why = self._why_not(expert, account, now) or "over its limits"
                logger.warning("%s: updates from peer %r are skipped (%d so far): %s; its calls are still "
                               "answered", uid, peer, account.skipped, why)

    def skipped(self, uid: str) -> int:
        """Backward calls on ``uid`` served without updating it, since the node started."""
        with self._lock:
            expert = self._experts.get(uid)
            return 0 if expert is None else expert.skipped

    def stats(self, uid: str) -> dict[str, PeerSteps]:
        """A copy of every remembered peer's account on ``uid``."""
        with self._lock:
            expert = self._experts.get(uid)
            return {} if expert is None else {p: dataclasses.replace(a) for p, a in expert.peers.items()}

    # ---- internals (lock held) ------------------------------------------------------------------
    def _why_not(self, expert: _Expert, account: PeerSteps, now: float) -> str | None:
        if self.steps_per_minute > 0 and account.bucket <= 0:
            return f"over peer_steps_per_minute={self.steps_per_minute:g}"
        others = expert.recent - account.recent
        if self.max_share < 1 and others >= MIN_OTHER_STEPS:
            allowance = max(self.max_share * self.steps_per_minute,
                            self.max_share / (1 - self.max_share) * others)
            if account.recent >= allowance:
                return (f"over max_peer_step_share={self.max_share:g} of the expert's steps in the last "
                        f"minute ({account.recent:.0f} of {expert.recent:.0f})")
        return None

    def _expert(self, uid: str, now: float) -> _Expert:
        expert = self._experts.get(uid)
        if expert is None:
            expert = self._experts[uid] = _Expert(updated=now)
        expert.recent *= _decay(now - expert.updated)
        expert.updated = now
        return expert

    def _peer(self, expert: _Expert, peer: str, now: float) -> PeerSteps:
        """The peer's account, brought up to ``now`` (bucket refilled, recent steps decayed)."""
        account = expert.peers.get(peer)
        if account is None:
            account = expert.peers[peer] = PeerSteps(bucket=self.burst, updated=now)
            if len(expert.peers) > MAX_PEERS:
                self._forget_one(expert, now)
        else:
            expert.peers.move_to_end(peer)
            elapsed = now - account.updated
            account.bucket = min(self.burst, account.bucket + elapsed * self.steps_per_minute / 60.0)
            account.recent *= _decay(elapsed)
            account.updated = now
        return account

    def _forget_one(self, expert: _Expert, now: float) -> None:
        peer, account = next(iter(expert.peers.items()))  # the least recently seen
        del expert.peers[peer]
        expert.recent = max(0.0, expert.recent - account.recent * _decay(now - account.updated))


def _decay(elapsed: float) -> float:
    return math.exp(-max(0.0, elapsed) / WINDOW_SECONDS)
