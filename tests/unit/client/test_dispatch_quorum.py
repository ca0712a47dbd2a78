"""The dispatcher's quorum (dmoe.client.dispatch.Dispatcher.forward), in-process against real gRPC
expert servers on 127.0.0.1 (tests/support/counting_server.py answers zeros of the input's shape at
once; tests/support/gated_server.py holds each call until the test opens its uid's gate): the forward
ends timeout_after_k_min after every token has min(k_min, its candidates) answers, or at
forward_timeout; the calls still running then are failures (Late) of their replicas; with ``enough``
the forward ends once every token has that many answers and the others are not needed (no failure);
a failed call fails over to another replica, a replica past its patience gets a spare; inputs that
are not finite are sent to nobody; a big sub-batch is cut between replicas; an answer is spot-checked
on another replica.

No test races a real clock: the dispatcher's clock is a fake one (``clock``) that only the test
moves, and so is its event loop's (:class:`ClockLoop`): each wake-up of the forward is an answer (or a
failure) the test lets through at a time it chose, or a timer of the forward's that the test's clock
reached. A forward runs in a thread of its own (:class:`Forward`) while the test moves the clock and
opens gates; :func:`settle` waits for what the forward did (a report, a call) and then for the end of
the dispatcher loop's turn that did it, so the clock is never moved under a decision being made.
gRPC's deadlines keep the real clock (a held call's timeout is real seconds).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from counting_server import CountingServer
from gated_server import GatedServer

import dmoe.client.dispatch as dispatch
from dmoe.client.balance import ReplicaBalancer
from dmoe.client.dispatch import Dispatcher, ExpertJob, _check_values, _decoded, _within
from dmoe.client.health import Disagreement, Late, LocalInputError, status_code
from dmoe.client.spotcheck import SpotChecker
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import serialize
from dmoe.testing.process import wait_until

pytestmark = pytest.mark.timeout(60)
HIDDEN, TOKENS = 4, 4
START = 1000.0  # the fake clock's reading when a test begins (a monotonic clock reads more than 0)
FORWARD_TIMEOUT = 7.5  # the default forward_timeout and timeout_after_k_min of these tests
WAIT = 10.0  # real seconds a test waits for what the forward does at once (a loaded machine is slow)
DEAD = "127.0.0.1:1"  # nothing listens there: a call fails at once


@pytest.fixture(scope="module")
def servers():
    fast, other = CountingServer(num_ports=2).start(), CountingServer().start()
    yield fast, other
    for server in (fast, other):
        server.shutdown()


@pytest.fixture(scope="module")
def gated():
    """Four servers (each its own endpoint: a replica of every uid) whose calls wait for the test."""
    held = [GatedServer().start() for _ in range(4)]
    yield held
    for server in held:
        server.shutdown()


class ClockLoop(asyncio.SelectorEventLoop):
    """The dispatcher's event loop, its time read from ``clock`` (the monotonic clock, or a test's fake
    one): the loop's timers (the forward's waits) then fire when that clock reaches them."""

    def __init__(self):
        super().__init__()
        self.clock = time.monotonic

    def time(self) -> float:
        return self.clock()


class FakeClock:
    """The dispatcher module's ``time`` (the rest of the module ``time`` as it is) and its loop's clock:
    ``monotonic()`` reads ``now``, which only the test sets."""

    def __init__(self, now: float, loop: ClockLoop):
        self._now, self._loop = now, loop
        loop.clock = self.monotonic

    @property
    def now(self) -> float:
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        self._now = value
        self._loop.call_soon_threadsafe(lambda: None)  # a loop asleep until its next timer looks again

    def monotonic(self) -> float:
        return self._now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def dispatcher():
    loop = ClockLoop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop, batch_per_node=False, balancer=ReplicaBalancer(seed=0))
    yield dispatcher
    dispatcher.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def clock(monkeypatch, dispatcher):
    fake = FakeClock(START, dispatcher._loop)
    monkeypatch.setattr(dispatch, "time", fake)
    yield fake
    fake.now += 1e6  # a forward still waiting (its test failed) ends now


def job(uid: str, endpoints: list[str], tokens: list[int]) -> ExpertJob:
    replicas = [ExpertRecord(uid=uid, endpoint=e, node_id=f"n-{e}") for e in endpoints]
    return ExpertJob(uid, replicas, torch.randn(len(tokens), HIDDEN), torch.tensor(tokens))


class Forward:
    """``dispatcher.forward(jobs, ...)`` running in a thread, its reports (uid, endpoint, error) as they
    come."""

    def __init__(self, dispatcher: Dispatcher, jobs: list[ExpertJob], *, then=None, **kwargs):
        self.reports: list[tuple[str, str, BaseException | None]] = []
        self._then = then  # called after each report, on the dispatcher's loop (in the forward's turn)
        self._done = threading.Event()
        self._answers = self._error = None
        settings = dict(num_tokens=TOKENS, k_min=1, forward_timeout=FORWARD_TIMEOUT,
                        timeout_after_k_min=FORWARD_TIMEOUT)

        def run() -> None:
            try:
                self._answers = dispatcher.forward(jobs, on_result=self._report, **{**settings, **kwargs})
            except BaseException as e:  # raised again in the test's thread by answers()
                self._error = e
            finally:
                self._done.set()

        threading.Thread(target=run, daemon=True).start()

    def _report(self, call, error: BaseException | None) -> None:
        self.reports.append((call.uid, call.endpoint, error))
        if self._then is not None:
            self._then()

    def reported(self, uid: str, endpoint: str | None = None) -> list[BaseException | None]:
        return [e for u, where, e in self.reports if u == uid and endpoint in (None, where)]

    def answers(self) -> dispatch.ForwardAnswers:
        assert self._done.wait(WAIT), "the forward did not end"
        if self._error is not None:
            raise self._error
        return self._answers


def forward(dispatcher: Dispatcher, jobs: list[ExpertJob], **kwargs):
    """A forward whose calls end on their own (no gate): its answers and its sorted reports."""
    running = Forward(dispatcher, jobs, **kwargs)
    answers = running.answers()
    return answers, sorted(running.reports, key=lambda r: (r[0], r[1]))


def settle(dispatcher: Dispatcher, predicate, what: str) -> None:
    """Wait until ``predicate()`` holds, then until the dispatcher's loop ends the turn it is in: the
    forward's turn that made it hold (with the clock as it was) is over, and it waits again."""
    wait_until(predicate, WAIT, what, interval=0.005)
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), dispatcher._loop).result(WAIT)


