"""CallGuard's limits at their edges (dmoe.node.guard): the table of peers holds exactly MAX_PEERS and
then forgets the least recently seen peer with nothing in flight; a peer's parts of batched calls are
limited, counted and given back apart from its calls; the counters start at zero; a TLS client's key is
32 hex digits of its certificate's hash."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from dmoe.node import guard as guard_module
from dmoe.node.guard import MAX_PEERS, CallGuard, Refused, peer_key

pytestmark = pytest.mark.timeout(30)
FORWARD = "/dmoe.ExpertService/Forward"


@pytest.fixture(autouse=True)
def still_clock(monkeypatch):
    """The buckets' clock stands still: what a bucket holds is what was taken from it."""
    monkeypatch.setattr("dmoe.core.ratelimit.time.monotonic", lambda: 0.0)


def _guard(**limits) -> CallGuard:
    given = dict(verifier=None, max_calls_per_peer=2, max_parts_per_peer=2, peer_rate=1e-9, peer_burst=100.0)
    return CallGuard(**{**given, **limits})


def test_the_table_holds_max_peers_then_forgets_the_least_recently_seen_idle_one():
    assert MAX_PEERS == 10_000
    guard = _guard()
    for i in range(MAX_PEERS):
        guard.release(guard.admit_open(f"ipv4:10.{i // 65536}.{i // 256 % 256}.{i % 256}:1"))
    assert len(guard._peers) == MAX_PEERS and "10.0.0.0" in guard._peers
    guard.release(guard.admit_open("ipv4:10.0.0.0:2"))  # seen again: now the most recent
    guard.release(guard.admit_open("ipv4:192.168.0.1:1"))
    assert len(guard._peers) == MAX_PEERS
    assert "10.0.0.1" not in guard._peers and "10.0.0.0" in guard._peers and "192.168.0.1" in guard._peers


def test_a_peer_with_a_call_in_flight_is_not_forgotten(monkeypatch):
    monkeypatch.setattr(guard_module, "MAX_PEERS", 2)
    guard = _guard()
    busy = guard.admit_open("ipv4:10.0.0.1:1")
    guard.release(guard.admit_open("ipv4:10.0.0.2:1"))
    guard.release(guard.admit_open("ipv4:10.0.0.3:1"))
    assert list(guard._peers) == ["10.0.0.1", "10.0.0.3"] and guard._peers[busy].in_flight == 1
    guard.release(busy)
    assert guard._peers[busy].in_flight == 0
    guard.release(guard.admit_open("ipv4:10.0.0.4:1"))
    assert list(guard._peers) == ["10.0.0.3", "10.0.0.4"]


def test_parts_have_their_own_limit_and_count():
    guard = _guard(max_calls_per_peer=1, max_parts_per_peer=3)
    assert guard.num_rate_limited == 0 and guard.num_unauthenticated == 0
    key = guard.admit(FORWARD, "ipv4:10.0.0.1:1", None)
    for _ in range(3):
        guard.admit_part(key)
    assert guard._peers[key].parts_in_flight == 3 and guard._peers[key].in_flight == 1
    with pytest.raises(Refused, match=r"^3 parts of batched calls .*\(max_parts_per_peer=3\); wait") as no:
        guard.admit_part(key)
    assert no.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and guard.num_rate_limited == 1
    guard.release_part(key)
    assert guard._peers[key].parts_in_flight == 2
    guard.admit_part(key)
    assert guard._peers[key].parts_in_flight == 3 and guard._peers[key].requests.tokens == 100.0 - 5
    guard.admit_part("nobody")  # a key not in the table: nothing to count
    guard.release_part("nobody")
    guard.charge("nobody")
    guard.release("nobody")
    assert "nobody" not in guard._peers


def test_calls_refused_at_the_limit_take_nothing_from_the_rate():
    guard = _guard(max_calls_per_peer=1, peer_burst=3.0)
    key = guard.admit(FORWARD, "ipv4:10.0.0.1:1", None)
    with pytest.raises(Refused, match=r"^1 calls of yours are in flight already"):
        guard.admit(FORWARD, "ipv4:10.0.0.1:2", None)
    assert guard._peers[key].requests.tokens == 2.0 and guard._peers[key].in_flight == 1
    guard.charge(key)
    assert guard._peers[key].requests.tokens == 1.0
    guard.release(key)
    guard.release(guard.admit(FORWARD, "ipv4:10.0.0.1:3", None))
    with pytest.raises(Refused, match=r"^more than 1e-09 requests per second from 10\.0\.0\.1 "):
        guard.admit(FORWARD, "ipv4:10.0.0.1:4", None)
    assert guard.num_rate_limited == 2 and guard._peers[key].in_flight == 0


def test_a_certificate_key_is_32_hex_digits_of_its_hash():
    pem = b"-----BEGIN CERTIFICATE----- x"
    key = peer_key("ipv4:1.2.3.4:5", {"x509_pem_cert": [pem, b"another"]})
    assert key == "cert:" + hashlib.sha256(pem).hexdigest()[:32] and len(key) == 37
    assert peer_key("ipv4:1.2.3.4:5", {"x509_pem_cert": []}) == "1.2.3.4"


def test_keys_of_odd_peer_strings():
    # the first address of a /64 is not its group: the group is the key
    assert peer_key("ipv6:[2001:db8::]:1") == "2001:db8::/64"
    # a kind of peer string other than ipv4 and ipv6, whatever its name: the whole string
    for peer in ("abc:x:1", "inproc:x:1", "unix-abstract:x:1"):
        assert peer_key(peer) == peer
