"""Steps in flight (dmoe.lm.overlap.StepsInFlight): delayed gradients applied in order, exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from dmoe.lm.overlap import StepsInFlight

pytestmark = pytest.mark.timeout(60)
LR = 0.1


def make() -> nn.Module:
    return nn.Linear(4, 1, bias=True)


def gradient(params: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of mean(model(x)^2) at these parameters, computed apart."""
    model = make()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("in_flight", [2, 3])
def test_each_step_is_the_gradient_at_the_parameters_it_started_from_applied_in_order(in_flight):
    torch.manual_seed(0)
    master = make()
    optimizer = torch.optim.SGD(master.parameters(), lr=LR)
    batches = [torch.randn(8, 4) for _ in range(7)]
    started_at: list[list[torch.Tensor]] = []

    def compute(x):
        def run(replica):
            replica(x).square().mean().backward()
            return [p.detach().clone() for p in replica.parameters()]
        return run

    # the expected trajectory: step i starts from the parameters after steps 0..i-in_flight ended
    expected = [p.detach().clone() for p in master.parameters()]
    history = [[p.clone() for p in expected]]
    for i, x in enumerate(batches):
        started_at.append(history[max(0, i - in_flight + 1)])
        grads = gradient(started_at[-1], x)
        expected = [p - LR * g for p, g in zip(expected, grads)]
        history.append([p.clone() for p in expected])

    pipeline = StepsInFlight(master, make, in_flight=in_flight, apply=optimizer.step, predict=False,
                             warmup=0, shorten=False)
    ended = []
    try:
        for x in batches:
            ended += pipeline.submit(compute(x))
            assert pipeline.num_in_flight <= in_flight
        ended += pipeline.drain()
    finally:
        pipeline.close()
    assert len(ended) == len(batches) and pipeline.num_ended == len(batches)
    for seen, wanted in zip(ended, started_at):  # each step ran at the parameters it should have
        for a, b in zip(seen, wanted):
            torch.testing.assert_close(a, b)
    for p, wanted in zip(master.parameters(), expected):
        torch.testing.assert_close(p.detach(), wanted)
        assert p.grad is None


def test_with_prediction_a_step_starts_from_the_master_plus_the_last_update_per_step_in_flight():
    torch.manual_seed(0)
    master = make()
    optimizer = torch.optim.SGD(master.parameters(), lr=LR)
    batches = [torch.randn(8, 4) for _ in range(7)]
    seen: list[list[torch.Tensor]] = []
    history = [[p.detach().clone() for p in master.parameters()]]  # the master after each update

    def apply():
        optimizer.step()
        history.append([p.detach().clone() for p in master.parameters()])

    def compute(x):
        def run(replica):
            replica(x).square().mean().backward()
        return run

    pipeline = StepsInFlight(master, make, in_flight=3, apply=apply, predict=True, warmup=0, shorten=False)
    try:
        for x in batches:
            pipeline.submit(compute(x))
            seen.append([p.detach().clone() for p in pipeline._pending[-1][0].parameters()])
        pipeline.drain()
    finally:
        pipeline.close()
    for i, got in enumerate(seen):
        ended, ahead = max(0, i - 2), min(i, 2)  # updates applied, and steps still in flight, at its start
        want = history[ended]
        if ended >= 1:  # plus the last update, once per step in flight
            want = [p + ahead * (p - q) for p, q in zip(history[ended], history[ended - 1])]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert len(history) == len(batches) + 1


def test_steps_end_in_the_order_they_started_whatever_order_they_finish():
    master = make()
    optimizer = torch.optim.SGD(master.parameters(), lr=LR)
    first_may_end, second_done = threading.Event(), threading.Event()

    def slow(replica):
        assert first_may_end.wait(30)
        replica(torch.ones(1, 4)).sum().backward()
        return "first"

    def fast(replica):
        replica(torch.ones(1, 4)).sum().backward()
        second_done.set()
        return "second"

    pipeline = StepsInFlight(master, make, in_flight=2, apply=optimizer.step, warmup=0)
    try:
        assert pipeline.submit(slow) == []
        assert pipeline.submit(fast) == []
        assert second_done.wait(30)
        assert pipeline.num_in_flight == 2 and pipeline.num_ended == 0  # the second waits for the first
        first_may_end.set()
        assert pipeline.drain() == ["first", "second"]
    finally:
        first_may_end.set()
        pipeline.close()


def test_a_failed_step_raises_and_leaves_the_master_as_it_was():
    master = make()
    before = [p.detach().clone() for p in master.parameters()]
    optimizer = torch.optim.SGD(master.parameters(), lr=LR)

    def broken(replica):
        raise RuntimeError("the experts are gone")

    pipeline = StepsInFlight(master, make, in_flight=2, apply=optimizer.step)
    try:
        pipeline.submit(broken)
        with pytest.raises(RuntimeError, match="the experts are gone"):
            pipeline.drain()
        for p, b in zip(master.parameters(), before):
            torch.testing.assert_close(p.detach(), b)
        # the pipeline goes on with the next steps
        pipeline.submit(lambda replica: replica(torch.ones(1, 4)).sum().backward())
        pipeline.drain()
        assert pipeline.num_ended == 1
        assert not torch.equal(master.weight.detach(), before[0])
    finally:
        pipeline.close()