def arrived(server: GatedServer, uid: str, count: int = 1):
    return lambda: server.arrived[uid] >= count


def answered(answers) -> list[tuple[int, list[int]]]:
    return sorted((index, rows.tolist()) for index, rows, _, _ in answers.parts)


def by(answers) -> list[tuple[int, str]]:
    return sorted((index, call.endpoint) for index, _, call, _ in answers.parts)


def test_the_quorum_ends_the_forward_timeout_after_k_min_later(gated, dispatcher, clock):
    """The quorum comes at 0.5 s with the first expert's answer; the forward ends at exactly 0.5 + 0.25 s
    (not a moment later), and the other call is dropped as late, observed with its 0.75 s."""
    first, second, _, _ = gated
    everyone = list(range(TOKENS))
    jobs = [job("q1.0", [first.endpoint], everyone), job("q1.1", [second.endpoint], everyone)]
    running = Forward(dispatcher, jobs, timeout_after_k_min=0.25)
    settle(dispatcher, arrived(second, "q1.1"), "the calls")
    clock.now = START + 0.5
    first.open("q1.0")
    settle(dispatcher, lambda: running.reported("q1.0"), "the first answer")
    assert running.reported("q1.1") == []
    clock.now = START + 0.75  # exactly the quorum's time and timeout_after_k_min
    answers = running.answers()
    assert answered(answers) == [(0, everyone)] and answers.num_failed == 1 and answers.num_retried == 0
    assert answers.num_unneeded == 0
    assert running.reported("q1.0") == [None]
    late, = running.reported("q1.1", second.endpoint)
    assert isinstance(late, Late) and "deadline" in str(late)
    # the late call is observed with its time so far, per token
    assert dispatcher.balancer.measured(second.endpoint, "q1.1") == 0.75 / TOKENS
    assert dispatcher.balancer.measured(first.endpoint, "q1.0") is None  # a new channel's first call
    (_, _, call, output), = answers.parts
    assert call.endpoint == first.endpoint and torch.equal(output, torch.zeros(TOKENS, HIDDEN))


def test_k_min_counts_for_each_token_only_the_candidates_it_has(gated, dispatcher, clock):
    """Tokens 2 and 3 have one candidate: one answer is their quorum; tokens 0 and 1 have three and need
    two: the quorum comes with the second answer (at 1 s), not the first (at 0.5 s)."""
    a, b, c, _ = gated
    jobs = [job("q2.0", [a.endpoint], [0, 1, 2, 3]), job("q2.1", [b.endpoint], [0, 1]),
            job("q2.2", [c.endpoint], [0, 1])]
    running = Forward(dispatcher, jobs, k_min=2, timeout_after_k_min=0.25)
    settle(dispatcher, lambda: a.arrived["q2.0"] and b.arrived["q2.1"] and c.arrived["q2.2"], "the calls")
    clock.now = START + 0.5
    a.open("q2.0")
    settle(dispatcher, lambda: running.reported("q2.0"), "the first answer")
    clock.now = START + 1.0
    b.open("q2.1")
    settle(dispatcher, lambda: running.reported("q2.1"), "the second answer")
    clock.now = START + 1.25
    answers = running.answers()
    assert answered(answers) == [(0, [0, 1, 2, 3]), (1, [0, 1])] and answers.num_failed == 1
    assert [(uid, e is None) for uid, _, e in running.reports] == [("q2.0", True), ("q2.1", True),
                                                                    ("q2.2", False)]
    assert dispatcher.balancer.measured(c.endpoint, "q2.2") == 1.25 / 2


