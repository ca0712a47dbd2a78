"""The swarm key's tokens (gRPC calls) and signatures (DHT requests), and the per-peer guard."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from hivemind.proto import dht_pb2

from dmoe.core.auth import CallVerifier, SwarmKey
from dmoe.core.dhtauth import DHTAuthorizer
from dmoe.errors import ConfigError
from dmoe.node import guard as guard_module
from dmoe.node.guard import CallGuard, Refused, peer_address

pytestmark = pytest.mark.timeout(30)
FORWARD = "/dmoe.ExpertService/Forward"


def test_a_call_token_is_for_one_key_one_method_one_use_and_now(monkeypatch):
    key, other = SwarmKey(b"k" * 32), SwarmKey(b"o" * 32)
    verifier = CallVerifier(key, max_skew=60)
    assert verifier.check(FORWARD, None).startswith("this node serves a private swarm")
    assert verifier.check(FORWARD, other.call_metadata(FORWARD)).startswith("wrong swarm key")
    assert verifier.check(FORWARD,
                          key.call_metadata("/dmoe.ExpertService/Backward")).startswith("wrong swarm key")
    assert verifier.check(FORWARD, (("dmoe-auth", "1.2.3"),)) == "malformed dmoe-auth token"
    token = key.call_metadata(FORWARD)
    assert verifier.check(FORWARD, token) is None
    assert verifier.check(FORWARD, token) == "token already used (a replayed call)"
    now = [1_000_000.0]
    monkeypatch.setattr("dmoe.core.auth.time.time", lambda: now[0])
    verifier = CallVerifier(key, max_skew=60)
    old = key.call_metadata(FORWARD)
    now[0] += 61
    assert "off this node's clock" in verifier.check(FORWARD, old)
    for _ in range(5):  # accepted tokens are remembered while they could pass the time check
        assert verifier.check(FORWARD, key.call_metadata(FORWARD)) is None
        now[0] += 10
    assert len(verifier._seen) == 5
    first = key.call_metadata(FORWARD)
    assert verifier.check(FORWARD, first) is None
    now[0] += 62  # then forgotten: memory stays bounded by the rate of accepted calls
    assert verifier.check(FORWARD, key.call_metadata(FORWARD)) is None
    assert len(verifier._seen) == 1
    assert "off this node's clock" in verifier.check(FORWARD, first)  # and too old to replay anyway


def test_dht_requests_and_responses_are_signed_with_the_key(monkeypatch):
    async def scenario():
        ours, theirs = DHTAuthorizer(SwarmKey(b"k" * 32)), DHTAuthorizer(SwarmKey(b"x" * 32))
        request = dht_pb2.PingRequest(validate=True)
        await ours.sign_request(request)
        assert await ours.validate_request(request)
        assert not await ours.validate_request(request)  # replayed
        forged = dht_pb2.PingRequest(validate=True)
        await theirs.sign_request(forged)
        assert not await ours.validate_request(forged)
        tampered = dht_pb2.PingRequest(validate=True)
        await ours.sign_request(tampered)
        tampered.validate = False
        assert not await ours.validate_request(tampered)
        response = dht_pb2.PingResponse(dht_time=1.0)
        await ours.sign_response(response, request)
        assert await ours.validate_response(response, request)
        other = dht_pb2.PingRequest()
        await ours.sign_request(other)
        assert not await ours.validate_response(response, other)  # an answer to another request
        response.dht_time = 2.0
        assert not await ours.validate_response(response, request)
        for _ in range(1000):  # many requests: the nonces of the old ones are forgotten as they expire
            fresh = dht_pb2.PingRequest()
            await ours.sign_request(fresh)
            assert await ours.validate_request(fresh)
        assert len(ours._seen) == 1001
        now = time.time() + 62
        monkeypatch.setattr("dmoe.core.auth.time.time", lambda: now)
        fresh = dht_pb2.PingRequest()
        await ours.sign_request(fresh)
        assert await ours.validate_request(fresh) and len(ours._seen) == 1

    asyncio.run(scenario())


def test_keys_are_long_enough_and_files_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        SwarmKey(b"short")
    (tmp_path / "bad").write_text("not hex")
    with pytest.raises(ConfigError, match="not a swarm key"):
        SwarmKey.load(tmp_path / "bad")
    with pytest.raises(ConfigError, match="dmoe swarm keygen"):
        SwarmKey.load(tmp_path / "missing")


def test_the_guard_limits_each_peer_on_its_own(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("dmoe.core.ratelimit.time.monotonic", lambda: now[0])
    guard = CallGuard(verifier=None, max_calls_per_peer=2,
                      max_parts_per_peer=2, peer_rate=1.0, peer_burst=3.0)
    a, b = "ipv4:10.0.0.1:5000", "ipv6:[::1]:6000"
    held = [guard.admit(FORWARD, a, None), guard.admit(FORWARD, a, None)]
    with pytest.raises(Refused, match="max_calls_per_peer=2") as refused:
        guard.admit(FORWARD, a, None)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert guard.admit(FORWARD, b, None) == "::/64"  # another peer is not held back
    guard.release(held[0])
    guard.release(guard.admit(FORWARD, a, None))  # third token of a's burst
    with pytest.raises(Refused, match="more than 1 requests per second"):
        guard.admit(FORWARD, a, None)
    now[0] += 1.0
    guard.release(guard.admit(FORWARD, a, None))
    assert guard.num_rate_limited == 2


def test_the_guard_refuses_without_the_key_first():
    key = SwarmKey(b"k" * 32)
    guard = CallGuard(verifier=CallVerifier(key), max_calls_per_peer=1, max_parts_per_peer=1, peer_rate=1.0,
                      peer_burst=1.0)
    with pytest.raises(Refused) as refused:
        guard.admit(FORWARD, "ipv4:1.2.3.4:5", None)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and guard.num_unauthenticated == 1
    assert guard.admit(FORWARD, "ipv4:1.2.3.4:5", key.call_metadata(FORWARD)) == "1.2.3.4"


def test_the_table_of_peers_is_bounded(monkeypatch):
    monkeypatch.setattr(guard_module, "MAX_PEERS", 50)
    guard = CallGuard(verifier=None, max_calls_per_peer=4,
                      max_parts_per_peer=4, peer_rate=10.0, peer_burst=10.0)
    busy = guard.admit(FORWARD, "ipv4:10.9.9.9:1", None)  # stays in flight: never forgotten
    for i in range(500):
        guard.release(guard.admit(FORWARD, f"ipv4:10.0.{i // 256}.{i % 256}:1", None))
    assert len(guard._peers) <= 51 and busy in guard._peers


def test_peer_address_takes_the_host_part():
    assert peer_address("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_address("ipv6:[fe80::1]:80") == "fe80::1"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"
