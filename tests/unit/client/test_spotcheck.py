"""SpotChecker in-process: the distance, the draw, and the verdicts of checks between replicas that
are modules of this process (the seam is the checker's call function: one forward of a replica)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest
import torch
from torch import nn

from dmoe.client.config import SwarmConfig
from dmoe.client.spotcheck import MIN_CHECK_SECONDS, SUSPECT_CHECKS, SUSPECT_REST_MAX, SpotChecker, distance
from dmoe.core.records import ExpertRecord
from dmoe.errors import ConfigError

pytestmark = pytest.mark.timeout(30)
UID = "ffn.0"
HIDDEN = 8


def record(endpoint: str) -> ExpertRecord:
    return ExpertRecord(uid=UID, endpoint=endpoint, node_id=endpoint, expert_cls="ffn")


class Replicas:
    """Replicas of one expert by endpoint: the same module, ``drift`` added to some, and liars whose
    every output is off by ``lie`` times its norm. A replica missing from ``modules`` never answers."""

    def __init__(self, honest: list[str], liars: list[str] = (), drift: dict[str, float] | None = None,
                 lie: float = 1.0):
        torch.manual_seed(0)
        base = nn.Linear(HIDDEN, HIDDEN)
        self.modules: dict[str, nn.Module] = {}
        for endpoint in [*honest, *liars]:
            module = nn.Linear(HIDDEN, HIDDEN)
            module.load_state_dict(base.state_dict())
            with torch.no_grad():
                module.weight.add_((drift or {}).get(endpoint, 0.0) * torch.randn(HIDDEN, HIDDEN))
            self.modules[endpoint] = module
        self.liars, self.lie = set(liars), lie
        self.calls: list[str] = []

    async def call(self, replica: ExpertRecord, inputs, token_ids, timeout):
        self.calls.append(replica.dial_endpoint)
        if replica.dial_endpoint not in self.modules:
            raise ConnectionError("no answer")
        with torch.no_grad():
            y = self.modules[replica.dial_endpoint](inputs)
            if replica.dial_endpoint in self.liars:
                noise = torch.randn_like(y)
                y = y + self.lie * y.norm() * noise / noise.norm()
        return y

    def answer(self, endpoint: str, inputs: torch.Tensor) -> torch.Tensor:
        return asyncio.run(self.call(record(endpoint), inputs, None, 1.0))


def check(checker: SpotChecker, replicas: Replicas, first: str, others: list[str],
          num_tokens: int = 6) -> bool:
    """One check of ``first``'s answer against ``others``, run to its end; whether it started."""
    torch.manual_seed(1)
    x = torch.randn(num_tokens, HIDDEN)
    output = replicas.answer(first, x)

    async def run() -> bool:
        started = checker.start(UID, first, output, x, torch.arange(num_tokens), [record(e) for e in others],
                                deadline=time.monotonic() + 5, timeout=5.0, call=replicas.call,
                                clock=time.monotonic)
        await checker.join()
        return started

    return asyncio.run(run())


def checker_for(convicted: list[tuple[str, str, str]], **options) -> SpotChecker:
    settings = dict(rate=1.0, tolerance=0.3, tokens=3, seed=0) | options
    return SpotChecker(quarantine=lambda endpoint, uid, why: convicted.append((endpoint, uid, why)),
                       **settings)


def test_distance_is_relative_symmetric_and_catches_scaling_sign_and_zeros():
    torch.manual_seed(0)
    a = torch.randn(4, 16)
    assert distance(a, a) == 0.0 and distance(a, a.clone()) == 0.0
    assert distance(a, 1.01 * a) == pytest.approx(0.01 / math.sqrt(1.01), rel=1e-6)
    assert distance(a, 9 * a) == pytest.approx(8 / 3, rel=1e-6) == distance(9 * a, a)
    assert distance(a, -a) == pytest.approx(2.0)
    assert distance(1e-3 * a, -1e-3 * a) == pytest.approx(2.0)  # relative: the outputs' scale does not matter
    assert distance(a, torch.zeros_like(a)) == math.inf
    unrelated, other = torch.randn(400, 16), torch.randn(400, 16)
    exact = ((unrelated - other).norm() / (unrelated.norm() * other.norm()).sqrt()).item()
    assert distance(unrelated, other) == pytest.approx(exact, rel=1e-6)
    assert distance(unrelated, other) == pytest.approx(math.sqrt(2), abs=0.05)  # unrelated outputs: ~1.4