def test_without_a_quorum_the_forward_ends_at_its_timeout(gated, dispatcher, clock):
    first, second, _, _ = gated
    jobs = [job("q3.0", [first.endpoint], [0, 1]), job("q3.1", [second.endpoint], [2, 3])]
    running = Forward(dispatcher, jobs, forward_timeout=0.5, timeout_after_k_min=0.0)
    settle(dispatcher, arrived(second, "q3.1"), "the calls")
    clock.now = START + 0.25
    first.open("q3.0")
    settle(dispatcher, lambda: running.reported("q3.0"), "the first answer")
    assert running.reported("q3.1") == []  # tokens 2 and 3 have no answer: no quorum, no end yet
    clock.now = START + 0.5  # exactly forward_timeout
    answers = running.answers()
    assert answered(answers) == [(0, [0, 1])] and answers.num_failed == 1 and answers.num_unneeded == 0
    late, = running.reported("q3.1")
    assert isinstance(late, Late)
    assert dispatcher.balancer.measured(second.endpoint, "q3.1") == 0.5 / 2


def test_enough_answers_end_the_forward_and_the_others_are_not_failures(gated, servers, dispatcher, clock):
    fast, _ = servers
    held, _, _, _ = gated
    everyone = list(range(TOKENS))
    jobs = [job("q4.0", [fast.endpoint], everyone), job("q4.1", [held.endpoint], everyone)]
    running = Forward(dispatcher, jobs, enough=1)
    answers = running.answers()  # with the held call still running, the clock never moved
    assert answered(answers) == [(0, everyone)]
    assert answers.num_failed == 0 and answers.num_unneeded == 1
    assert running.reports == [("q4.0", fast.endpoint, None)]  # the unneeded call is nobody's failure
    assert dispatcher.balancer.measured(held.endpoint, "q4.1") is None


def test_enough_waits_for_every_token_not_the_first_answer(gated, dispatcher, clock):
    a, b, c, _ = gated
    jobs = [job("q5.0", [a.endpoint], [0, 1]), job("q5.1", [b.endpoint], [2, 3]),
            job("q5.2", [c.endpoint], [0, 1, 2, 3])]
    running = Forward(dispatcher, jobs, enough=1)
    settle(dispatcher, lambda: a.arrived["q5.0"] and b.arrived["q5.1"] and c.arrived["q5.2"], "the calls")
    a.open("q5.0")
    settle(dispatcher, lambda: running.reported("q5.0"), "the first answer")
    b.open("q5.1")
    answers = running.answers()
    assert answered(answers) == [(0, [0, 1]), (1, [0, 1])]  # rows of each job's own sub-batch
    assert answers.num_failed == 0 and answers.num_unneeded == 1
    assert running.reported("q5.2") == []


def test_a_failed_call_fails_over_to_the_best_other_replica(gated, servers, dispatcher, clock):
    """A replica not measured yet is tried before those measured (it might be faster): the dead one
    first. Of the two left, the one expected to finish 4 tokens first gets them: the fast one, though it
    has a queue (3 tokens) and the other none: (3 + 4) x 1 < 4 x 1.9, while (3 + 3) x 1 > 3 x 1.9."""
    fast, _ = servers
    busy = gated[0]
    balancer = dispatcher.balancer
    balancer.observe(fast.endpoint, "q6.0", TOKENS, 1.0 * TOKENS)
    balancer.observe(busy.endpoint, "q6.0", TOKENS, 1.9 * TOKENS)
    replicas = [ExpertRecord(uid="q6.0", endpoint=DEAD, node_id="dead"),
                ExpertRecord(uid="q6.0", endpoint=busy.endpoint, node_id="busy"),
                ExpertRecord(uid="q6.0", endpoint=fast.endpoint, node_id="fast", queued_tokens=3)]
    jobs = [ExpertJob("q6.0", replicas, torch.randn(TOKENS, HIDDEN), torch.arange(TOKENS))]
    answers, reports = forward(dispatcher, jobs)
    assert answered(answers) == [(0, list(range(TOKENS)))] and by(answers) == [(0, fast.endpoint)]
    assert answers.num_failed == 0 and answers.num_retried == 1
    assert [(endpoint, e is None) for _, endpoint, e in reports] == [(DEAD, False), (fast.endpoint, True)]
    assert busy.arrived["q6.0"] == 0
    only_dead, reports = forward(dispatcher, [job("q6.1", [DEAD], [0, 1])])
    assert only_dead.parts == [] and only_dead.num_failed == 1 and only_dead.num_retried == 0
    jobs = [job("q6.2", [], [0, 1]), job("q6.3", [fast.endpoint], [2, 3])]
    nobody, reports = forward(dispatcher, jobs)
    assert answered(nobody) == [(1, [0, 1])] and nobody.num_failed == 1 and len(reports) == 1


