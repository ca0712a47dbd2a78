"""EndpointHealth and the misbehaviour verdict: which endpoints and experts a client avoids, and why.

Every expert call ends in one report: a success, an ordinary failure, or misbehaviour.

- **Back-off.** An endpoint whose call failed in an ordinary way (a missed deadline, a lost
  connection, load shedding, an error status a working node may give) is avoided for a capped,
  exponentially growing time: ``ban_base`` x 2^(failures-1), at most ``ban_max``; then it is tried
  again, and one success clears its record. Failures reported while it is already avoided (the other
  calls of one step, in flight when it failed) do not lengthen the ban: a node that fails once per
  try is avoided 1, 2, 4 ... seconds, not longer for having been asked many experts at once.
  Past 10,000 endpoints remembered, those whose ban is over are forgotten (records can name any
  number of endpoints over time); so are ended quarantines.
- **Quarantine.** A failure that only a broken or hostile peer causes (:func:`is_misbehaviour`) puts
  that expert at that endpoint, alone, in quarantine for ``quarantine_time``, at once: a peer that
  lies is not retried in seconds, and the endpoint's other experts stay in use. A node that says it
  does not host the uid its record names (NOT_FOUND) is quarantined for ``ban_max`` only: its record
  may merely be stale (a node restarted with other experts on the same address).
- **What counts as misbehaviour**: a reply that is malformed, mis-shaped, non-finite or absurdly
  large (``ValueError``, :class:`dmoe.errors.WireError`); NOT_FOUND, UNIMPLEMENTED or DATA_LOSS for
  a uid the node announced; and a :class:`Disagreement`, the node refusing as malformed
  (INVALID_ARGUMENT) inputs that other nodes accepted in the same step (:func:`judge_refusals`).
  An INVALID_ARGUMENT that every node gave is an ordinary failure (the request may be this
  client's fault), as is OUT_OF_RANGE (this client's values above a node's bounds).
- **This client's own fault** (:class:`LocalInputError`: its inputs or gradients not finite, or no
  key for a private node) is no peer's failure and changes nothing here.

The Swarm holds one EndpointHealth, leaves avoided endpoints and experts out of its lookups, and
passes on the reports of its Dispatchers' calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from dmoe.core.logsafe import printable

logger = logging.getLogger(__name__)

# statuses a node that works as it says never answers to a request for a uid it announced
_MISBEHAVIOUR_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
                                 grpc.StatusCode.DATA_LOSS})
# past this many entries (of back-off, or of quarantine), the ones whose time is up are forgotten: records
# can name ever more endpoints (a hostile peer rotating them on purpose), and nothing else would drop them
_MAX_ENTRIES = 10_000


class Late(Exception):
    """The call was still running at the forward's deadline."""


class LocalInputError(ValueError):
    """This client's own inputs or gradients are not finite (or it lacks the key a node needs):
    nothing was sent."""


class Disagreement(Exception):
    """A node refused as malformed (INVALID_ARGUMENT) a request that other nodes accepted in the
    same step: it does not take the schema its record claims."""


def is_misbehaviour(error: BaseException) -> bool:
    """True for what only a broken or hostile peer does: a malformed, mis-shaped, non-finite or
    absurd reply (ValueError, WireError); NOT_FOUND for a uid it announced; or a Disagreement.
    Deadlines, lost connections, load shedding, OUT_OF_RANGE (this client's values above the node's
    bounds) and an INVALID_ARGUMENT that every node gave (this client's request, then) are ordinary."""
    if isinstance(error, LocalInputError):
        return False
    if isinstance(error, Disagreement):
        return True
    code = status_code(error)
    if code is not None:
        return code in _MISBEHAVIOUR_CODES
    return isinstance(error, ValueError)


def is_refusal(error: BaseException) -> bool:
    """An INVALID_ARGUMENT status: judged only once the step's other calls are in (judge_refusals)."""
    return status_code(error) == grpc.StatusCode.INVALID_ARGUMENT


def judge_refusals(refused: list[tuple[Any, BaseException]], others_accepted: bool,
                   on_result: Callable[[Any, BaseException | None], None]) -> None:
    """Report the INVALID_ARGUMENT refusals of one step: a disagreement with the nodes that accepted
    the same inputs, or, if none did, an ordinary failure (the request may be this client's fault)."""
    for call, error in refused:
        if others_accepted:
            error = Disagreement(f"refused what other nodes accepted: {error}")
        on_result(call, error)


def describe(error: BaseException | str) -> str:
    """One line for a log: a gRPC status with its details, or the exception's type and message."""
    if isinstance(error, str):
        return error
    details = getattr(error, "details", None)
    if callable(details):  # a grpc.RpcError
        return f"{error.code().name}: {details()}"
    return f"{type(error).__name__}: {error}"


