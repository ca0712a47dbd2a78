import grpc
import pytest

from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import Disagreement, Late, LocalInputError, is_misbehaviour
from dmoe.client.swarm import Swarm
from dmoe.errors import ConfigError, WireError

pytestmark = pytest.mark.timeout(30)


def test_failing_endpoints_back_off_exponentially_and_recover(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("dmoe.client.swarm.time.monotonic", lambda: now[0])
    swarm = Swarm(SwarmConfig(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"], ban_base=1.0, ban_max=5.0))
    try:
        bans = []
        for _ in range(5):
            swarm.report_failure("h:1")
            swarm.report_failure("h:1")  # another call of the same outage: the ban is not doubled again
            bans.append(swarm._failures["h:1"][1] - now[0])
            assert swarm._banned("h:1", "e.0", now[0]) and not swarm._banned("h:2", "e.0", now[0])
            now[0] += bans[-1] + 0.01  # tried again after the ban, and failing again
        assert bans == [1.0, 2.0, 4.0, 5.0, 5.0]  # doubling, capped
        assert not swarm._banned("h:1", "e.0", now[0])
        swarm.report_failure("h:1")
        swarm.report_success("h:1")
        assert not swarm._banned("h:1", "e.0", now[0])
    finally:
        swarm.loop.close()


def test_config_needs_an_address():
    with pytest.raises(ConfigError, match="no swarm address"):
        SwarmConfig()


def _status(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_what_only_a_broken_or_hostile_peer_does_is_misbehaviour():
    for error in (ValueError("reply holds NaN or Inf"), WireError("undecodable"), _status(grpc.StatusCode.NOT_FOUND),
                  Disagreement("refused what others accepted"), _status(grpc.StatusCode.UNIMPLEMENTED)):
        assert is_misbehaviour(error), error
    for error in (Late("late"), LocalInputError("mine"), OSError("reset"), _status(grpc.StatusCode.UNAVAILABLE),
                  _status(grpc.StatusCode.DEADLINE_EXCEEDED), _status(grpc.StatusCode.RESOURCE_EXHAUSTED),
                  _status(grpc.StatusCode.INTERNAL), _status(grpc.StatusCode.UNAUTHENTICATED),
                  _status(grpc.StatusCode.OUT_OF_RANGE), _status(grpc.StatusCode.INVALID_ARGUMENT)):
        assert not is_misbehaviour(error), error


def test_a_misbehaving_expert_is_quarantined_alone_and_for_long(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("dmoe.client.swarm.time.monotonic", lambda: now[0])
    swarm = Swarm(SwarmConfig(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"], ban_base=1.0, quarantine_time=300.0))
    try:
        swarm.report("h:1", "e.0", ValueError("reply holds NaN or Inf"))
        assert swarm._banned("h:1", "e.0", now[0]) and not swarm._banned("h:1", "e.1", now[0])
        swarm.report("h:1", "e.1", None)  # a success of another expert there does not lift it
        now[0] += 299.0
        assert swarm.quarantined("h:1", "e.0")
        now[0] += 2.0
        assert not swarm.quarantined("h:1", "e.0")
        swarm.report("h:2", "e.0", Late("late"))  # an ordinary failure: the short back-off of the endpoint
        assert swarm._banned("h:2", "e.5", now[0]) and not swarm.quarantined("h:2", "e.0")
        now[0] += 1.01
        assert not swarm._banned("h:2", "e.0", now[0])
        swarm.report("h:3", "e.0", _status(grpc.StatusCode.NOT_FOUND))  # maybe a stale record: ban_max only
        assert swarm.quarantined("h:3", "e.0")
        now[0] += swarm.config.ban_max + 0.01
        assert not swarm.quarantined("h:3", "e.0")
    finally:
        swarm.loop.close()