def test_a_replica_past_its_patience_gets_a_spare(gated, dispatcher, clock):
    """The first replica is expected to take 0.75 s (its measure): its patience is 4 x that, 3 s. An
    answer of another expert at 2.875 s wakes the forward: no spare yet (4 ** 0.75 would be 2.83 s). At
    exactly 3 s the spare is asked; it answers at once, and the first replica, overtaken at its
    patience, is late."""
    first, spare, other, _ = gated
    balancer = dispatcher.balancer
    balancer.observe(first.endpoint, "q7.0", TOKENS, 0.75)
    balancer.observe(spare.endpoint, "q7.0", TOKENS, 1.0)  # slower: asked second
    jobs = [job("q7.0", [first.endpoint, spare.endpoint], [0, 1, 2, 3]), job("q7.1", [other.endpoint], [0])]
    running = Forward(dispatcher, jobs)
    settle(dispatcher, lambda: first.arrived["q7.0"] and other.arrived["q7.1"], "the calls")
    clock.now = START + 2.875
    other.open("q7.1")
    settle(dispatcher, lambda: running.reported("q7.1"), "the other expert's answer")
    assert balancer.in_flight(spare.endpoint) == 0 and balancer.in_flight(first.endpoint) == TOKENS
    clock.now = START + 3.0  # the forward's timer for the patience fires: the patience is spent
    settle(dispatcher, arrived(spare, "q7.0"), "the spare")
    assert balancer.in_flight(spare.endpoint) == TOKENS
    spare.open("q7.0")  # answers at 3 s too: the first replica is overtaken exactly at its patience
    answers = running.answers()
    assert by(answers) == [(0, spare.endpoint), (1, other.endpoint)]
    assert answers.num_retried == 1 and answers.num_failed == 0
    late, = running.reported("q7.0", first.endpoint)
    assert isinstance(late, Late) and "overtaken" in str(late)
    assert running.reported("q7.0", spare.endpoint) == [None]
    # its time so far (3 s) is observed: a moving average with weight 0.3
    expected = 0.7 * 0.75 / TOKENS + 0.3 * 3.0 / TOKENS
    assert balancer.measured(first.endpoint, "q7.0") == pytest.approx(expected, rel=1e-12)
    wait_until(lambda: balancer.in_flight(first.endpoint) == balancer.in_flight(spare.endpoint) == 0, WAIT,
               "the calls to end")  # the overtaken call too, once cancelled


def test_a_part_gets_one_spare_and_a_failure_with_a_spare_running_fails_over_to_nobody(
        gated, dispatcher, clock):
    """The first replica's patience is the least there is (1 s, its measure says 0.1 s): at 1 s one
    spare is asked, the second replica (the faster of the two left), and no other after it, however long
    the forward waits. The first replica then fails: its rows are with the spare already."""
    first, second, third, other = gated
    balancer = dispatcher.balancer
    balancer.observe(first.endpoint, "q8.0", TOKENS, 0.1)
    balancer.observe(second.endpoint, "q8.0", TOKENS, 2.5 * TOKENS)  # patience 40 s: never here
    balancer.observe(third.endpoint, "q8.0", TOKENS, 5.0 * TOKENS)
    jobs = [job("q8.0", [third.endpoint, second.endpoint, first.endpoint], [0, 1, 2, 3]),
            job("q8.1", [other.endpoint], [0])]
    running = Forward(dispatcher, jobs)
    settle(dispatcher, lambda: first.arrived["q8.0"] and other.arrived["q8.1"], "the calls")
    clock.now = START + 1.0
    other.open("q8.1")  # wakes the forward at 1 s
    settle(dispatcher, arrived(second, "q8.0"), "the spare")
    assert balancer.in_flight(second.endpoint) == TOKENS and balancer.in_flight(third.endpoint) == 0
    clock.now = START + 1.5
    first.open("q8.0", grpc.StatusCode.UNAVAILABLE)
    settle(dispatcher, lambda: running.reported("q8.0", first.endpoint), "the first replica's failure")
    assert balancer.in_flight(third.endpoint) == 0  # no failover: the spare has the rows
    second.open("q8.0")
    answers = running.answers()
    assert by(answers) == [(0, second.endpoint), (1, other.endpoint)]
    assert answers.num_retried == 1 and answers.num_failed == 0 and third.arrived["q8.0"] == 0
    failure, = running.reported("q8.0", first.endpoint)
    assert status_code(failure) == grpc.StatusCode.UNAVAILABLE


