"""ReplicaBalancer: which replica of an expert a call goes to, and how a big sub-batch is shared.

A uid may be hosted by several nodes (replicas, :func:`dmoe.core.records.find_experts`). As SWARM's
balancer does, each call goes to the replica expected to finish it first:

    expected seconds = (tokens queued there + tokens this client has in flight there + tokens of the
                        call) x seconds per token of that replica

- seconds per token: a moving average (weight ``alpha`` for the newest) of measured call time /
  tokens, per (endpoint, uid), and per endpoint (the node's speed over all its experts).
- the queue: ``ExpertRecord.queued_tokens`` as the node announced it (as of its last heartbeat),
  plus what this client has sent there and not yet heard back about (the announced number is late).
- an unmeasured replica gets a prior: its endpoint's average if the endpoint is known (the node's
  speed is no news), else half the best measured speed among the replicas compared (optimistic, so
  a new replica is tried soon), else ``prior_seconds_per_token`` (all unmeasured: a fair draw).
- ties are broken at random.

A sub-batch of more than ``spread_tokens`` tokens (or more than the best replica takes in one
request, its ``max_batch_tokens``) is split over several replicas so that all are expected to finish
together (each takes tokens in proportion to its speed, less its queue); parts smaller than
``min_part_tokens`` are not worth a call and go to the others.

The measurements are bounded (``max_entries`` per table, the least recently measured forgotten
first), so records that rotate endpoints cannot grow them without end.

Back-off and quarantine are not this module's: the caller passes only replicas it may call
(:mod:`dmoe.client.health`). Thread-safe: the dispatcher reports from the swarm's event loop.
"""

from __future__ import annotations

import collections
import math
import random
import threading
from collections.abc import Sequence

from dmoe.core.records import ExpertRecord

DEFAULT_PRIOR = 1e-5  # seconds per token of a replica when nothing at all is measured
DEFAULT_MAX_TOKENS = 4096  # a node's default max_batch_tokens, for records that do not announce theirs
MAX_ENTRIES = 100_000  # measurements kept per table: (endpoint, uid) pairs, endpoints


