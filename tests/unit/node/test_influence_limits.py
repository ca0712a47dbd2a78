"""One peer's influence on an expert, in process: the step budget and share cap per peer
(InfluenceLimits), the backward that keeps some rows out of the step, and the runtime between them."""

from __future__ import annotations

import concurrent.futures
import logging

import pytest
import torch
from swarm_fixtures import wait_for

from dmoe.core.experts import create_expert
from dmoe.errors import ConfigError
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.influence import BURST_SECONDS, InfluenceLimits
from dmoe.node.runtime import Runtime, Task

pytestmark = pytest.mark.timeout(60)
HIDDEN = 16
LR = 1e-3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backend(uid: str = "ffn.0") -> ExpertBackend:
    module, input_schema = create_expert("ffn", uid=uid, hidden_dim=HIDDEN)
    return ExpertBackend(
        uid, module=module, input_schema=input_schema, device=torch.device("cpu"),
        make_optimizer=lambda params: torch.optim.Adam(params, lr=LR), expert_cls="ffn",
        optimizer_name="adam", max_grad_norm=1.0, max_batch_tokens=4096,
    )


def local_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               grad: torch.Tensor) -> torch.Tensor:
    """What the node's backward does, locally: input gradients, clipping, one Adam step."""
    leaf = x.detach().clone().requires_grad_()
    module(leaf).backward(grad)
    torch.nn.utils.clip_grad_norm_(list(module.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return leaf.grad


def take(limits: InfluenceLimits, peer: str, tokens: int = 1, uid: str = "ffn.0") -> bool:
    """One Backward of ``peer`` alone in its batch: charged one step if allowed."""
    (ok,) = limits.allowed(uid, [peer])
    if ok:
        limits.charge(uid, {peer: tokens})
    else:
        limits.skip(uid, peer)
    return ok


# ---- the budget and the share -------------------------------------------------------------------
def test_a_lone_peer_gets_its_burst_then_the_budget_rate():
    clock = Clock()
    limits = InfluenceLimits(steps_per_minute=60, max_share=0.5, clock=clock)
    burst = 60 * BURST_SECONDS / 60
    assert sum(take(limits, "attacker") for _ in range(100)) == burst  # the share cap does not apply alone
    clock.now += 30  # 30 s at one step a second
    assert sum(take(limits, "attacker") for _ in range(100)) == burst  # refilled to the burst, no more
    for _ in range(20):  # then one every second, however often it calls
        clock.now += 1
        assert [take(limits, "attacker") for _ in range(5)] == [True, False, False, False, False]
    assert limits.stats("ffn.0")["attacker"].steps == 2 * burst + 20
    assert take(limits, "someone else")  # budgets are per peer ...
    assert take(limits, "attacker", uid="ffn.1")  # ... and per expert


def test_no_budget_and_no_cap_allow_everything():
    limits = InfluenceLimits(steps_per_minute=0, max_share=1, clock=Clock())
    assert all(take(limits, "attacker") for _ in range(10_000))
    assert limits.stats("ffn.0")["attacker"].steps == 10_000


def test_honest_peers_are_never_held_back_and_the_attacker_gets_at_most_their_share():
    clock = Clock()
    limits = InfluenceLimits(steps_per_minute=600, max_share=0.5, clock=clock)
    honest = 0
    for _ in range(1200):  # two minutes: 4 honest peers at 2 steps/s each, the attacker calling 100/s
        clock.now += 0.1
        if round(clock.now * 10) % 5 == 0:
            for peer in ("h1", "h2", "h3", "h4"):
                honest += take(limits, peer)
        for _ in range(10):
            take(limits, "attacker")
    assert honest == 4 * 2 * 120
    # in the last minute (decayed sums) the budget would allow the attacker 600 steps; the cap allows
    # as many as the honest peers' together (480 a minute), half of the expert's steps
    recent = limits.stats("ffn.0")
    honest_recent = sum(recent[h].recent for h in ("h1", "h2", "h3", "h4"))
    assert recent["attacker"].recent == pytest.approx(honest_recent, abs=2)
    uncapped = attack_beside_a_slow_peer(max_share=1).stats("ffn.0")["attacker"]
    assert recent["attacker"].recent < 0.9 * uncapped.recent


def attack_beside_a_slow_peer(max_share: float) -> InfluenceLimits:
    clock = Clock()
    limits = InfluenceLimits(steps_per_minute=600, max_share=max_share, clock=clock)
    for second in range(180):  # one honest peer at a step every 2 s; the attacker calling 20/s
        clock.now += 1
        if second % 2 == 0:
            assert take(limits, "honest")
        for _ in range(20):
            take(limits, "attacker")
    return limits


def test_the_share_cap_binds_down_to_its_floor_when_the_others_are_slow():
    alone = attack_beside_a_slow_peer(max_share=1).stats("ffn.0")["attacker"]
    capped = attack_beside_a_slow_peer(max_share=0.5).stats("ffn.0")["attacker"]
    assert alone.recent == pytest.approx(600, rel=0.05)  # the budget alone: 600 a minute
    # the cap: its share of the last minute's steps at most half, but never below half the budget,
    # 300 a minute (the honest peer's 30 would allow 30)
    assert capped.recent == pytest.approx(300, abs=2)
    assert capped.steps < 0.65 * alone.steps


def default_limits(clock: Clock) -> InfluenceLimits:
    config = NodeConfig()
    return InfluenceLimits(steps_per_minute=config.peer_steps_per_minute,
                           max_share=config.max_peer_step_share, clock=clock)


def train(limits: InfluenceLimits, clock: Clock, rates: dict[str, float], seconds: float
          ) -> tuple[dict[str, int], dict[str, int]]:
    """Peers calling Backward at steady rates (steps a second), interleaved in time: each peer's
    calls, and its updates kept."""
    calls, kept = dict.fromkeys(rates, 0), dict.fromkeys(rates, 0)
    due = dict.fromkeys(rates, clock.now)
    end = clock.now + seconds
    while due[peer := min(due, key=due.__getitem__)] < end:
        clock.now = due[peer]
        calls[peer] += 1
        kept[peer] += take(limits, peer)
        due[peer] += 1 / rates[peer]
    return calls, kept


def test_the_default_limits_never_hold_back_honest_training():
    """The defaults are sized for real training: a lone fast trainer (a demo step is ~45 ms), trainers
    at unequal rates (the cap's floor is half the budget, 25 a second), several trainer processes
    behind one address, each for three minutes: every update kept, none skipped."""
    for rates in ({"trainer": 22}, {"trainer": 45}, {"a": 15, "b": 5}, {"a": 24, "b": 1, "c": 0.2}):
        clock = Clock()
        limits = default_limits(clock)
        calls, kept = train(limits, clock, rates, 180)
        assert kept == calls, rates
        assert all(abs(calls[peer] - rate * 180) <= 1 for peer, rate in rates.items()), calls
        assert limits.skipped("ffn.0") == 0 and all(a.skipped == 0 for a in limits.stats("ffn.0").values())


def test_a_trickle_from_another_peer_cuts_a_lone_trainer_to_the_floor_at_most():
    def run(rate: float, trickle: bool) -> int:
        clock = Clock()
        limits = default_limits(clock)
        trained = 0
        for step in range(int(180 * rate)):  # three minutes at ``rate`` steps a second
            clock.now += 1 / rate
            trained += take(limits, "trainer")
            if trickle and step % int(10 * rate) == 0:  # two calls from someone else every 10 s
                take(limits, "stray")
                take(limits, "stray")
        return trained

    assert run(45, trickle=False) == 45 * 180  # alone, under the budget: every step
    assert run(22, trickle=True) == 22 * 180  # under the floor (1500 a minute): every step
    cut = run(45, trickle=True)  # above the floor: cut to about 25 a second, not to the trickle's rate
    assert 25 * 180 * 0.95 < cut < 45 * 180


def test_skipped_updates_are_counted_per_expert_and_logged_once_a_minute_per_peer(caplog):
    clock = Clock()
    limits = InfluenceLimits(steps_per_minute=6, max_share=1, clock=clock)  # a burst of 1 step
    with caplog.at_level(logging.WARNING, logger="dmoe.node.influence"):
        assert [take(limits, "attacker") for _ in range(5)] == [True, False, False, False, False]
        assert take(limits, "other")
        clock.now += 61  # the bucket refills by one step a second, up to its burst of 1
        assert [take(limits, "attacker") for _ in range(3)] == [True, False, False]
    assert limits.skipped("ffn.0") == 6 and limits.skipped("ffn.1") == 0
    assert limits.stats("ffn.0")["attacker"].skipped == 6
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and all("peer_steps_per_minute=6" in line for line in logged), logged


def test_the_peer_table_is_bounded(monkeypatch):
    monkeypatch.setattr("dmoe.node.influence.MAX_PEERS", 50)
    limits = InfluenceLimits(steps_per_minute=60, max_share=0.5, clock=Clock())
    for i in range(500):
        take(limits, f"peer{i}")
    assert len(limits.stats("ffn.0")) == 50


def test_the_limits_are_options_refused_when_out_of_range():
    assert NodeConfig().peer_steps_per_minute > 0 and 0 < NodeConfig().max_peer_step_share < 1
    for bad in (dict(peer_steps_per_minute=-1), dict(max_peer_step_share=0), dict(max_peer_step_share=2)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            NodeConfig(**bad)


def test_bad_settings_are_refused():
    for steps, share in ((-1, 0.5), (60, 0), (60, 1.5)):
        with pytest.raises(ValueError):
            InfluenceLimits(steps_per_minute=steps, max_share=share)


# ---- the backward that keeps rows out of the step ------------------------------------------------
def test_rows_kept_out_get_input_gradients_but_do_not_update():
    expert = backend()
    local, _ = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN)
    local_opt = torch.optim.Adam(local.parameters(), lr=LR)
    x, grad = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN)
    update = torch.tensor([True, True, False, True, False, False])

    with torch.no_grad():  # every row's input gradient is the full backward's
        reference = torch.func.vjp(local, x)[1](grad)[0]
    grads = expert.backward([x], [grad], update)[0]
    torch.testing.assert_close(grads, reference)
    # the parameters took exactly one step with the kept rows alone
    local_step(local, local_opt, x[update], grad[update])
    for mine, theirs in zip(expert.module.parameters(), local.parameters()):
        torch.testing.assert_close(mine, theirs)
    assert expert.version == 1

    before = [p.detach().clone() for p in expert.module.parameters()]
    grads = expert.backward([x], [grad], torch.zeros(6, dtype=torch.bool))  # no row updates: no step
    with torch.no_grad():
        torch.testing.assert_close(grads[0], torch.func.vjp(local, x)[1](grad)[0])
    assert expert.version == 1
    assert all(torch.equal(a, b) for a, b in zip(before, expert.module.parameters()))


# ---- the runtime ---------------------------------------------------------------------------------
def task(x: torch.Tensor, grad: torch.Tensor, peer: str) -> Task:
    # copies: on the CPU the backend makes its inputs leaves of its graph, as the node's decoded ones are
    return Task([x.clone()], [grad.clone()], x.shape[0], x.shape[0], concurrent.futures.Future(), peer=peer)


def test_a_peer_over_its_budget_stops_moving_the_expert_while_another_still_trains_it():
    limits = InfluenceLimits(steps_per_minute=6, max_share=1, clock=Clock())  # a burst of 1 step
    expert = backend()
    runtime = Runtime({"ffn.0": expert}, max_batch_tokens=4096, max_queued_tokens=4096, batching=True,
                      influence=limits)
    local, _ = create_expert("ffn", uid="ffn.0", hidden_dim=HIDDEN)
    local_opt = torch.optim.Adam(local.parameters(), lr=LR)
    runtime.start()
    try:
        x_a, g_a = torch.randn(2, HIDDEN), torch.full((2, HIDDEN), 1e-4)
        t = runtime.submit("ffn.0", task(x_a, g_a, "attacker"))
        torch.testing.assert_close(t.result(30)[0], local_step(local, local_opt, x_a, g_a))
        for _ in range(20):  # over the budget: answered, and the expert does not move
            t = runtime.submit("ffn.0", task(x_a, g_a, "attacker"))
            with torch.no_grad():
                torch.testing.assert_close(t.result(30)[0], torch.func.vjp(local, x_a)[1](g_a)[0])
        assert expert.version == 1
        for mine, theirs in zip(expert.module.parameters(), local.parameters()):
            torch.testing.assert_close(mine, theirs)
        # a batch shared by the attacker (over budget) and an honest peer steps with the honest rows only
        x_h, g_h = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
        runtime.shutdown(10)  # queue both before the thread runs again, so that they share a batch
        runtime = Runtime({"ffn.0": expert}, max_batch_tokens=4096, max_queued_tokens=4096, batching=True,
                          influence=limits)
        attack = runtime.submit("ffn.0", task(x_a, g_a, "attacker"))
        honest = runtime.submit("ffn.0", task(x_h, g_h, "honest"))
        runtime.start()
        with torch.no_grad():
            expected_attack = torch.func.vjp(local, x_a)[1](g_a)[0]
        expected_honest = local_step(local, local_opt, x_h, g_h)
        torch.testing.assert_close(attack.result(30)[0], expected_attack)
        torch.testing.assert_close(honest.result(30)[0], expected_honest)
        # the callers are answered before the step, which ends before the batch is counted
        wait_for(lambda: runtime.num_batches == 1, 30, "the step after the answers")
        assert expert.version == 2
        for mine, theirs in zip(expert.module.parameters(), local.parameters()):
            torch.testing.assert_close(mine, theirs)
        stats = limits.stats("ffn.0")
        assert (stats["attacker"].steps, stats["attacker"].skipped) == (1, 21)
        assert (stats["honest"].steps, stats["honest"].skipped) == (1, 0)
    finally:
        runtime.shutdown(10)


def test_peers_sharing_a_step_pay_by_their_tokens():
    limits = InfluenceLimits(steps_per_minute=600, max_share=1, clock=Clock())
    runtime = Runtime({"ffn.0": backend()}, max_batch_tokens=4096, max_queued_tokens=4096, batching=True,
                      influence=limits)
    tasks = [task(torch.randn(n, HIDDEN), torch.randn(n, HIDDEN), peer) for n, peer in ((1, "a"), (3, "b"))]
    for t in tasks:
        runtime.submit("ffn.0", t)
    runtime.start()
    for t in tasks:
        t.future.result(30)
    runtime.shutdown(10)
    stats = limits.stats("ffn.0")
    assert (stats["a"].steps, stats["b"].steps) == (0.25, 0.75)