def test_a_spare_overtaken_by_the_first_replica_is_not_blamed(gated, dispatcher, clock):
    """The spare's endpoint is measured, but not for this expert: it has no patience of its own, and
    the first replica answering before it is no failure of it (its call is cancelled, not observed)."""
    first, spare, other, _ = gated
    balancer = dispatcher.balancer
    balancer.observe(first.endpoint, "q9.0", TOKENS, 0.1)  # patience 1 s
    balancer.observe(spare.endpoint, "q9.other", TOKENS, 1.0)  # its node's speed only: ranked second
    jobs = [job("q9.0", [spare.endpoint, first.endpoint], [0, 1, 2, 3]), job("q9.1", [other.endpoint], [0])]
    running = Forward(dispatcher, jobs)
    settle(dispatcher, lambda: first.arrived["q9.0"] and other.arrived["q9.1"], "the calls")
    clock.now = START + 1.0
    other.open("q9.1")
    settle(dispatcher, arrived(spare, "q9.0"), "the spare")
    clock.now = START + 2.0
    first.open("q9.0")
    answers = running.answers()
    assert by(answers) == [(0, first.endpoint), (1, other.endpoint)]
    assert answers.num_retried == 1 and answers.num_failed == 0
    assert running.reported("q9.0", spare.endpoint) == []
    wait_until(lambda: balancer.in_flight(spare.endpoint) == 0, WAIT, "the spare's call to end")
    assert balancer.measured(spare.endpoint, "q9.0") is None


@pytest.mark.parametrize("past", [0.0, 0.5])
def test_a_patience_that_ends_with_the_step_gets_no_spare(gated, dispatcher, clock, past):
    """The first replica's patience (4 x its expected 1.875 s) ends exactly at the forward's deadline
    (7.5 s): when the clock reads it (or later), no time is left for a spare; the call is late."""
    first, second, _, _ = gated
    uid = f"q11.{past}"
    dispatcher.balancer.observe(first.endpoint, uid, TOKENS, 1.875)
    dispatcher.balancer.observe(second.endpoint, uid, TOKENS, 2.0)  # asked second
    running = Forward(dispatcher, [job(uid, [second.endpoint, first.endpoint], [0, 1, 2, 3])])
    settle(dispatcher, arrived(first, uid), "the call")
    clock.now = START + FORWARD_TIMEOUT + past
    answers = running.answers()
    assert answers.parts == [] and answers.num_failed == 1 and answers.num_retried == 0
    late, = running.reported(uid)
    assert isinstance(late, Late) and "deadline" in str(late)
    assert dispatcher.balancer.in_flight(second.endpoint) == 0 and second.arrived[uid] == 0


def test_a_failover_gets_the_time_left_in_the_step(gated, dispatcher, clock):
    """The first replica fails 0.25 s before the forward's deadline: the second is asked with a timeout of
    those 0.25 s, and its call, held, fails with DEADLINE_EXCEEDED by then (the fake clock has not moved:
    the forward ends because no call is left, not because its time is up)."""
    first, second, _, _ = gated
    dispatcher.balancer.observe(second.endpoint, "q13.0", TOKENS, 1.0)  # measured: asked second
    running = Forward(dispatcher, [job("q13.0", [second.endpoint, first.endpoint], [0, 1, 2, 3])])
    settle(dispatcher, arrived(first, "q13.0"), "the call")
    clock.now = START + FORWARD_TIMEOUT - 0.25
    first.open("q13.0", grpc.StatusCode.UNAVAILABLE)
    answers = running.answers()
    # 0.25 s, as the server sees it (gRPC moves a deadline by some milliseconds): not a second
    assert second.arrived["q13.0"] == 1 and second.remaining["q13.0"] < 0.5
    assert answers.parts == [] and answers.num_failed == 1 and answers.num_retried == 1
    codes = [(endpoint, status_code(e)) for _, endpoint, e in running.reports]
    assert codes == [(first.endpoint, grpc.StatusCode.UNAVAILABLE),
                     (second.endpoint, grpc.StatusCode.DEADLINE_EXCEEDED)]


def token_answered_twice(gated, dispatcher, clock, tag: str, **kwargs) -> tuple[Forward, list[GatedServer]]:
    """Token 0 has three experts and token 1 two; the first two answers are both token 0's, the third
    is token 1's first (at 1 s): every token then has one answer, token 0 more than one. The fourth
    expert (both tokens) never answers."""
    a, b, c, d = gated
    jobs = [job(f"{tag}0", [a.endpoint], [0]), job(f"{tag}1", [b.endpoint], [0]),
            job(f"{tag}2", [c.endpoint], [1]), job(f"{tag}3", [d.endpoint], [0, 1])]
    running = Forward(dispatcher, jobs, num_tokens=2, k_min=1, timeout_after_k_min=0.25, **kwargs)
    settle(dispatcher, lambda: all(s.arrived[j.uid] for s, j in zip(gated, jobs)), "the calls")
    for server, expert in zip((a, b), jobs):
        server.open(expert.uid)
        settle(dispatcher, lambda uid=expert.uid: running.reported(uid), f"the answer of {expert.uid}")
    clock.now = START + 1.0
    c.open(jobs[2].uid)
    settle(dispatcher, lambda: running.reported(jobs[2].uid), "token 1's answer")
    return running, [a, b, c, d]