class ReplicaBalancer:
    def __init__(self, *, alpha: float = 0.3, prior_seconds_per_token: float = DEFAULT_PRIOR,
                 spread_tokens: int = 1024, min_part_tokens: int = 64, seed: int | None = None,
                 max_entries: int = MAX_ENTRIES):
        if not 0 < alpha <= 1 or prior_seconds_per_token <= 0 or spread_tokens < 1 or min_part_tokens < 1:
            raise ValueError("need 0 < alpha <= 1, prior_seconds_per_token > 0, spread_tokens >= 1 and "
                             "min_part_tokens >= 1")
        self.alpha, self.prior = alpha, prior_seconds_per_token
        self.spread_tokens, self.min_part_tokens = spread_tokens, min_part_tokens
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.max_entries = max_entries
        # (endpoint, uid) -> seconds per token; endpoint -> seconds per token over its experts
        self._per_expert: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._per_endpoint: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._in_flight: dict[str, int] = {}  # endpoint -> tokens sent by this client, not yet answered

    # ---- measurements ----------------------------------------------------------------------------
    def observe(self, endpoint: str, uid: str, tokens: int, seconds: float) -> None:
        """A call of ``tokens`` tokens of ``uid`` at ``endpoint`` took ``seconds`` (or at least that
        long: a call cut off late is observed with its time so far)."""
        with self._lock:
            self._observe(endpoint, uid, tokens, seconds)

    def _observe(self, endpoint: str, uid: str, tokens: int, seconds: float) -> None:
        """:meth:`observe`, the lock held."""
        if tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        measured = seconds / tokens
        for table, key in ((self._per_expert, (endpoint, uid)), (self._per_endpoint, endpoint)):
            old = table.pop(key, None)
            table[key] = measured if old is None else (1 - self.alpha) * old + self.alpha * measured
            if len(table) > self.max_entries:
                table.popitem(last=False)

    def begin(self, endpoint: str, tokens: int) -> None:
        """``tokens`` were just sent to ``endpoint``."""
        with self._lock:
            self._in_flight[endpoint] = self._in_flight.get(endpoint, 0) + tokens

    def end(self, endpoint: str, tokens: int, *, uid: str = "", seconds: float | None = None) -> None:
        """The call of ``tokens`` to ``endpoint`` ended (answered, failed or cancelled); with ``seconds``,
        it answered for ``uid`` in that time, observed as :meth:`observe` does (in the same look)."""
        with self._lock:
            left = self._in_flight.get(endpoint, 0) - tokens
            if left > 0:
                self._in_flight[endpoint] = left
            else:
                self._in_flight.pop(endpoint, None)
            if seconds is not None:
                self._observe(endpoint, uid, tokens, seconds)

    def measured(self, endpoint: str, uid: str) -> float | None:
        """The moving average of seconds per token of ``uid`` at ``endpoint`` (None: not measured)."""
        with self._lock:
            return self._per_expert.get((endpoint, uid))

    def expected_if_measured(self, endpoint: str, uid: str, record: ExpertRecord,
                             tokens: int) -> float | None:
        """:meth:`expected_seconds` of one replica (``record``, at ``endpoint``) for ``tokens`` tokens if
        ``uid`` is measured there, else None; in one look (a step asks it for each of its calls)."""
        with self._lock:
            measured = self._per_expert.get((endpoint, uid))
            if measured is None:
                return None
            return (max(0, record.queued_tokens) + self._in_flight.get(endpoint, 0) + tokens) * measured

    def in_flight(self, endpoint: str) -> int:
        with self._lock:
            return self._in_flight.get(endpoint, 0)

    # ---- choices ---------------------------------------------------------------------------------
    def seconds_per_token(self, replicas: Sequence[ExpertRecord]) -> list[float]:
        """Each replica's measured seconds per token, or its prior (see the module docstring)."""
        with self._lock:
            known = [self._per_expert.get((r.dial_endpoint, r.uid)) for r in replicas]
            measured = [v for v in known if v is not None]
            fallback = 0.5 * min(measured) if measured else self.prior
            return [v if v is not None else self._per_endpoint.get(r.dial_endpoint, fallback)
                    for v, r in zip(known, replicas)]

    def queue(self, record: ExpertRecord) -> int:
        """Tokens ahead of a new call at this replica: announced queue + this client's in flight."""
        return max(0, record.queued_tokens) + self.in_flight(record.dial_endpoint)

    def expected_seconds(self, replicas: Sequence[ExpertRecord], tokens: int) -> list[float]:
        """Expected time for each replica to finish a call of ``tokens`` tokens sent now."""
        speeds = self.seconds_per_token(replicas)
        return [(self.queue(r) + tokens) * s for r, s in zip(replicas, speeds)]

    def rank(self, replicas: Sequence[ExpertRecord], tokens: int) -> list[ExpertRecord]:
        """The replicas, the one expected to finish a call of ``tokens`` first first; ties at random."""
        expected = self.expected_seconds(replicas, tokens)
        with self._lock:
            draws = [self._rng.random() for _ in replicas]
        order = sorted(range(len(replicas)), key=lambda i: (expected[i], draws[i]))
        return [replicas[i] for i in order]

    def plan(self, replicas: Sequence[ExpertRecord], tokens: int) -> list[tuple[ExpertRecord, int]]:
        """How to send a sub-batch of ``tokens`` tokens: (replica, its number of tokens), in the order
        the tokens are cut. One replica (the best) unless the sub-batch is big (see the module
        docstring); then the replicas' shares equalise their expected finish times."""
        if not replicas or tokens <= 0:
            return []
        if len(replicas) == 1:  # nothing to rank or share (most experts of a big grid have one replica)
            return [(replicas[0], tokens)]
        ranked = self.rank(replicas, tokens)
        best_max = ranked[0].max_batch_tokens or DEFAULT_MAX_TOKENS
        if len(ranked) == 1 or (tokens <= self.spread_tokens and tokens <= best_max):
            return [(ranked[0], tokens)]
        shares = self.shares(ranked, tokens)
        return [(r, n) for r, n in zip(ranked, shares) if n > 0]

    def shares(self, replicas: Sequence[ExpertRecord], tokens: int) -> list[int]:
        """Tokens for each replica so that (queue + share) x seconds per token is as equal as can be
        (water-filling: a replica whose queue alone outlasts the others' finish gets none); shares
        below ``min_part_tokens`` go to the others. Sums to ``tokens``."""
        speeds = self.seconds_per_token(replicas)
        queues = [self.queue(r) for r in replicas]
        starts = sorted(range(len(replicas)), key=lambda i: queues[i] * speeds[i])
        used: list[int] = []
        level = 0.0
        for position, i in enumerate(starts):
            used.append(i)
            rate = sum(1 / speeds[j] for j in used)
            level = (tokens + sum(queues[j] for j in used)) / rate  # finish time with these replicas
            nxt = starts[position + 1] if position + 1 < len(starts) else None
            if nxt is None or level <= queues[nxt] * speeds[nxt]:
                break
        exact = [max(0.0, level / speeds[i] - queues[i]) if i in used else 0.0 for i in range(len(replicas))]
        total = sum(exact) or 1.0
        exact = [tokens * e / total for e in exact]
        shares = _rounded(exact, tokens)
        while True:  # fold the smallest part that is too small into the others, until none is
            small = [i for i, n in enumerate(shares) if 0 < n < self.min_part_tokens]
            if not small or sum(n > 0 for n in shares) == 1:
                return shares
            i = min(small, key=lambda j: shares[j])
            moved, shares[i] = shares[i], 0
            rest = [j for j, n in enumerate(shares) if n > 0]
            weights = [exact[j] for j in rest]
            extra = _rounded([moved * w / sum(weights) for w in weights], moved)
            for j, e in zip(rest, extra):
                shares[j] += e


def _rounded(values: list[float], total: int) -> list[int]:
    """Integers summing to ``total``, each the floor of its value or one more (largest remainders)."""
    floors = [int(math.floor(v)) for v in values]
    left = total - sum(floors)
    order = sorted(range(len(values)), key=lambda i: values[i] - floors[i], reverse=True)
    for i in order[:max(0, left)]:
        floors[i] += 1
    return floors