@pytest.mark.parametrize("liar_is", ["first", "second"])
def test_a_liar_is_quarantined_whether_its_answer_is_checked_or_checks(liar_is):
    convicted: list = []
    replicas = Replicas(["a:1", "b:1"], liars=["liar:1"], drift={"b:1": 0.01})
    checker = checker_for(convicted)
    if liar_is == "first":
        assert check(checker, replicas, "liar:1", ["a:1", "b:1"])
    else:
        checker._rng.shuffle = lambda order: order.sort(key=lambda r: r.dial_endpoint != "liar:1")
        assert check(checker, replicas, "a:1", ["liar:1", "b:1"])
    assert [(e, uid) for e, uid, _ in convicted] == [("liar:1", UID)]
    assert "spot check" in convicted[0][2]
    stats = checker.stats
    assert (stats.checks, stats.disagreed, stats.convicted, stats.unsettled) == (1, 1, 1, 0)
    assert stats.tokens == 6 and stats.bytes == 2 * 2 * 3 * HIDDEN * 4  # two calls of 3 tokens


def test_honest_replicas_that_drifted_within_the_tolerance_agree():
    convicted: list = []
    replicas = Replicas(["a:1", "b:1", "c:1"], drift={"b:1": 0.02, "c:1": -0.02})
    checker = checker_for(convicted)
    for first in ("a:1", "b:1", "c:1"):
        assert check(checker, replicas, first, [e for e in ("a:1", "b:1", "c:1") if e != first])
    assert convicted == [] and checker.stats.agreed == checker.stats.checks == 3
    assert 0 < checker.stats.largest_agreed < 0.3
    assert len(replicas.calls) == 3 + 3  # each answer and one check call: no third asked


def test_two_replicas_that_disagree_convict_no_one_and_the_expert_is_checked_from_then_on():
    convicted: list = []
    replicas = Replicas(["a:1"], liars=["liar:1"])
    checker = checker_for(convicted, rate=0.0)
    assert not checker.wants(UID)  # rate 0: never drawn
    assert check(checker, replicas, "a:1", ["liar:1"])  # started by hand: what a draw would do
    assert convicted == []
    assert (checker.stats.disagreed, checker.stats.unsettled) == (1, 1)
    assert all(checker.wants(UID) for _ in range(SUSPECT_CHECKS))
    assert not checker.wants(UID) and not checker.wants("ffn.1")


def test_a_third_that_cannot_settle_it_convicts_no_one():
    convicted: list = []
    # the third does not answer; then, a third that disagrees with both (two liars and an honest third)
    replicas = Replicas(["a:1", "c:1"], liars=["liar:1", "liar:2"])
    del replicas.modules["c:1"]
    checker = checker_for(convicted)
    checker._rng.shuffle = lambda order: None  # ask in the order given
    assert check(checker, replicas, "a:1", ["liar:1", "c:1"])
    replicas.modules["c:1"] = replicas.modules["a:1"]
    assert check(checker, replicas, "liar:1", ["liar:2", "c:1"])
    assert convicted == []
    assert (checker.stats.disagreed, checker.stats.unsettled, checker.stats.failed) == (2, 2, 1)


def test_no_other_replica_no_check_and_a_second_that_does_not_answer_settles_nothing():
    convicted: list = []
    replicas = Replicas(["a:1"])
    checker = checker_for(convicted)
    assert not check(checker, replicas, "a:1", [])
    assert not check(checker, replicas, "a:1", ["a:1"])  # the same replica is no check
    assert check(checker, replicas, "a:1", ["gone:1"])
    assert convicted == [] and checker.stats.failed == 1 and checker.stats.checks == 0


def test_the_draw_follows_the_rate():
    checker = checker_for([], rate=0.1)
    drawn = sum(checker.wants(UID) for _ in range(10_000))
    assert 800 < drawn < 1200


def test_swarm_config_spot_check_options():
    config = SwarmConfig()
    assert (config.spot_check_rate, config.spot_check_tolerance, config.spot_check_tokens) == (0.05, 1.5, 4)
    checker = SpotChecker.from_config(config, quarantine=lambda *_: None)
    assert (checker.rate, checker.tolerance, checker.tokens) == (0.05, 1.5, 4)
    for bad in (dict(spot_check_rate=1.5), dict(spot_check_rate=-0.1), dict(spot_check_tolerance=0),
                dict(spot_check_tokens=0)):
        with pytest.raises(ConfigError, match="spot_check"):
            SwarmConfig(**bad)