def test_enough_counts_a_token_answered_more_than_enough_times(gated, dispatcher, clock):
    running, _ = token_answered_twice(gated, dispatcher, clock, "q14.e", enough=1)
    answers = running.answers()  # with every token answered once at least, at once (the clock is still)
    assert answered(answers) == [(0, [0]), (1, [0]), (2, [0])]
    assert answers.num_failed == 0 and answers.num_unneeded == 1 and running.reported("q14.e3") == []


def test_the_quorum_counts_a_token_answered_more_than_k_min_times(gated, dispatcher, clock):
    running, (_, _, _, d) = token_answered_twice(gated, dispatcher, clock, "q14.q")
    clock.now = START + 1.25  # the quorum's time (1 s) and timeout_after_k_min
    answers = running.answers()
    assert answered(answers) == [(0, [0]), (1, [0]), (2, [0])]
    assert answers.num_failed == 1 and answers.num_unneeded == 0
    late, = running.reported("q14.q3")
    assert isinstance(late, Late)
    assert dispatcher.balancer.measured(d.endpoint, "q14.q3") == 1.25 / 2


def test_every_call_that_ended_in_a_wake_up_is_judged_in_it(servers, dispatcher, clock):
    """Two calls whose inputs are not finite fail at once, together (nothing is sent): the forward
    judges both in the one wake-up, even when the clock passes the deadline while it reports the first;
    neither is then dropped as late."""
    fast, _ = servers
    jobs = [job("q15.0", [fast.endpoint], [0, 1]), job("q15.1", [fast.endpoint], [2, 3])]
    for expert in jobs:
        expert.inputs[0, 0] = float("nan")

    def time_passes() -> None:
        clock.now = START + FORWARD_TIMEOUT

    running = Forward(dispatcher, jobs, then=time_passes)
    answers = running.answers()
    assert answers.parts == [] and answers.num_failed == 2 and answers.num_retried == 0
    assert sorted(uid for uid, _, _ in running.reports) == ["q15.0", "q15.1"]
    assert all(isinstance(e, LocalInputError) for _, _, e in running.reports), running.reports
    assert fast.calls["q15.0"] == fast.calls["q15.1"] == 0


def test_a_replica_avoided_now_is_asked_for_nothing(gated, servers, dispatcher, clock):
    """``avoided(endpoint, uid)`` (backed off or quarantined for this expert): the replica is not in the
    plan, not a failover's choice, and not a spot check's, though it would be each time (it is not
    measured, so it ranks before the measured one; a check would hold on it)."""
    fast, _ = servers
    shunned = gated[0]
    dispatcher.balancer.observe(fast.endpoint, "q16.0", TOKENS, 1.0)
    checker = SpotChecker(rate=1.0, tolerance=1e-3, tokens=2, seed=0, quarantine=lambda *suspect: None)
    asked: list[tuple[str, str]] = []

    def avoided(endpoint: str, uid: str) -> bool:
        asked.append((endpoint, uid))
        return endpoint == shunned.endpoint and uid == "q16.0"

    replicas = [DEAD, shunned.endpoint, fast.endpoint]
    answers, reports = forward(dispatcher, [job("q16.0", replicas, [0, 1, 2, 3])], avoided=avoided,
                               spot_check=checker)
    assert by(answers) == [(0, fast.endpoint)] and answers.num_retried == 1 and answers.num_failed == 0
    assert [(endpoint, e is None) for _, endpoint, e in reports] == [(DEAD, False), (fast.endpoint, True)]
    assert checker.running == 0 and shunned.arrived["q16.0"] == 0
    assert (shunned.endpoint, "q16.0") in asked


def test_a_patience_spent_while_the_forward_was_busy_gets_its_spare_at_once(gated, dispatcher, clock):
    """The clock passes the first replica's patience (1 s) while the forward is still handling another
    expert's answer (at 0.5 s): it asks the spare as soon as it is done, without waiting any more."""
    first, spare, other, _ = gated
    balancer = dispatcher.balancer
    balancer.observe(first.endpoint, "q17.0", TOKENS, 0.1)  # patience 1 s
    balancer.observe(spare.endpoint, "q17.0", TOKENS, 1.0)  # asked second

    def busy() -> None:
        clock.now = START + 1.5

    jobs = [job("q17.0", [spare.endpoint, first.endpoint], [0, 1, 2, 3]), job("q17.1", [other.endpoint], [0])]
    running = Forward(dispatcher, jobs, then=busy)
    settle(dispatcher, lambda: first.arrived["q17.0"] and other.arrived["q17.1"], "the calls")
    clock.now = START + 0.5
    other.open("q17.1")
    settle(dispatcher, arrived(spare, "q17.0"), "the spare")
    spare.open("q17.0")
    answers = running.answers()
    assert by(answers) == [(0, spare.endpoint), (1, other.endpoint)] and answers.num_retried == 1
    late, = running.reported("q17.0", first.endpoint)
    assert isinstance(late, Late) and "overtaken" in str(late)


