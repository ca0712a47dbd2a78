"""Limits per peer: calls in flight and request rate, each answered RESOURCE_EXHAUSTED with a message
that names the limit, and lifted as soon as the peer is back within it. (Message size, tokens per
request, queued tokens and bytes arriving are in test_bad_input.py.)"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import torch

from dmoe.proto import expert_pb2 as pb
from dmoe.wire import serialize

from conftest import module_node

pytestmark = pytest.mark.timeout(120)
HIDDEN = 8
RATE = 4

node = module_node("--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--expert-cls",
                   "experts_for_tests:SleepyExpert", "--max-calls-per-peer", "2", "--peer-rate", str(RATE),
                   "--peer-burst", str(RATE), "--no-batching")


def outcome(call) -> grpc.StatusCode | str:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


def test_calls_in_flight_per_peer_are_capped(service):
    time.sleep(1.0)  # a full bucket of requests
    request = pb.ForwardRequest(uid="ffn.0", inputs=[serialize(torch.ones(2, HIDDEN))])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = [pool.submit(outcome, lambda: service.Forward(request, timeout=10)) for _ in range(2)]
        time.sleep(0.2)  # both are in the expert's half-second sleep now
        third = outcome(lambda: service.Forward(request, timeout=10))
        assert [f.result() for f in first] == [grpc.StatusCode.OK] * 2
    assert third.startswith("RESOURCE_EXHAUSTED") and "max_calls_per_peer=2" in third, third
    assert outcome(lambda: service.Forward(request, timeout=10)) == grpc.StatusCode.OK  # back within the limit


def test_request_rate_per_peer_is_capped_and_recovers(service):
    time.sleep(RATE / RATE + 0.2)  # the bucket refills: RATE requests at once
    results = [outcome(lambda: service.Info(pb.InfoRequest(), timeout=10)) for _ in range(2 * RATE)]
    assert results[:RATE] == [grpc.StatusCode.OK] * RATE
    refused = [r for r in results[RATE:] if r != grpc.StatusCode.OK]
    assert len(refused) >= RATE - 1  # one may slip in as the bucket refills while these run
    assert all(r.startswith("RESOURCE_EXHAUSTED") and f"peer_rate={RATE}" in r for r in refused), refused
    time.sleep(1.5 / RATE)
    assert outcome(lambda: service.Info(pb.InfoRequest(), timeout=10)) == grpc.StatusCode.OK
