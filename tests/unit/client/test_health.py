"""Endpoint health: back-off of failing endpoints, quarantine of misbehaving experts, the verdict."""

import logging

import grpc
import pytest

import dmoe.client.health
from dmoe.client.health import (
    Disagreement,
    EndpointHealth,
    Late,
    LocalInputError,
    is_misbehaviour,
    is_refusal,
    judge_refusals,
)
from dmoe.errors import WireError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The health's clock, moved by hand: now[0] is time.monotonic()."""
    now = [100.0]
    monkeypatch.setattr("dmoe.client.health.time.monotonic", lambda: now[0])
    return now


def _status(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_failing_endpoints_back_off_exponentially_and_recover(clock):
    health = EndpointHealth(ban_base=1.0, ban_max=5.0, quarantine_time=600.0)
    bans = []
    for attempt in range(1, 6):
        health.report_failure("h:1")
        health.report_failure("h:1")  # another call of the same outage: the ban is not doubled again
        assert health.failures("h:1") == attempt
        bans.append(health.banned_until("h:1") - clock[0])
        assert health.is_avoided("h:1", "e.0") and not health.is_avoided("h:2", "e.0")
        clock[0] += bans[-1] + 0.01  # tried again after the ban, and failing again
    assert bans == [1.0, 2.0, 4.0, 5.0, 5.0]  # doubling, capped
    assert not health.is_avoided("h:1", "e.0")
    health.report_failure("h:1")
    health.report_success("h:1")
    assert not health.is_avoided("h:1", "e.0") and health.failures("h:1") == 0
    assert health.banned_until("h:1") == 0.0


def test_what_only_a_broken_or_hostile_peer_does_is_misbehaviour():
    for error in (ValueError("reply holds NaN or Inf"), WireError("undecodable"),
                  _status(grpc.StatusCode.NOT_FOUND), Disagreement("refused what others accepted"),
                  _status(grpc.StatusCode.UNIMPLEMENTED), _status(grpc.StatusCode.DATA_LOSS)):
        assert is_misbehaviour(error), error
    for error in (Late("late"), LocalInputError("mine"), OSError("reset"),
                  _status(grpc.StatusCode.UNAVAILABLE), _status(grpc.StatusCode.DEADLINE_EXCEEDED),
                  _status(grpc.StatusCode.RESOURCE_EXHAUSTED), _status(grpc.StatusCode.INTERNAL),
                  _status(grpc.StatusCode.UNAUTHENTICATED), _status(grpc.StatusCode.OUT_OF_RANGE),
                  _status(grpc.StatusCode.INVALID_ARGUMENT)):
        assert not is_misbehaviour(error), error


def test_a_misbehaving_expert_is_quarantined_alone_and_for_long(clock):
    health = EndpointHealth(ban_base=1.0, ban_max=60.0, quarantine_time=300.0)
    health.report("h:1", "e.0", ValueError("reply holds NaN or Inf"))
    assert health.is_avoided("h:1", "e.0") and not health.is_avoided("h:1", "e.1")
    health.report("h:1", "e.1", None)  # a success of another expert there does not lift it
    clock[0] += 299.0
    assert health.quarantined("h:1", "e.0")
    clock[0] += 2.0
    assert not health.quarantined("h:1", "e.0") and not health.is_avoided("h:1", "e.0")
    health.report("h:2", "e.0", Late("late"))  # an ordinary failure: the short back-off of the endpoint
    assert health.is_avoided("h:2", "e.5") and not health.quarantined("h:2", "e.0")
    clock[0] += 1.01
    assert not health.is_avoided("h:2", "e.0")
    health.report("h:3", "e.0", _status(grpc.StatusCode.NOT_FOUND))  # maybe a stale record: ban_max only
    assert health.quarantined("h:3", "e.0")
    clock[0] += 60.01
    assert not health.quarantined("h:3", "e.0")


def test_this_clients_own_fault_changes_nothing(clock):
    health = EndpointHealth(ban_base=1.0, ban_max=60.0, quarantine_time=300.0)
    health.report("h:1", "e.0", LocalInputError("this client's inputs are not finite"))
    assert not health.is_avoided("h:1", "e.0") and health.failures("h:1") == 0


def test_a_refusal_is_a_disagreement_only_when_others_accepted():
    refusal = _status(grpc.StatusCode.INVALID_ARGUMENT)
    assert is_refusal(refusal) and not is_refusal(_status(grpc.StatusCode.NOT_FOUND))
    assert not is_refusal(ValueError("x"))
    reported = []
    judge_refusals([("call a", refusal)], True, lambda call, error: reported.append((call, error)))
    assert reported[0][0] == "call a" and isinstance(reported[0][1], Disagreement)
    assert is_misbehaviour(reported[0][1])
    reported.clear()
    judge_refusals([("call a", refusal), ("call b", refusal)], False,
                   lambda call, error: reported.append((call, error)))
    assert reported == [("call a", refusal), ("call b", refusal)]  # maybe this client's request: ordinary


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        EndpointHealth(ban_base=0.0, ban_max=1.0, quarantine_time=1.0)
    with pytest.raises(ValueError):
        EndpointHealth(ban_base=2.0, ban_max=1.0, quarantine_time=1.0)
    with pytest.raises(ValueError):
        EndpointHealth(ban_base=1.0, ban_max=1.0, quarantine_time=-1.0)


def test_backoffs_of_rotating_endpoints_are_forgotten_once_over(clock, monkeypatch):
    monkeypatch.setattr(dmoe.client.health, "_MAX_ENTRIES", 100)
    health = EndpointHealth(ban_base=1.0, ban_max=60.0, quarantine_time=600.0)
    largest = 0
    for i in range(5000):  # a new endpoint failing every 0.1 s: at most ~10 are banned at any time
        clock[0] += 0.1
        health.report_failure(f"10.0.{i // 256}.{i % 256}:31337")
        health.quarantine(f"10.1.{i // 256}.{i % 256}:1", "ffn.0", "lied", seconds=1.0)
        largest = max(largest, len(health._failures), len(health._quarantine))
    assert largest <= 2 * 100 + 1, largest
    # what is still banned stays banned, and an endpoint's growing back-off still grows
    assert health.is_avoided("10.0.19.135:31337", "ffn.0")  # the last one
    health.report_failure("10.9.9.9:1")
    clock[0] += 1.5
    health.report_failure("10.9.9.9:1")
    assert health.failures("10.9.9.9:1") == 2 and health.banned_until("10.9.9.9:1") == clock[0] + 2.0


def test_a_uid_or_error_with_newlines_and_escapes_is_logged_on_one_escaped_line(caplog):
    health = EndpointHealth(ban_base=1.0, ban_max=60.0, quarantine_time=600.0)
    uid = "ffn.0\n2026-01-01 INFO dmoe: all good\x1b[2J\x1b[31m"
    error = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="no such expert\r\n\x1b]0;owned\x07" + "x" * 5000)
    with caplog.at_level(logging.INFO, logger="dmoe.client.health"):
        health.report("127.0.0.1:1", uid, error)
        health.report_failure("127.0.0.1:2\n\x1b[1A")
    assert health.quarantined("127.0.0.1:1", uid)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    for message in messages:
        assert "\n" not in message and "\r" not in message and "\x1b" not in message and "\x07" not in message
        assert len(message) < 1000  # a remote error message is cut
    assert "ffn.0\\n2026-01-01 INFO dmoe: all good\\x1b[2J\\x1b[31m" in messages[0]
    assert "\\x1b]0;owned\\x07" in messages[0] and "127.0.0.1:2\\n\\x1b[1A" in messages[1]