def test_suspicion_that_nothing_settles_is_a_bounded_share_of_an_experts_answers(caplog):
    """Two replicas that disagree at every check (honest drift above the tolerance, or a liar with no
    third to settle it), checked at rate 5%: a disagreement during a spell does not lengthen it, and
    after each spell the expert rests for twice as many answers as after the one before (up to a
    bound), so the checks it adds stay a bounded share of its answers instead of all of them."""
    caplog.set_level(logging.WARNING, logger="dmoe.client.spotcheck")  # one warning per spell
    convicted: list = []
    rate = 0.05
    replicas = Replicas(["a:1"], liars=["liar:1"])
    checker = checker_for(convicted, rate=rate)
    assert check(checker, replicas, "a:1", ["liar:1"])  # the first unsettled disagreement: a spell
    assert convicted == [] and checker.stats.unsettled == 1
    starts, checked = [0], []

    def answers(count: int) -> None:
        """Answers of the expert, each check a disagreement that nothing settles."""
        for _ in range(count):
            checked.append(checker.wants(UID))
            if checked[-1]:
                spells = len(caplog.records)
                checker._unsettled(UID, ("a:1", "liar:1"), "apart again")
                if len(caplog.records) > spells:
                    starts.append(len(checked))

    answers(SUSPECT_CHECKS)
    assert all(checked) and starts == [0]  # the spell's own disagreements do not lengthen it
    answers(20_000)
    rests = [b - a - SUSPECT_CHECKS for a, b in zip(starts, starts[1:])]
    assert len(rests) >= 5, rests
    assert all(rest >= min(SUSPECT_REST_MAX, SUSPECT_CHECKS << spell) for spell, rest in enumerate(rests, 1))
    checked.clear()
    answers(200_000)  # in the long run: the rate, and a spell per rest at most
    share = sum(checked) / len(checked)
    assert rate < share < rate + 1.1 * SUSPECT_CHECKS / (SUSPECT_CHECKS + SUSPECT_REST_MAX), share


def test_a_check_of_an_answer_that_came_just_before_the_deadline_still_gets_time_of_its_own():
    """The second replica's call ends by the forward's deadline, but never sooner than
    MIN_CHECK_SECONDS (within the forward's timeout) from the check's start: an answer that came
    late must not leave its check milliseconds, to time out and settle nothing."""
    replicas = Replicas(["a:1", "b:1"])
    given: list[float] = []

    async def call(replica, inputs, token_ids, timeout):
        given.append(timeout)
        return await replicas.call(replica, inputs, token_ids, timeout)

    checker = checker_for([])
    x = torch.randn(4, HIDDEN)
    output = replicas.answer("a:1", x)

    async def run() -> None:
        assert checker.start(UID, "a:1", output, x, torch.arange(4), [record("b:1")],
                             deadline=time.monotonic() + 0.002, timeout=5.0, call=call, clock=time.monotonic)
        await checker.join()

    asyncio.run(run())
    assert len(given) == 1 and given[0] >= MIN_CHECK_SECONDS - 0.01, given
    assert checker.stats.agreed == 1


def test_stop_cancels_the_checks_in_flight_and_waits_for_them():
    replicas = Replicas(["a:1", "b:1"])
    entered = asyncio.Event()  # the check's call has begun

    async def never(replica, inputs, token_ids, timeout):
        entered.set()
        await asyncio.Event().wait()  # an answer that never comes

    checker = checker_for([])
    x = torch.randn(4, HIDDEN)
    output = replicas.answer("a:1", x)

    async def run() -> None:
        assert checker.start(UID, "a:1", output, x, torch.arange(4), [record("b:1")],
                             deadline=time.monotonic() + 5, timeout=5.0, call=never, clock=time.monotonic)
        await entered.wait()
        assert checker.running == 1
        await checker.stop()
        assert checker.running == 0

    asyncio.run(asyncio.wait_for(run(), 10))
    assert checker.stats.failed == 0 and checker.stats.checks == 0  # a cancelled check is not a failed one