def test_inputs_that_are_not_finite_go_to_nobody(servers, dispatcher):
    fast, _ = servers
    before = fast.calls["ffn.0"]
    bad = job("ffn.0", fast.endpoints, [0, 1])
    bad.inputs[1, 2] = float("nan")
    answers, reports = forward(dispatcher, [bad, job("ffn.1", [fast.endpoint], [2, 3])])
    assert answered(answers) == [(1, [0, 1])] and answers.num_failed == 1 and answers.num_retried == 0
    assert fast.calls["ffn.0"] == before  # neither replica was asked
    assert [(uid, e is None) for uid, _, e in reports] == [("ffn.0", False), ("ffn.1", True)]


def test_a_reply_is_one_tensor_of_the_inputs_shape_with_values_within_the_bound():
    like = torch.zeros(4, 4)
    assert torch.equal(_decoded([serialize(torch.ones(4, 4))], like), torch.ones(4, 4))
    for count in (0, 2):
        with pytest.raises(ValueError, match=f"expected 1 tensor in the reply, got {count}"):
            _decoded([serialize(like)] * count, like)
    for shape in ((2, 8), (8, 2)):
        with pytest.raises(ValueError, match=rf"reply of shape \[{shape[0]}, {shape[1]}\]"):
            _decoded([serialize(torch.zeros(shape))], like)
    _check_values(torch.zeros(0), 0.5)  # nothing in it: nothing above any bound
    _check_values(torch.tensor([-2.0, 2.0]), 2.0)  # at the bound is within it
    assert _within([], 0.0) and _within([torch.zeros(0)], 0.5) and _within([torch.tensor([-2.0, 2.0])], 2.0)
    assert not _within([torch.tensor([2.001])], 2.0)
    with pytest.raises(ValueError, match="above max_reply_abs=2"):
        _check_values(torch.tensor([2.001]), 2.0)


@pytest.mark.parametrize("spread", [1024, HIDDEN])
def test_a_big_sub_batch_is_cut_between_replicas_each_part_its_own_rows(servers, dispatcher, spread):
    """Cut in two parts of ``spread`` rows each: as many as a hidden state has values, too (a part the
    size of anything but its job is still a part)."""
    fast, _ = servers
    dispatcher.balancer = ReplicaBalancer(seed=0, spread_tokens=spread, min_part_tokens=1)
    rows = 2 * spread  # big enough to be shared by two replicas alike
    big = job("ffn.0", fast.endpoints, list(range(rows)))
    answers, _ = forward(dispatcher, [big], num_tokens=rows)
    assert len(answers.parts) == 2 and answers.num_failed == 0
    cut = torch.cat([part_rows for _, part_rows, _, _ in answers.parts])
    assert sorted(cut.tolist()) == list(range(rows))
    for _, part_rows, call, output in answers.parts:
        assert len(part_rows) == spread
        assert torch.equal(call.inputs, big.inputs[part_rows]) and torch.equal(call.token_ids, part_rows)
        assert output.shape == (spread, HIDDEN)


@pytest.mark.parametrize("swapped", [False, True])
def test_an_answer_is_spot_checked_on_another_replica(servers, dispatcher, swapped):
    """Either way round (the other replica's endpoint sorting before or after the one that answered)."""
    first, second = servers[::-1] if swapped else servers
    uid = f"ffn.9{swapped:d}"
    dispatcher.balancer.observe(first.endpoint, uid, TOKENS, 1e-4)  # asked first
    dispatcher.balancer.observe(second.endpoint, uid, TOKENS, 1e-3)
    suspects: list[tuple[str, str, str]] = []
    checker = SpotChecker(rate=1.0, tolerance=1e-3, tokens=2, seed=0,
                          quarantine=lambda *suspect: suspects.append(suspect))
    answers, _ = forward(dispatcher, [job(uid, [first.endpoint, second.endpoint], [0, 1, 2, 3])],
                         spot_check=checker)
    assert [call.endpoint for _, _, call, _ in answers.parts] == [first.endpoint]
    wait_until(lambda: second.calls[uid] == 1 and checker.running == 0, 20, "the spot check")
    assert first.calls[uid] == 1 and suspects == []  # both answer zeros: they agree


