"""The relay's pieces that need no sockets: addresses, token bucket, limits, records, node options."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from dmoe.coordinator.config import CoordinatorConfig
from dmoe.core.addresses import address_group, host_port, parse_port_range, split_address
from dmoe.core.ratelimit import TokenBucket
from dmoe.core.records import ExpertRecord, RelayRecord
from dmoe.errors import ConfigError
from dmoe.node.config import NodeConfig
from dmoe.relay.limits import RelayLimits
from dmoe.relay.protocol import loopback_source


def test_addresses_split_and_join_both_ways():
    assert split_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_address("[::1]:31337") == ("::1", 31337)
    assert host_port("::1", 31337) == "[::1]:31337" and host_port("10.0.0.2", 5) == "10.0.0.2:5"
    for bad in ("127.0.0.1", ":80", "host:0", "host:65536", "host:http", ""):
        with pytest.raises(ValueError, match="host:port"):
            split_address(bad)


def test_loopback_sources_are_loopback_stable_and_tell_clients_apart():
    sources = {loopback_source(f"10.0.{i // 256}.{i % 256}:{40000 + i}") for i in range(500)}
    assert all(ipaddress.ip_address(s).is_loopback for s in sources)
    assert len(sources) > 490  # hash collisions are possible, but rare
    assert loopback_source("10.1.2.3:1000") == loopback_source("10.1.2.3:2000")  # the IP, not the port
    assert loopback_source("[2001:db8::1]:443") != loopback_source("[2001:db8::2]:443")


def test_relay_limits_count_an_ipv6_64_as_one_address():
    assert address_group("203.0.113.9") == "203.0.113.9"
    one_host = {address_group("2001:db8:1:2:aaaa::1"), address_group("2001:db8:1:2:ffff::9")}
    assert one_host == {"2001:db8:1:2::/64"}
    assert address_group("2001:db8:1:3::1") != address_group("2001:db8:1:2::1")
    assert address_group("::ffff:203.0.113.9") == "203.0.113.9"  # IPv4 seen through an IPv6 socket
    assert address_group("?") == "?"
    assert address_group("fe80::1%eth0") == "fe80::/64"  # a zone index is no part of the address


def test_the_coordinator_passes_its_relay_options_on():
    config = CoordinatorConfig(relay_max_nodes_per_ip=2, relay_idle_timeout=30, relay_record_grace=0)
    limits = config.relay_limits()
    assert (limits.max_nodes_per_ip, limits.idle_timeout, limits.record_grace) == (2, 30, 0)
    assert CoordinatorConfig().relay_limits() == RelayLimits()
    with pytest.raises(ConfigError, match="idle_timeout"):
        CoordinatorConfig(relay_idle_timeout=0)


class FakeClock:
    """The clock and sleep of dmoe.core.ratelimit: time moves only when the test moves it, or when
    the bucket sleeps (each sleep is recorded)."""

    def __init__(self):
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr("dmoe.core.ratelimit.time", clock)
    monkeypatch.setattr("dmoe.core.ratelimit.asyncio", clock)
    return clock


def test_token_bucket_allows_a_burst_then_the_rate(clock):
    bucket = TokenBucket(rate=2.0, burst=5.0)
    assert all(bucket.try_take() for _ in range(5)) and not bucket.try_take()
    clock.now += 0.25  # half a token
    assert not bucket.try_take()
    clock.now += 0.25  # one token came back
    assert bucket.try_take() and not bucket.try_take()
    clock.now += 100.0  # refills stop at the burst
    assert all(bucket.try_take() for _ in range(5)) and not bucket.try_take()
    assert clock.slept == []


def test_token_bucket_take_waits_off_its_debt(clock):
    bucket = TokenBucket(rate=10_000.0, burst=1000.0)

    async def spend() -> None:
        await bucket.take(1000)  # the burst: no wait
        assert clock.slept == []
        await bucket.take(2000)  # 0.2 s of debt: one wait of 0.2 s
        assert clock.slept == [pytest.approx(0.2, rel=1e-12)]
        await bucket.take(500)  # the debt was waited off: 0.05 s for these
        assert clock.slept[1:] == [pytest.approx(0.05, rel=1e-12)]

    asyncio.run(spend())


@pytest.mark.parametrize("field", ["max_nodes", "max_nodes_per_ip", "max_connections_per_node",
                                   "max_connections_per_client", "max_control_connections_per_ip",
                                   "first_line_timeout", "attach_timeout", "probes_per_minute",
                                   "probe_timeout", "probe_call_timeout", "control_timeout",
                                   "idle_timeout"])
def test_relay_limits_must_be_positive(field):
    with pytest.raises(ConfigError, match=field):
        RelayLimits(**{field: 0})
    with pytest.raises(ConfigError, match="rate_mbit"):
        RelayLimits(rate_mbit=-1)
    with pytest.raises(ConfigError, match="record_grace"):
        RelayLimits(record_grace=-1)
    assert RelayLimits(record_grace=0).record_grace == 0  # no check
    with pytest.raises(ConfigError, match="ping interval"):
        RelayLimits(control_timeout=5)
    with pytest.raises(ConfigError, match="10 s a node waits"):  # the node would give up first
        RelayLimits(probe_timeout=4, probe_call_timeout=6)


def test_the_dial_endpoint_is_the_relay_only_for_unreachable_nodes_with_one():
    base = dict(uid="ffn.0", endpoint="10.0.0.7:31001", node_id="n")
    assert ExpertRecord(**base).dial_endpoint == "10.0.0.7:31001"
    assert ExpertRecord(**base, reachable=False, relay="1.2.3.4:5").dial_endpoint == "1.2.3.4:5"
    assert ExpertRecord(**base, reachable=False).dial_endpoint == ""  # lost its relay: nowhere to dial
    assert ExpertRecord(**base, reachable=True, relay="1.2.3.4:5").dial_endpoint == "10.0.0.7:31001"


def test_records_of_older_nodes_read_as_reachable_and_relay_records_ignore_extra_fields():
    old = ExpertRecord.model_validate({"uid": "ffn.0", "endpoint": "h:1", "node_id": "n",
                                       "record_version": 1})
    assert old.reachable and old.relay == "" and old.dial_endpoint == "h:1"
    relay = RelayRecord.model_validate({"address": "h:2", "peer_id": "p", "future_field": [1, 2]})
    assert relay.address == "h:2"


def test_node_reachability_options_are_checked():
    swarm = ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWLcX8FcvRwBEFegig9pKb2X4vBFScPWeoWeFhNLJMmHK3"]
    with pytest.raises(ConfigError, match="auto, direct or relay"):
        NodeConfig(reachability="maybe")
    with pytest.raises(ConfigError, match="cannot start a swarm"):
        NodeConfig(reachability="relay")
    with pytest.raises(ConfigError, match="cannot offer a relay"):
        NodeConfig(reachability="relay", offer_relay=True, swarm=swarm)
    with pytest.raises(ConfigError, match="relay: expected host:port"):
        NodeConfig(relay=["relay.example.org"])
    assert NodeConfig(reachability="relay", swarm=swarm, relay=["[::1]:9"]).relay == ["[::1]:9"]


def test_port_ranges_parse_and_bad_ones_are_refused_by_the_coordinators_config():
    assert parse_port_range("40000-40999") == (40000, 40999) and parse_port_range("5000") == (5000, 5000)
    for bad in ("40999-40000", "0-10", "1-70000", "a-b", ""):
        with pytest.raises(ValueError, match="port range"):
            parse_port_range(bad)
    with pytest.raises(ConfigError, match="relay_public_ports"):
        CoordinatorConfig(relay_public_ports="high-low")
    assert CoordinatorConfig(relay_public_ports="40000-40100").relay_public_ports == "40000-40100"
