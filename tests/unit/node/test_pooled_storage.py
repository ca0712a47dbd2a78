"""Pooled storage of grouped experts (dmoe.node.pool): a pooled expert's parameters and Adam state are views
of its pool's rows, so what reads or writes them in place (its own calls, torch's own step, averaging)
and what replaces them (checkpoint loads, state transfer, a parameter given new storage) must leave a
grouped expert exactly where the same expert run alone would be."""

from __future__ import annotations

import concurrent.futures
import gc
import sys
import threading

import pytest
import torch
from pooled_experts import HIDDEN, adopted, backend
from swarm_fixtures import wait_for
from torch.utils._python_dispatch import TorchDispatchMode

from dmoe.node import grouped
from dmoe.node.averaging import blend
from dmoe.node.backend import ExpertBackend
from dmoe.node.pool import MIN_CHUNK, Pool
from dmoe.node.runtime import Runtime, Task

pytestmark = pytest.mark.timeout(60)


def batch(generator: torch.Generator, rows: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.randn(rows, HIDDEN, generator=generator)], [torch.randn(rows, HIDDEN, generator=generator)]


def group_step(members: list[ExpertBackend], batches: list[tuple[list, list]]) -> list[list[torch.Tensor]]:
    replies: list = []
    assert grouped.backward(members, [x for x, _ in batches], [g for _, g in batches],
                            reply=replies.append) == [True] * len(members)
    return replies[0]