def test_an_answer_not_drawn_for_a_check_is_not_checked(gated, servers, dispatcher, clock):
    """At rate 0 no answer is checked, though another replica could check it (it would hold the check)."""
    fast, _ = servers
    held = gated[0]
    dispatcher.balancer.observe(fast.endpoint, "q10.0", TOKENS, 1e-4)  # asked first
    dispatcher.balancer.observe(held.endpoint, "q10.0", TOKENS, 1e-3)
    checker = SpotChecker(rate=0.0, tolerance=1e-3, tokens=2, seed=0, quarantine=lambda *suspect: None)
    answers, _ = forward(dispatcher, [job("q10.0", [fast.endpoint, held.endpoint], [0, 1, 2, 3])],
                         spot_check=checker)
    assert [call.endpoint for _, _, call, _ in answers.parts] == [fast.endpoint]
    assert checker.running == 0 and checker.stats.tokens == 0


def test_a_spot_check_asks_no_replica_that_failed_in_this_forward(servers, dispatcher):
    fast, other = servers
    dispatcher.balancer.observe(fast.endpoint, "ffn.8", TOKENS, 1e-4)  # the dead one, not measured, is first
    dispatcher.balancer.observe(other.endpoint, "ffn.8", TOKENS, 1e-3)
    checker = SpotChecker(rate=1.0, tolerance=1e-3, tokens=2, seed=0, quarantine=lambda *suspect: None)
    replicas = [DEAD, fast.endpoint, other.endpoint]
    answers, reports = forward(dispatcher, [job("ffn.8", replicas, [0, 1, 2, 3])], spot_check=checker)
    assert [call.endpoint for _, _, call, _ in answers.parts] == [fast.endpoint] and answers.num_retried == 1
    wait_until(lambda: other.calls["ffn.8"] == 1 and checker.running == 0, 20, "the spot check")
    assert [endpoint for _, endpoint, e in reports if e is not None] == [DEAD]  # failed once, not asked again


def test_a_refusal_is_judged_once_the_others_are_in_and_other_failures_are_reported_as_they_are(
        servers, dispatcher):
    """INVALID_ARGUMENT (the node refused the request) is judged after the step: a disagreement when
    another node accepted the same step's inputs; a failure of another kind is reported as it is."""
    fast, _ = servers
    fast.refuse.add("ffn.bad")
    try:
        jobs = [job("ffn.0", [fast.endpoint], [0, 1]), job("ffn.bad", [fast.endpoint], [2, 3]),
                job("ffn.2", [DEAD], [0, 3])]
        answers, reports = forward(dispatcher, jobs, k_min=1)
    finally:
        fast.refuse.discard("ffn.bad")
    errors = {uid: e for uid, _, e in reports}
    assert answered(answers) == [(0, [0, 1])] and answers.num_failed == 2
    assert errors["ffn.0"] is None
    assert isinstance(errors["ffn.bad"], Disagreement) and "refused" in str(errors["ffn.bad"])
    assert not isinstance(errors["ffn.2"], Disagreement)
    assert status_code(errors["ffn.2"]) is not None  # the dead node's own gRPC status


def test_an_answer_on_a_channel_already_open_is_observed_with_its_time(gated, dispatcher, clock):
    """The first call to a node (a new channel: it pays for connecting) is not observed; a later one,
    answered 0.5 s after it was sent, is observed by the balancer with exactly that time, per token."""
    first, *_ = gated
    first.open("q14.0")  # answered at once: the channel to the node is open after this forward
    answers, _ = forward(dispatcher, [job("q14.0", [first.endpoint], [0, 1, 2, 3])])
    assert answers.num_failed == 0 and dispatcher.balancer.measured(first.endpoint, "q14.0") is None
    running = Forward(dispatcher, [job("q14.1", [first.endpoint], [0, 1])])
    settle(dispatcher, arrived(first, "q14.1"), "the call")
    clock.now = START + 0.5
    first.open("q14.1")
    answers = running.answers()
    assert answered(answers) == [(0, [0, 1])] and running.reported("q14.1") == [None]
    assert dispatcher.balancer.measured(first.endpoint, "q14.1") == 0.5 / 2


def test_a_step_of_rows_of_other_widths_is_checked_for_finite_values_too():
    """The finiteness check of a step's tensors joins rows of one width as they are, and flattens rows of
    other widths (or other ranks) first: a NaN anywhere among them is found."""
    mixed = [torch.ones(2, HIDDEN), torch.ones(3, HIDDEN + 1), torch.ones(5)]
    assert dispatch._all_finite(mixed)
    mixed[1][2, HIDDEN] = float("nan")
    assert not dispatch._all_finite(mixed)
    same = [torch.ones(2, HIDDEN), torch.ones(3, HIDDEN)]
    assert dispatch._all_finite(same)
    same[1][0, 0] = float("inf")
    assert not dispatch._all_finite(same)