def test_replicas_must_have_the_masters_parameters():
    with pytest.raises(ValueError, match="at least 2"):
        StepsInFlight(make(), make, in_flight=1, apply=lambda: None)
    with pytest.raises(ValueError, match="differ"):
        StepsInFlight(make(), lambda: nn.Linear(3, 1), in_flight=2, apply=lambda: None)
    with pytest.raises(ValueError, match="warmup"):
        StepsInFlight(make(), make, in_flight=2, apply=lambda: None, warmup=-1)


def expected_run(master: nn.Module, batches: list[torch.Tensor], *, in_flight: int, warmup: int,
                 shorten: bool) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """(the parameters each step starts from, the final parameters) of SGD steps submitted in order:
    before step i starts, the oldest steps end until fewer than 1 (i < warmup) or in_flight are
    pending; with shorten, a step that started with n > 0 others pending has its update divided by n."""
    params = [p.detach().clone() for p in master.parameters()]
    pending: list[tuple[list[torch.Tensor], int]] = []  # (its gradient, steps pending at its start)
    starts = []

    def end_oldest():
        grads, late = pending.pop(0)
        for p, g in zip(params, grads):
            p -= (1 / late if late and shorten else 1.0) * LR * g

    for i, x in enumerate(batches):
        while len(pending) >= (1 if i < warmup else in_flight):
            end_oldest()
        starts.append([p.clone() for p in params])
        pending.append((gradient(params, x), len(pending)))
    while pending:
        end_oldest()
    return starts, params


@pytest.mark.parametrize("in_flight, warmup, shorten", [(2, 3, False), (3, 2, True), (4, 0, True)])
def test_warmup_steps_run_one_at_a_time_and_late_updates_are_shortened(in_flight, warmup, shorten):
    torch.manual_seed(1)
    master = make()
    optimizer = torch.optim.SGD(master.parameters(), lr=LR)
    batches = [torch.randn(8, 4) for _ in range(8)]
    want_starts, want_final = expected_run(master, batches, in_flight=in_flight, warmup=warmup,
                                           shorten=shorten)

    def compute(x):
        def run(replica):
            replica(x).square().mean().backward()
            return [p.detach().clone() for p in replica.parameters()]
        return run

    pipeline = StepsInFlight(master, make, in_flight=in_flight, apply=optimizer.step, predict=False,
                             warmup=warmup, shorten=shorten)
    ended, most_in_flight = [], 0
    try:
        for x in batches:
            ended += pipeline.submit(compute(x))
            most_in_flight = max(most_in_flight, pipeline.num_in_flight)
            if pipeline.num_started <= warmup:  # warming up: the step just started is alone
                assert pipeline.num_in_flight == 1
        ended += pipeline.drain()
    finally:
        pipeline.close()
    assert most_in_flight == in_flight
    for seen, wanted in zip(ended, want_starts, strict=True):
        for a, b in zip(seen, wanted):
            torch.testing.assert_close(a, b)
    for p, wanted in zip(master.parameters(), want_final):
        torch.testing.assert_close(p.detach(), wanted)


def test_the_guess_of_a_late_step_uses_its_shortened_update():
    torch.manual_seed(2)
    master = make()
    optimizer = torch.optim.SGD(master.parameters(), lr=LR)
    history = [[p.detach().clone() for p in master.parameters()]]
    seen = []

    def compute(x):
        def run(replica):
            seen.append([p.detach().clone() for p in replica.parameters()])
            replica(x).square().mean().backward()
        return run

    pipeline = StepsInFlight(master, make, in_flight=3, apply=optimizer.step, predict=True, warmup=0)
    try:
        for x in [torch.randn(8, 4) for _ in range(6)]:
            pipeline.submit(compute(x))
            pipeline._pending[-1][1].result()  # its compute has run (seen holds its start)
            history.append([p.detach().clone() for p in master.parameters()])
        pipeline.drain()
    finally:
        pipeline.close()
    # history[i + 1]: the master when step i started, with two steps in flight; each step from the third
    # on starts after step i - 3 ended, from the master plus twice that step's update: step 5 after step
    # 2, which started two steps late (its update halved: the guess is the halved update, twice)
    assert len(history) == 7
    for i in (3, 4, 5):
        update = [a - b for a, b in zip(history[i + 1], history[i])]
        for got, p, u in zip(seen[i], history[i + 1], update):
            torch.testing.assert_close(got, p + 2 * u)
