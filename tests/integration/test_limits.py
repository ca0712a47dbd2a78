"""Limits per peer: calls in flight and request rate, each answered RESOURCE_EXHAUSTED with a message
that names the limit and lifted as soon as the peer is back within it; and a stream that never
finishes arriving is dropped after --receive-timeout. (Message size, tokens per request, queued
tokens and bytes arriving are in test_bad_input.py.)"""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch
from swarm_fixtures import module_node, wait_for

from dmoe.core.wire import serialize
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(120)
HIDDEN = 8
RATE, BURST = 2.0, 4
RECEIVE_TIMEOUT = 2.0

node = module_node("--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--expert-cls",
                   "experts_for_tests:SleepyExpert", "--max-calls-per-peer", "2", "--peer-rate", str(RATE),
                   "--peer-burst", str(BURST), "--no-batching", "--receive-timeout", str(RECEIVE_TIMEOUT))


def outcome(call) -> grpc.StatusCode | str:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


def info(service) -> grpc.StatusCode | str:
    return outcome(lambda: service.Info(pb.InfoRequest(), timeout=10))


def test_calls_in_flight_per_peer_are_capped(service):
    time.sleep(BURST / RATE)  # a full bucket
    request = pb.ForwardRequest(uid="ffn.0", inputs=[serialize(torch.ones(2, HIDDEN))])
    # both sent before any poll, on one channel: the node admits them first, and a poll refused for
    # the calls in flight costs no token of the peer's rate
    first = [service.Forward.future(request, timeout=10) for _ in range(2)]
    # polled: once both are in the expert's half-second sleep, a third call is refused
    third = wait_for(lambda: (r := info(service)) != grpc.StatusCode.OK and r, 5, "a refused third call",
                     interval=0.01)
    assert [outcome(f.result) for f in first] == [grpc.StatusCode.OK] * 2
    assert third.startswith("RESOURCE_EXHAUSTED") and "max_calls_per_peer=2" in third, third
    assert info(service) == grpc.StatusCode.OK  # back within the limit


def test_request_rate_per_peer_is_capped_and_recovers(service):
    for _ in range(3):  # a machine too busy to make 8 calls in 1.5 s leaves nothing to check: again
        time.sleep(BURST / RATE)  # a full bucket: BURST calls at once, then RATE per second
        started = time.monotonic()
        results = [info(service) for _ in range(BURST + 4)]
        elapsed = time.monotonic() - started
        if elapsed < 1.5:
            break
    assert results[:BURST] == [grpc.StatusCode.OK] * BURST, results
    refused = [r for r in results[BURST:] if r != grpc.StatusCode.OK]
    # of the 4 calls past the burst, all are refused but those that tokens refilled meanwhile paid for
    assert elapsed < 1.5 and len(refused) >= 4 - math.floor(RATE * elapsed) >= 1, (results, elapsed)
    assert all(r.startswith("RESOURCE_EXHAUSTED") and f"peer_rate={RATE:g}" in r for r in refused), refused
    time.sleep(1.2 / RATE)
    assert info(service) == grpc.StatusCode.OK


def test_a_stream_that_never_finishes_arriving_is_dropped(service):
    time.sleep(2 / RATE)
    release = threading.Event()

    def stalled():
        yield pb.Chunk(data=b"\x00" * 100)
        release.wait(30)

    started = time.monotonic()
    try:
        result = outcome(lambda: list(service.ForwardStream(stalled(), timeout=30)))
    finally:
        release.set()
    assert result.startswith("DEADLINE_EXCEEDED") and "receive_timeout" in result, result
    # dropped at the node's receive_timeout, long before the call's own 30 s deadline
    assert RECEIVE_TIMEOUT <= time.monotonic() - started < RECEIVE_TIMEOUT + 6
    assert info(service) == grpc.StatusCode.OK  # its slot was given back
