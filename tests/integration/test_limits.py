"""Limits per peer: calls in flight and request rate, each answered RESOURCE_EXHAUSTED with a message
that names the limit and lifted as soon as the peer is back within it; and a stream that never
finishes arriving is dropped after --receive-timeout. (Message size, tokens per request, queued
tokens and bytes arriving are in test_bad_input.py.)"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import grpc
import pytest
import torch
from swarm_fixtures import module_node, stub, wait_for

from dmoe.core.wire import serialize
from dmoe.proto import expert_pb2 as pb
from dmoe.testing.netproxy import TcpProxy

pytestmark = pytest.mark.timeout(120)
HIDDEN = 8
RATE, BURST = 0.25, 4  # a token every 4 s: none comes back while a test makes its few calls
RECEIVE_TIMEOUT = 2.0
SOURCES = itertools.count(10)  # 127.0.0.N: each test a peer of its own, with a full bucket

node = module_node("--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--expert-cls",
                   "experts_for_tests:SleepyExpert", "--max-calls-per-peer", "2", "--peer-rate", str(RATE),
                   "--peer-burst", str(BURST), "--no-batching", "--receive-timeout", str(RECEIVE_TIMEOUT))


@contextlib.contextmanager
def new_peer(node):
    """A stub whose calls reach the node from an address of their own (through a proxy): a peer the
    node has not seen, with BURST requests to spend and nothing in flight."""
    with TcpProxy(("127.0.0.1", node.ready["port"]), source=f"127.0.0.{next(SOURCES)}") as proxy:
        channel, service = stub(f"127.0.0.1:{proxy.port}")
        with channel:
            yield service


def outcome(call) -> grpc.StatusCode | str:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


def info(service) -> grpc.StatusCode | str:
    return outcome(lambda: service.Info(pb.InfoRequest(), timeout=10))


def test_calls_in_flight_per_peer_are_capped(node):
    with new_peer(node) as service:
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


def test_request_rate_per_peer_is_capped_and_recovers(node):
    """A new peer's BURST calls pass and the next 4 are refused: no token comes back before 1 / RATE
    seconds (4 s, far more than 8 calls take; a peer for which they took longer is replaced by a fresh
    one). Then calls pass again, once a token came back and not before."""
    for _ in range(3):
        with new_peer(node) as service:
            started = time.monotonic()
            results = [info(service) for _ in range(BURST + 4)]
            if time.monotonic() - started >= 1 / RATE:
                continue
            assert results[:BURST] == [grpc.StatusCode.OK] * BURST, results
            refused = results[BURST:]
            assert all(r != grpc.StatusCode.OK and r.startswith("RESOURCE_EXHAUSTED")
                       and f"peer_rate={RATE:g}" in r for r in refused), results
            # refused polls cost no token
            wait_for(lambda: info(service) == grpc.StatusCode.OK, 3 / RATE, "a token back", interval=0.2)
            assert time.monotonic() - started >= 1 / RATE
            return
    pytest.fail(f"{BURST + 4} calls took over {1 / RATE:g}s three times: no peer to test the rate with")


def test_a_stream_that_never_finishes_arriving_is_dropped(node):
    release = threading.Event()

    def stalled():
        yield pb.Chunk(data=b"\x00" * 100)
        release.wait(30)

    with new_peer(node) as service:
        started = time.monotonic()
        try:
            result = outcome(lambda: list(service.ForwardStream(stalled(), timeout=30)))
        finally:
            release.set()
        # dropped by the node at its receive_timeout (it says so), not at the call's own 30 s deadline
        assert result.startswith("DEADLINE_EXCEEDED") and "receive_timeout" in result, result
        assert time.monotonic() - started >= RECEIVE_TIMEOUT
        assert info(service) == grpc.StatusCode.OK  # its slot was given back
