"""EndpointHealth stays bounded while records rotate endpoints, and what it logs of a peer's text
cannot forge log lines or move an operator's terminal (issue 18)."""

from __future__ import annotations

import logging

import grpc
import pytest

import dmoe.client.health
from dmoe.client.health import EndpointHealth

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr("dmoe.client.health.time.monotonic", lambda: now[0])
    return now


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
