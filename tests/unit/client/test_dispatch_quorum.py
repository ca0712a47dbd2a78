"""The dispatcher's quorum (dmoe.client.dispatch.Dispatcher.forward), in-process against real gRPC
expert servers on 127.0.0.1 (tests/support/counting_server.py: each answers zeros of the input's
shape, one at once, one after SLOW seconds): the forward ends timeout_after_k_min after every token
has min(k_min, its candidates) answers, or at forward_timeout; the calls still running then are
failures (Late) of their replicas; with ``enough`` the forward ends once every token has that many
answers and the others are not needed (no failure); a failed call fails over to another replica, a
replica past its patience gets a spare; inputs that are not finite are sent to nobody; a big
sub-batch is cut between replicas; an answer is spot-checked on another replica."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from counting_server import CountingServer

from dmoe.client.balance import ReplicaBalancer
from dmoe.client.dispatch import Dispatcher, ExpertJob, _check_values, _decoded
from dmoe.client.health import Disagreement, Late, status_code
from dmoe.client.spotcheck import SpotChecker
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import serialize
from dmoe.testing.process import wait_until

pytestmark = pytest.mark.timeout(60)
HIDDEN, TOKENS = 4, 4
SLOW = 5.0  # seconds before the slow server answers: a forward that waits for it has failed its test
DEAD = "127.0.0.1:1"  # nothing listens there: a call fails at once


@pytest.fixture(scope="module")
def servers():
    fast, medium, slow = CountingServer(num_ports=2).start(), CountingServer(delay=0.3).start(), \
        CountingServer(delay=SLOW).start()
    yield fast, medium, slow
    for server in (fast, medium, slow):
        server.shutdown()


@pytest.fixture
def dispatcher():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop, batch_per_node=False, balancer=ReplicaBalancer(seed=0))
    yield dispatcher
    dispatcher.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def job(uid: str, endpoints: list[str], tokens: list[int]) -> ExpertJob:
    replicas = [ExpertRecord(uid=uid, endpoint=e, node_id=f"n-{e}") for e in endpoints]
    return ExpertJob(uid, replicas, torch.randn(len(tokens), HIDDEN), torch.tensor(tokens))


def forward(dispatcher: Dispatcher, jobs: list[ExpertJob], **kwargs):
    reports: list[tuple[str, str, BaseException | None]] = []
    settings = dict(num_tokens=TOKENS, k_min=1, forward_timeout=SLOW * 1.5, timeout_after_k_min=SLOW * 1.5)
    started = time.monotonic()
    answers = dispatcher.forward(jobs, on_result=lambda call, e: reports.append((call.uid, call.endpoint, e)),
                                 **{**settings, **kwargs})
    return answers, sorted(reports, key=lambda r: (r[0], r[1])), time.monotonic() - started


def answered(answers) -> list[tuple[int, list[int]]]:
    return sorted((index, rows.tolist()) for index, rows, _, _ in answers.parts)


def test_the_quorum_ends_the_forward_timeout_after_k_min_later(servers, dispatcher):
    fast, _, slow = servers
    everyone = list(range(TOKENS))
    jobs = [job("ffn.0", [fast.endpoint], everyone), job("ffn.1", [slow.endpoint], everyone)]
    answers, reports, took = forward(dispatcher, jobs, k_min=1, timeout_after_k_min=0.2)
    assert 0.2 <= took < SLOW
    assert answered(answers) == [(0, everyone)] and answers.num_failed == 1 and answers.num_retried == 0
    assert [(uid, e is None) for uid, _, e in reports] == [("ffn.0", True), ("ffn.1", False)]
    assert isinstance(reports[1][2], Late) and "deadline" in str(reports[1][2])
    # the late call is observed with its time so far, between the quorum's 0.2 s and SLOW, per token
    assert 0.2 / TOKENS <= dispatcher.balancer.measured(slow.endpoint, "ffn.1") < SLOW / TOKENS
    (_, _, call, output), = answers.parts
    assert call.endpoint == fast.endpoint and torch.equal(output, torch.zeros(TOKENS, HIDDEN))


def test_k_min_counts_for_each_token_only_the_candidates_it_has(servers, dispatcher):
    """Tokens 2 and 3 have one candidate: one answer is their quorum; tokens 0 and 1 have three and need
    two: the quorum comes with the medium server's answer, not the slow one's."""
    fast, medium, slow = servers
    jobs = [job("ffn.0", [fast.endpoint], [0, 1, 2, 3]), job("ffn.1", [medium.endpoint], [0, 1]),
            job("ffn.2", [slow.endpoint], [0, 1])]
    answers, reports, took = forward(dispatcher, jobs, k_min=2, timeout_after_k_min=0.2)
    assert 0.5 <= took < SLOW
    assert answered(answers) == [(0, [0, 1, 2, 3]), (1, [0, 1])] and answers.num_failed == 1
    assert [uid for uid, _, e in reports if e is not None] == ["ffn.2"]


def test_without_a_quorum_the_forward_ends_at_its_timeout(servers, dispatcher):
    fast, _, slow = servers
    jobs = [job("ffn.0", [fast.endpoint], [0, 1]), job("ffn.1", [slow.endpoint], [2, 3])]
    answers, reports, took = forward(dispatcher, jobs, k_min=1, forward_timeout=0.6, timeout_after_k_min=0.0)
    assert 0.6 <= took < SLOW
    assert answered(answers) == [(0, [0, 1])] and answers.num_failed == 1 and answers.num_unneeded == 0
    assert isinstance(reports[1][2], Late)


def test_enough_answers_end_the_forward_and_the_others_are_not_failures(servers, dispatcher):
    fast, _, slow = servers
    everyone = list(range(TOKENS))
    jobs = [job("ffn.0", [fast.endpoint], everyone), job("ffn.1", [slow.endpoint], everyone)]
    answers, reports, took = forward(dispatcher, jobs, k_min=1, enough=1, timeout_after_k_min=SLOW * 1.5)
    assert took < SLOW
    assert answered(answers) == [(0, everyone)]
    assert answers.num_failed == 0 and answers.num_unneeded == 1
    assert reports == [("ffn.0", fast.endpoint, None)]  # the unneeded call is nobody's failure


def test_enough_waits_for_every_token_not_the_first_answer(servers, dispatcher):
    fast, medium, slow = servers
    jobs = [job("ffn.0", [fast.endpoint], [0, 1]), job("ffn.1", [medium.endpoint], [2, 3]),
            job("ffn.2", [slow.endpoint], [0, 1, 2, 3])]
    answers, reports, took = forward(dispatcher, jobs, k_min=1, enough=1, timeout_after_k_min=SLOW * 1.5)
    assert 0.3 <= took < SLOW
    assert answered(answers) == [(0, [0, 1]), (1, [0, 1])]  # rows of each job's own sub-batch
    assert answers.num_failed == 0 and answers.num_unneeded == 1


def test_a_failed_call_fails_over_to_another_replica(servers, dispatcher):
    fast, _, _ = servers
    # a replica not measured yet is tried before those measured (it might be faster): the dead one first
    dispatcher.balancer.observe(fast.endpoint, "ffn.0", TOKENS, 1.0)
    answers, reports, _ = forward(dispatcher, [job("ffn.0", [DEAD, fast.endpoint], list(range(TOKENS)))])
    assert answered(answers) == [(0, list(range(TOKENS)))]
    assert answers.num_failed == 0 and answers.num_retried == 1
    assert [(endpoint, e is None) for _, endpoint, e in reports] == [(DEAD, False), (fast.endpoint, True)]
    only_dead, reports, _ = forward(dispatcher, [job("ffn.0", [DEAD], [0, 1])])
    assert only_dead.parts == [] and only_dead.num_failed == 1 and only_dead.num_retried == 0
    jobs = [job("ffn.0", [], [0, 1]), job("ffn.1", [fast.endpoint], [2, 3])]
    nobody, reports, _ = forward(dispatcher, jobs)
    assert answered(nobody) == [(1, [0, 1])] and nobody.num_failed == 1 and len(reports) == 1


def test_a_replica_past_its_patience_gets_a_spare(servers, dispatcher):
    """The slow replica is expected to take 0.75 s (its measure): its patience is 4 x that, 3 s; the fast
    one is measured slower, so it is asked second. Another expert's answer wakes the forward at once:
    no spare before the patience is spent."""
    fast, _, slow = servers
    patience = 3.0
    dispatcher.balancer.observe(slow.endpoint, "ffn.0", TOKENS, patience / 4)
    dispatcher.balancer.observe(fast.endpoint, "ffn.0", TOKENS, 1.0)
    jobs = [job("ffn.0", [slow.endpoint, fast.endpoint], [0, 1, 2, 3]), job("ffn.1", [fast.endpoint], [0])]
    answers, reports, took = forward(dispatcher, jobs)
    assert patience <= took < SLOW
    assert sorted((index, call.endpoint) for index, _, call, _ in answers.parts) == [(0, fast.endpoint),
                                                                                   (1, fast.endpoint)]
    assert answers.num_retried == 1 and answers.num_failed == 0
    late = [e for _, endpoint, e in reports if endpoint == slow.endpoint]
    assert len(late) == 1 and isinstance(late[0], Late) and "overtaken" in str(late[0])
    # its time so far (between its patience and SLOW) is observed: a moving average with weight 0.3
    before = patience / 4 / TOKENS
    low, high = 0.7 * before + 0.3 * patience / TOKENS, 0.7 * before + 0.3 * SLOW / TOKENS
    assert low <= dispatcher.balancer.measured(slow.endpoint, "ffn.0") < high


def test_inputs_that_are_not_finite_go_to_nobody(servers, dispatcher):
    fast, _, _ = servers
    before = fast.calls["ffn.0"]
    bad = job("ffn.0", fast.endpoints, [0, 1])
    bad.inputs[1, 2] = float("nan")
    answers, reports, _ = forward(dispatcher, [bad, job("ffn.1", [fast.endpoint], [2, 3])])
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
    with pytest.raises(ValueError, match="above max_reply_abs=2"):
        _check_values(torch.tensor([2.001]), 2.0)


def test_a_big_sub_batch_is_cut_between_replicas_each_part_its_own_rows(servers, dispatcher):
    fast, _, _ = servers
    rows = 2 * dispatcher.balancer.spread_tokens  # big enough to be shared by two replicas alike
    big = job("ffn.0", fast.endpoints, list(range(rows)))
    answers, _, _ = forward(dispatcher, [big], num_tokens=rows)
    assert len(answers.parts) == 2 and answers.num_failed == 0
    cut = torch.cat([part_rows for _, part_rows, _, _ in answers.parts])
    assert sorted(cut.tolist()) == list(range(rows))
    for _, part_rows, call, output in answers.parts:
        assert torch.equal(call.inputs, big.inputs[part_rows]) and torch.equal(call.token_ids, part_rows)
        assert output.shape == (len(part_rows), HIDDEN)


def test_an_answer_is_spot_checked_on_another_replica(servers, dispatcher):
    fast, medium, _ = servers
    dispatcher.balancer.observe(fast.endpoint, "ffn.9", TOKENS, 1e-4)  # asked first
    dispatcher.balancer.observe(medium.endpoint, "ffn.9", TOKENS, 1e-3)
    suspects: list[tuple[str, str, str]] = []
    checker = SpotChecker(rate=1.0, tolerance=1e-3, tokens=2, seed=0,
                          quarantine=lambda *suspect: suspects.append(suspect))
    answers, _, _ = forward(dispatcher, [job("ffn.9", [fast.endpoint, medium.endpoint], [0, 1, 2, 3])],
                            spot_check=checker)
    assert [call.endpoint for _, _, call, _ in answers.parts] == [fast.endpoint]
    wait_until(lambda: medium.calls["ffn.9"] == 1 and checker.running == 0, 20, "the spot check")
    assert fast.calls["ffn.9"] == 1 and suspects == []  # both answer zeros: they agree


def test_a_spot_check_asks_no_replica_that_failed_in_this_forward(servers, dispatcher):
    fast, medium, _ = servers
    dispatcher.balancer.observe(fast.endpoint, "ffn.8", TOKENS, 1e-4)  # the dead one, not measured, is first
    dispatcher.balancer.observe(medium.endpoint, "ffn.8", TOKENS, 1e-3)
    checker = SpotChecker(rate=1.0, tolerance=1e-3, tokens=2, seed=0, quarantine=lambda *suspect: None)
    replicas = [DEAD, fast.endpoint, medium.endpoint]
    answers, reports, _ = forward(dispatcher, [job("ffn.8", replicas, [0, 1, 2, 3])], spot_check=checker)
    assert [call.endpoint for _, _, call, _ in answers.parts] == [fast.endpoint] and answers.num_retried == 1
    wait_until(lambda: medium.calls["ffn.8"] == 1 and checker.running == 0, 20, "the spot check")
    assert [endpoint for _, endpoint, e in reports if e is not None] == [DEAD]  # failed once, not asked again


def test_a_refusal_is_judged_once_the_others_are_in_and_other_failures_are_reported_as_they_are(
        servers, dispatcher):
    """INVALID_ARGUMENT (the node refused the request) is judged after the step: a disagreement when
    another node accepted the same step's inputs; a failure of another kind is reported as it is."""
    fast, _, _ = servers
    fast.refuse.add("ffn.bad")
    try:
        jobs = [job("ffn.0", [fast.endpoint], [0, 1]), job("ffn.bad", [fast.endpoint], [2, 3]),
                job("ffn.2", [DEAD], [0, 3])]
        answers, reports, _ = forward(dispatcher, jobs, k_min=1)
    finally:
        fast.refuse.discard("ffn.bad")
    errors = {uid: e for uid, _, e in reports}
    assert answered(answers) == [(0, [0, 1])] and answers.num_failed == 2
    assert errors["ffn.0"] is None
    assert isinstance(errors["ffn.bad"], Disagreement) and "refused" in str(errors["ffn.bad"])
    assert not isinstance(errors["ffn.2"], Disagreement)
    assert status_code(errors["ffn.2"]) is not None  # the dead node's own gRPC status
