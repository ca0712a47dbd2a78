import grpc
import pytest

from dmoe.client.config import SwarmConfig
from dmoe.client.health import Late
from dmoe.client.swarm import Swarm
from dmoe.errors import ConfigError

pytestmark = pytest.mark.timeout(30)
PEERS = ["/ip4/127.0.0.1/tcp/1/p2p/x"]  # never dialled: nothing here starts the swarm


def test_a_swarm_needs_an_address():
    with pytest.raises(ConfigError, match="no swarm address"):
        Swarm(initial_peers=[])


def test_fields_are_a_shortcut_for_a_config():
    swarm = Swarm(initial_peers=PEERS, cache_ttl=3.0, ban_base=0.5, ban_max=8.0, quarantine_time=30.0)
    try:
        assert swarm.config == SwarmConfig(initial_peers=PEERS, cache_ttl=3.0, ban_base=0.5, ban_max=8.0,
                                           quarantine_time=30.0)
        assert (swarm.health.ban_base, swarm.health.ban_max, swarm.health.quarantine_time) == (0.5, 8.0, 30.0)
        assert swarm.peer.initial_peers == PEERS
    finally:
        swarm.loop.close()
    config = SwarmConfig(initial_peers=PEERS)
    swarm = Swarm(config)
    try:
        assert swarm.config is config
    finally:
        swarm.loop.close()


def test_a_config_and_fields_together_or_an_unknown_field_fail_loudly():
    with pytest.raises(TypeError, match="not both"):
        Swarm(SwarmConfig(initial_peers=PEERS), cache_ttl=3.0)
    with pytest.raises(TypeError, match="'cache_tll'"):
        Swarm(initial_peers=PEERS, cache_tll=3.0)
    with pytest.raises(TypeError, match="must be a SwarmConfig"):
        Swarm(PEERS)
    with pytest.raises(ConfigError, match="no swarm address"):
        Swarm()
    with pytest.raises(ConfigError):  # fields are checked as the config's are
        Swarm(initial_peers=PEERS, ban_base=2.0, ban_max=1.0)


def _status(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_the_swarms_reports_reach_its_endpoint_health(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("dmoe.client.health.time.monotonic", lambda: now[0])
    swarm = Swarm(initial_peers=PEERS, ban_base=1.0, ban_max=5.0, quarantine_time=300.0)
    try:
        swarm.report("h:1", "e.0", ValueError("reply holds NaN or Inf"))
        assert swarm.quarantined("h:1", "e.0") and not swarm.quarantined("h:1", "e.1")
        swarm.quarantine("h:1", "e.1", "told to")
        assert swarm.quarantined("h:1", "e.1")
        swarm.report("h:2", "e.0", Late("late"))
        assert swarm.health.is_avoided("h:2", "e.3") and swarm.health.failures("h:2") == 1
        swarm.report_success("h:2")
        assert not swarm.health.is_avoided("h:2", "e.3")
        swarm.report_failure("h:2")
        assert swarm.health.banned_until("h:2") == now[0] + 1.0
        swarm.report("h:3", "e.0", _status(grpc.StatusCode.NOT_FOUND))  # maybe a stale record: ban_max only
        now[0] += 5.01
        assert not swarm.quarantined("h:3", "e.0") and swarm.quarantined("h:1", "e.0")
    finally:
        swarm.loop.close()