def assert_same(a: ExpertBackend, b: ExpertBackend) -> None:
    """The same parameters, optimizer state (as a checkpoint holds it) and version."""
    a_tensors, a_meta = a.state_tensors()
    b_tensors, b_meta = b.state_tensors()
    assert a_meta["version"] == b_meta["version"] and a_tensors.keys() == b_tensors.keys()
    for name in a_tensors:
        torch.testing.assert_close(a_tensors[name], b_tensors[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_grouped_expert_keeps_its_state_in_its_pool_row_and_matches_one_run_alone():
    members = [backend(f"p.{i}") for i in range(4)]
    alone = backend("p.1")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        batches = [batch(generator) for _ in members]
        group_step(members, batches)
        alone.backward(*batches[1])
    pooled = members[1].pooled
    assert pooled is not None
    storage = pooled.chunk.params.untyped_storage().data_ptr()
    params = list(members[1].module.parameters())
    assert all(p.untyped_storage().data_ptr() == storage for p in params)
    for p in params:  # torch keeps the state where it always does, its tensors views of the pool's rows
        state = members[1].optimizer.state[p]
        for slot, pooled_tensor in (("exp_avg", pooled.chunk.exp_avg), ("step", pooled.chunk.steps)):
            assert state[slot].untyped_storage().data_ptr() == pooled_tensor.untyped_storage().data_ptr()
    assert_same(members[1], alone)


def test_steps_alone_between_grouped_steps_and_before_the_first_write_into_the_same_state():
    """Torch's own step on the pooled views (a member that runs alone) and a member that stepped alone
    before it was ever grouped (its state torch's own, taken into the pool) give what steps alone give."""
    members = [backend(f"q.{i}") for i in range(3)]
    reference = [backend(f"q.{i}") for i in range(3)]
    generator = torch.Generator().manual_seed(1)
    first = batch(generator)
    members[2].backward(*first)  # stepped alone before any group
    reference[2].backward(*first)
    for step in range(4):
        batches = [batch(generator) for _ in members]
        if step == 2:  # each runs alone this time, through torch's own Adam on the pooled tensors
            for member, ref, b in zip(members, reference, batches):
                member.backward(*b)
                ref.backward(*b)
            continue
        replies = group_step(members, batches)
        for ref, b, reply in zip(reference, batches, replies):
            torch.testing.assert_close(reply[0], ref.backward(*b)[0], rtol=1e-4, atol=1e-6)
    for member, ref in zip(members, reference):
        assert_same(member, ref)


def test_a_checkpoint_or_transferred_state_loaded_into_a_pooled_expert_is_what_it_steps_from():
    members = [backend(f"r.{i}") for i in range(3)]
    donor = backend("r.0")
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        group_step(members, [batch(generator) for _ in members])
    for _ in range(5):  # another history: other parameters, moments and step counts
        donor.backward(*batch(generator))
    tensors, metadata = donor.state_tensors()

    def load(into: ExpertBackend) -> None:  # copies into the parameters, replaces the optimizer's state
        into.load_state_tensors({k: v.clone() for k, v in tensors.items()}, metadata)  # (which keeps them)

    load(members[0])
    loaded = backend("r.0")
    load(loaded)
    assert_same(members[0], loaded)
    for _ in range(2):  # and again: the state it loaded is pooled in turn
        batches = [batch(generator) for _ in members]
        expected = loaded.backward(*batches[0])[0]  # which leaves its inputs requiring grad: no matter
        torch.testing.assert_close(group_step(members, batches)[0][0], expected, rtol=1e-4, atol=1e-6)
        assert_same(members[0], loaded)
        load(members[0])
        load(loaded)


def test_a_blend_and_a_parameter_given_new_storage_reach_the_next_group():
    members = [backend(f"s.{i}") for i in range(3)]
    generator = torch.Generator().manual_seed(3)
    group_step(members, [batch(generator) for _ in members])
    theirs = {k: v + 0.25 for k, v in backend("s.1").module.state_dict().items()}
    blend(members[1], theirs, max_distance=1e9)  # replica averaging moves the parameters in place
    weight = next(members[2].module.parameters())
    with torch.no_grad():
        weight.data = weight.detach() * 2  # new storage: the pool's row no longer holds this parameter
    xs = [batch(generator)[0] for _ in members]
    outputs = grouped.forward(members, xs)
    for member, x, out in zip(members, xs, outputs):
        torch.testing.assert_close(out[0], member.forward(x)[0], rtol=1e-5, atol=1e-6)
    before = weight.detach().clone()
    group_step(members, [batch(generator) for _ in members])
    assert not torch.equal(weight.detach(), before)  # the step reached the parameter as it is now
    assert members[2].pooled is not None
    assert weight.untyped_storage().data_ptr() == members[2].pooled.chunk.params.untyped_storage().data_ptr()


def test_a_group_whose_members_live_in_two_chunks_gathers_and_writes_back_each_in_its_own():
    members = [backend(f"t.{i}", lr=3e-3) for i in range(20)]  # a key of their own: a pool of their own
    reference = [backend(f"t.{i}", lr=3e-3) for i in range(20)]
    generator = torch.Generator().manual_seed(4)
    for group in (members[:3], members):  # three pooled first, in a chunk too small for the later 17
        batches = [batch(generator, 1 + i % 3) for i in range(len(group))]
        replies = group_step(group, batches)
        for ref, b, reply in zip(reference, batches, replies):
            torch.testing.assert_close(reply[0], ref.backward(*b)[0], rtol=1e-4, atol=1e-6)
    chunks = {id(m.pooled.chunk) for m in members if m.pooled is not None}
    assert len(chunks) == 2
    for member, ref in zip(members, reference):
        assert_same(member, ref)


def test_a_dead_experts_row_is_taken_by_the_next():
    members = [backend(f"u.{i}", lr=7e-3) for i in range(2)]
    generator = torch.Generator().manual_seed(5)
    group_step(members, [batch(generator) for _ in members])
    assert members[1].pooled is not None
    chunk, row = members[1].pooled.chunk, members[1].pooled.row
    free = len(chunk.free)
    del members[1]
    gc.collect()
    assert len(chunk.free) == free + 1
    newcomer = backend("u.9", lr=7e-3)
    group_step([members[0], newcomer], [batch(generator) for _ in range(2)])
    assert newcomer.pooled is not None and (newcomer.pooled.chunk, newcomer.pooled.row) == (chunk, row)


def test_a_runtimes_experts_of_one_kind_are_pooled_together_when_the_first_group_runs():
    """Those of the group and the others the runtime hosts (their state moved as it is): one chunk, and
    nothing of theirs kept twice."""
    backends = {f"v.{i}": backend(f"v.{i}", lr=5e-3) for i in range(6)}
    reference = {uid: backend(uid, lr=5e-3) for uid in backends}
    generator = torch.Generator().manual_seed(6)
    first = batch(generator)
    backends["v.5"].backward(*first)  # stepped alone before: torch's own state
    reference["v.5"].backward(*first)
    runtime = Runtime(backends, max_batch_tokens=4096, max_queued_tokens=4096, batching=True, grouping=True)
    xs = [batch(generator) for _ in range(3)]
    futures = [runtime.submit(f"v.{i}", Task(x, g, 3, 3, concurrent.futures.Future()))
               for i, (x, g) in enumerate(xs)]
    runtime.start()
    try:
        for future, uid, (x, g) in zip(futures, backends, xs):
            torch.testing.assert_close(future.result(30)[0], reference[uid].backward(x, g)[0],
                                       rtol=1e-4, atol=1e-6)
        wait_for(lambda: runtime.num_groups == 1 and runtime.num_batches == 3, 30, "the group counted")
    finally:
        runtime.shutdown(10)
    chunks = {id(b.pooled.chunk) for b in backends.values() if b.pooled is not None}
    assert len(chunks) == 1 and all(b.pooled is not None for b in backends.values())
    pooled = backends["v.5"].pooled
    for p in backends["v.5"].module.parameters():
        assert p.untyped_storage().data_ptr() == pooled.chunk.params.untyped_storage().data_ptr()
        moment = backends["v.5"].optimizer.state[p]["exp_avg"]
        assert moment.untyped_storage().data_ptr() == pooled.chunk.exp_avg.untyped_storage().data_ptr()
    for uid in backends:
        assert_same(backends[uid], reference[uid])


def test_one_expert_more_adds_a_fraction_of_the_pool_and_a_chunk_whose_experts_are_gone_is_dropped():
    """A placement move adds an expert before the one it replaces is gone: that must not double the
    memory of the kind; and rows are given back, a whole chunk of them once all its experts are gone."""
    experts = [backend(f"w.{i}", lr=4e-3) for i in range(40)]
    for expert in experts:  # as a runtime does for the experts it hosts
        grouped.group_key(expert)
    generator = torch.Generator().manual_seed(7)
    grouped.forward(experts[:2], [batch(generator)[0] for _ in range(2)])
    pool = experts[0].pooled.pool
    assert [c.params.shape[0] for c in pool.chunks] == [40]  # every expert the node knows, in one chunk
    newcomers = [backend(f"w.new.{i}", lr=4e-3) for i in range(2)]
    grouped.forward([experts[0], newcomers[0]], [batch(generator)[0] for _ in range(2)])
    assert [c.params.shape[0] for c in pool.chunks] == [40, MIN_CHUNK]  # max(16, 1, 40 // 4)
    grouped.forward([experts[0], newcomers[1]], [batch(generator)[0] for _ in range(2)])
    assert [c.params.shape[0] for c in pool.chunks] == [40, MIN_CHUNK]  # its free rows used first
    second = newcomers[0].pooled.chunk
    assert newcomers[1].pooled.chunk is second and len(second.free) == second.params.shape[0] - 2
    del newcomers[0]
    gc.collect()
    assert len(second.free) == second.params.shape[0] - 1 and pool.chunks[1] is second  # one row in use still
    pool.reserve(20)  # room for a group of 20 (max(16, 20, 56 // 4) rows): kept while still unused
    del newcomers[0], second
    gc.collect()
    assert [c.params.shape[0] for c in pool.chunks] == [40, 20]


def test_a_group_pools_the_known_experts_while_experts_are_added_on_another_thread():
    """A group takes a snapshot of the node's experts of its kind on a runtime thread while the event loop
    adds experts (their group keys): neither may break the other."""
    known = [backend(f"x.{i}", lr=6e-3) for i in range(20)]
    for expert in known:
        grouped.group_key(expert)
    pool = grouped._pool_of(known[0])
    grouped._pooled(known[:1], pool, locked=False)  # all pooled now: a later group pools one, quickly
    linear, schema = torch.nn.Linear(HIDDEN, HIDDEN), known[0].input_schema  # a kind that never groups
    added = [ExpertBackend(f"x.added.{i}", module=linear, input_schema=schema, device=torch.device("cpu"),
                           make_optimizer=torch.optim.SGD, expert_cls="linear", optimizer_name="sgd",
                           max_grad_norm=0.0, max_batch_tokens=64) for i in range(6000)]
    errors: list[BaseException] = []
    grouping, done = threading.Event(), threading.Event()

    def add() -> None:
        try:
            assert grouping.wait(10)  # while the groups run
            for expert in added:
                grouped.group_key(expert)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
        finally:
            done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: inside the snapshot
    try:
        adder = threading.Thread(target=add)
        adder.start()
        groups = 0
        while not done.is_set() or groups == 0:
            known[0].pooled = None  # each group finds a member not pooled: a snapshot of the known experts
            grouped._pooled(known[:1], pool, locked=False)
            groups += 1
            grouping.set()
        adder.join(10)
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and groups > 1 and all(grouped.group_key(expert) is None for expert in added)


class _Expansions(TorchDispatchMode):
    """Records the ops that make a tensor of ``full`` elements or more out of smaller ones only (the bias
    corrections, [members, parameters], spread to every element of [members, numel])."""

    def __init__(self, full: int):
        super().__init__()
        self.full = full
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if (isinstance(out, torch.Tensor) and out.numel() >= self.full and inputs
                and all(t.numel() < self.full for t in inputs)):
            self.found.append(str(func))
        return out


def test_the_pooled_adam_step_broadcasts_each_parameters_bias_corrections_and_keeps_torchs_formula():
    """Members of step counts of their own (1, 2 and 3 steps alone before their group): the step is
    torch's formula bit for bit, each parameter's bias corrections applied as numbers, and no
    [members, numel] tensor of them is built (one was, and copied to the device, every step)."""
    members = [backend(f"y.{i}", lr=8e-3) for i in range(3)]
    generator = torch.Generator().manual_seed(8)
    for i, member in enumerate(members):  # a history of its own: 1, 2 and 3 steps
        for _ in range(i + 1):
            member.backward(*batch(generator))
    replies: list = []
    grouped.backward(members, [batch(generator)[0] for _ in members], [batch(generator)[1] for _ in members],
                     reply=replies.append)  # pooled now, state and all
    pool, index = members[0].pooled.pool, grouped.Index([m.pooled for m in members], torch.device("cpu"))
    param, grad = index.gather("params"), torch.randn(len(members), pool.numel, generator=generator)
    before = {what: index.gather(what) for what in ("exp_avg", "exp_avg_sq", "steps")}
    settings = members[0].optimizer.param_groups[0]
    beta1, beta2 = settings["betas"]
    expected = param.clone()
    for m in range(len(members)):  # torch's Adam, one member and parameter at a time, scalars as numbers
        for j, (p, g, avg, sq) in enumerate(zip(*(pool.views(t[m]) for t in (
                expected, grad, before["exp_avg"].clone(), before["exp_avg_sq"].clone())))):
            step = torch.tensor(float(before["steps"][m, j] + 1), dtype=torch.float64)
            step_size = (settings["lr"] / (1 - beta1 ** step)).to(torch.float32)
            correction2_sqrt = (1 - beta2 ** step).sqrt().to(torch.float32)
            avg.lerp_(g, 1 - beta1)
            sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.sub_(step_size * avg / (sq.sqrt() / correction2_sqrt).add_(settings["eps"]))
    recorder = _Expansions(full=len(members) * pool.numel)
    with recorder:
        grouped._pooled_adam(settings, pool, index, param, grad)
    assert recorder.found == []
    assert torch.equal(index.gather("params"), expected)
    assert torch.equal(index.gather("steps"), before["steps"] + 1)


def test_two_experts_pooled_at_once_for_the_last_free_row_each_get_a_row_of_their_own():
    """Rows are taken under the pool's lock: two threads that both find one free row left (held
    together at that point, as far as the lock lets them) do not both take it, and neither fails."""
    first = backend("race.0", lr=6e-3)
    pool = Pool(list(first.module.parameters()))
    kept = [first] + [backend(f"race.{i}", lr=6e-3) for i in range(1, MIN_CHUNK)]
    for expert in kept:
        adopted(pool, expert)
    assert [len(c.free) for c in pool.chunks] == [0]
    pool.reserve(MIN_CHUNK + 1)  # one row free: the last of a new chunk taken but one
    chunk = pool.chunks[-1]
    for expert in [backend(f"race.fill.{i}", lr=6e-3) for i in range(chunk.capacity - 1)]:
        kept.append(expert)
        adopted(pool, expert)
    assert sum(len(c.free) for c in pool.chunks) == 1
    together = threading.Barrier(2, timeout=1.0)
    reserve = pool._reserve

    def reserve_then_meet(count: int) -> None:  # both threads past the count of free rows at once
        reserve(count)
        try:
            together.wait()
        except threading.BrokenBarrierError:  # the lock kept the other one out: it comes after
            pass

    pool._reserve = reserve_then_meet
    racers = [backend(f"race.new.{i}", lr=6e-3) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        members = list(threads.map(lambda b: adopted(pool, b), racers))
    places = {(id(m.chunk), m.row) for m in members}
    assert len(places) == 2
    assert all((id(e.pooled.chunk), e.pooled.row) not in places for e in kept)