def status_code(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if isinstance(error, grpc.RpcError) and callable(code) else None


class EndpointHealth:
    """The back-off of failing endpoints and the quarantine of misbehaving (endpoint, uid) pairs.

    Thread-safe: reports come from the swarm's event loop, questions from the caller's thread.
    Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, *, ban_base: float, ban_max: float, quarantine_time: float):
        if not 0 < ban_base <= ban_max or quarantine_time < 0:
            raise ValueError("need 0 < ban_base <= ban_max and quarantine_time >= 0")
        self.ban_base, self.ban_max, self.quarantine_time = ban_base, ban_max, quarantine_time
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}  # endpoint -> (failures, banned until)
        self._quarantine: dict[tuple[str, str], float] = {}  # (endpoint, uid) -> avoided until
        # sizes past which the entries whose time is up are forgotten (then twice what is left, so that
        # a table full of live entries is not scanned on every report)
        self._prune_failures_at = self._prune_quarantine_at = _MAX_ENTRIES

    # ---- reports ---------------------------------------------------------------------------------
    def report(self, endpoint: str, uid: str, error: BaseException | None) -> None:
        """What became of one call of ``uid`` at ``endpoint``: None for success, else the error."""
        if error is None:
            self.report_success(endpoint)
        elif isinstance(error, LocalInputError):  # this client's own fault is no peer's failure
            return
        elif is_misbehaviour(error):
            not_found = status_code(error) == grpc.StatusCode.NOT_FOUND
            self.quarantine(endpoint, uid, error, self.ban_max if not_found else None)
        else:
            self.report_failure(endpoint)

    def report_failure(self, endpoint: str) -> None:
        """An ordinary failure: avoid the endpoint for ban_base x 2^(failures-1) seconds, at most
        ban_max, unless it is avoided already."""
        now = time.monotonic()
        with self._lock:
            failures, until = self._failures.get(endpoint, (0, 0.0))
            if now < until:  # the other calls of the same outage (in flight when it began): no longer ban
                return
            failures += 1
            ban = min(self.ban_max, self.ban_base * 2 ** (failures - 1))
            self._failures[endpoint] = (failures, now + ban)
            if len(self._failures) > self._prune_failures_at:  # forget the back-offs that are over
                self._failures = {e: entry for e, entry in self._failures.items() if entry[1] > now}
                self._prune_failures_at = max(_MAX_ENTRIES, 2 * len(self._failures))
        logger.info("avoiding %s for %.1fs after %d failure(s)", printable(endpoint), ban, failures)

    def report_success(self, endpoint: str) -> None:
        """The endpoint answered: its failures are forgotten (a quarantine stays)."""
        with self._lock:
            self._failures.pop(endpoint, None)

    def quarantine(self, endpoint: str, uid: str, why: BaseException | str,
                   seconds: float | None = None) -> None:
        """Avoid ``uid`` at ``endpoint`` for ``seconds`` (default: quarantine_time)."""
        seconds = self.quarantine_time if seconds is None else seconds
        with self._lock:
            now = time.monotonic()
            self._quarantine[(endpoint, uid)] = now + seconds
            if len(self._quarantine) > self._prune_quarantine_at:
                self._quarantine = {k: t for k, t in self._quarantine.items() if t > now}
                self._prune_quarantine_at = max(_MAX_ENTRIES, 2 * len(self._quarantine))
        logger.warning("%s at %s misbehaved (%s); avoiding it for %.0fs", printable(uid), printable(endpoint),
                       printable(describe(why)), seconds)

    # ---- questions -------------------------------------------------------------------------------
    def is_avoided(self, endpoint: str, uid: str, now: float | None = None) -> bool:
        """Whether a call of ``uid`` at ``endpoint`` should not be made now: the endpoint is backed
        off, or that expert there is quarantined."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._failures.get(endpoint)
            if entry is not None and now < entry[1]:
                return True
            return now < self._quarantine.get((endpoint, uid), 0.0)

    def avoided_at(self, now: float) -> tuple[set[str], set[tuple[str, str]]]:
        """What :meth:`is_avoided` says of every pair at monotonic time ``now``, in one look: the
        endpoints backed off, and the (endpoint, uid) pairs quarantined (lookups of thousands of experts)."""
        with self._lock:
            return ({endpoint for endpoint, (_, until) in self._failures.items() if now < until},
                    {pair for pair, until in self._quarantine.items() if now < until})

    def quarantined(self, endpoint: str, uid: str) -> bool:
        """Whether ``uid`` at ``endpoint`` is in quarantine now."""
        with self._lock:
            return time.monotonic() < self._quarantine.get((endpoint, uid), 0.0)

    def failures(self, endpoint: str) -> int:
        """Failures of the endpoint since its last success (0 when none)."""
        with self._lock:
            return self._failures.get(endpoint, (0, 0.0))[0]

    def banned_until(self, endpoint: str) -> float:
        """When the endpoint's back-off ends (0.0 when it has none)."""
        with self._lock:
            return self._failures.get(endpoint, (0, 0.0))[1]
