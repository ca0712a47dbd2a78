"""CallGuard's key for a peer (IPv4 address, IPv6 /64, IPv4-mapped, unix socket, TLS certificate),
the services open to all (no swarm key, the same limits), and the chunks of a stream charged as
requests."""

from __future__ import annotations

import grpc
import pytest

from dmoe.core.auth import CallVerifier, SwarmKey
from dmoe.node.guard import CallGuard, Refused, peer_key

FORWARD = "/dmoe.ExpertService/Forward"


def test_ipv4_peers_key_on_their_address():
    assert peer_key("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_key("ipv4:10.1.2.3:80") != peer_key("ipv4:10.1.2.4:80")


def test_ipv6_peers_key_on_their_slash_64():
    one = peer_key("ipv6:[2001:db8:1:2::1]:5555")
    assert one == "2001:db8:1:2::/64"
    # any address of the same /64, whatever the port: one peer
    assert peer_key("ipv6:[2001:db8:1:2:ffff:ffff:ffff:fffe]:1") == one
    assert peer_key("ipv6:[2001:db8:1:3::1]:5555") == "2001:db8:1:3::/64"
    assert peer_key("ipv6:[::1]:6000") == "::/64"
    assert peer_key("ipv6:[fe80::1%eth0]:80") == "fe80::/64"  # a zone index is not part of the key


def test_ipv4_mapped_ipv6_peers_key_on_the_ipv4_address():
    assert peer_key("ipv6:[::ffff:10.1.2.3]:5555") == "10.1.2.3" == peer_key("ipv4:10.1.2.3:1")


def test_other_transports_and_odd_strings_key_on_the_whole_string():
    assert peer_key("unix:/tmp/sock") == "unix:/tmp/sock"
    assert peer_key("ipv6:[not an address]:1") == "ipv6:[not an address]:1"


def test_a_tls_client_keys_on_its_certificate_not_its_address():
    def context(pem: bytes) -> dict[str, list[bytes]]:
        return {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]}

    a = peer_key("ipv4:10.0.0.1:1", context(b"-----BEGIN CERTIFICATE----- a"))
    b = peer_key("ipv4:10.0.0.1:2", context(b"-----BEGIN CERTIFICATE----- b"))
    assert a.startswith("cert:") and b.startswith("cert:") and a != b
    assert peer_key("ipv4:10.0.0.9:3", context(b"-----BEGIN CERTIFICATE----- a")) == a
    # a connection without a client certificate keys on its address
    assert peer_key("ipv4:10.0.0.1:1", {"transport_security_type": [b"insecure"]}) == "10.0.0.1"


def test_open_services_need_no_key_but_share_the_limits():
    guard = CallGuard(verifier=CallVerifier(SwarmKey(b"k" * 32)), max_calls_per_peer=2,
                      max_parts_per_peer=2, peer_rate=1e-3,
                      peer_burst=3.0)
    with pytest.raises(Refused) as refused:
        guard.admit(FORWARD, "ipv4:10.0.0.1:5", None)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    held = [guard.admit_open("ipv4:10.0.0.1:5"), guard.admit_open("ipv4:10.0.0.1:6")]
    with pytest.raises(Refused, match="max_calls_per_peer=2"):
        guard.admit_open("ipv4:10.0.0.1:7")
    guard.release(held[0])
    guard.release(guard.admit_open("ipv4:10.0.0.1:8"))  # the last of the burst
    with pytest.raises(Refused, match="peer_rate=0.001"):
        guard.admit_open("ipv4:10.0.0.1:9")
    assert guard.admit_open("ipv6:[2001:db8::1]:1") == "2001:db8::/64"  # another peer is not held back


def test_each_chunk_of_a_stream_is_a_request_of_its_peer():
    guard = CallGuard(verifier=None, max_calls_per_peer=4,
                      max_parts_per_peer=4, peer_rate=1e-3, peer_burst=5.0)
    key = guard.admit(FORWARD, "ipv4:10.0.0.1:5", None)
    for _ in range(4):
        guard.charge(key)
    with pytest.raises(Refused) as refused:
        guard.charge(key)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "peer_rate=0.001" in refused.value.message and "every chunk" in refused.value.message
    guard.release(key)
    assert guard.admit(FORWARD, "ipv4:10.0.0.2:5", None) == "10.0.0.2"  # its own budget
