import pytest

from dmoe.errors import ConfigError
from dmoe.swarm import Swarm, SwarmConfig

pytestmark = pytest.mark.timeout(30)


def test_failing_endpoints_back_off_exponentially_and_recover(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("dmoe.swarm.time.monotonic", lambda: now[0])
    swarm = Swarm(SwarmConfig(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"], ban_base=1.0, ban_max=5.0))
    try:
        bans = []
        for _ in range(5):
            swarm.report_failure("h:1")
            swarm.report_failure("h:1")  # another call of the same outage: the ban is not doubled again
            bans.append(swarm._failures["h:1"][1] - now[0])
            assert swarm._banned("h:1", now[0]) and not swarm._banned("h:2", now[0])
            now[0] += bans[-1] + 0.01  # tried again after the ban, and failing again
        assert bans == [1.0, 2.0, 4.0, 5.0, 5.0]  # doubling, capped
        assert not swarm._banned("h:1", now[0])
        swarm.report_failure("h:1")
        swarm.report_success("h:1")
        assert not swarm._banned("h:1", now[0])
    finally:
        swarm.loop.close()


def test_config_needs_an_address():
    with pytest.raises(ConfigError, match="no swarm address"):
        SwarmConfig()
