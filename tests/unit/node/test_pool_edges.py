"""Pooled storage (dmoe.node.pool), the edges its first tests left open (found by mutation testing,
``scripts/mutation.sh pool``): the size of a new chunk, an expert pooled again, a row given back while
its pool is busy on the same thread, and which parameters can be pooled."""

from __future__ import annotations

import gc

import pytest
import torch
from pooled_experts import adopted, backend

from dmoe.node.pool import Pool, poolable

pytestmark = pytest.mark.timeout(60)


def test_a_new_chunk_holds_a_quarter_of_the_rows_the_pool_has():
    experts = [backend(f"q.{i}", lr=8e-3) for i in range(100)]
    pool = Pool(list(experts[0].module.parameters()))
    pool.reserve(100)  # room for all of them at once: one chunk of exactly that
    for expert in experts:
        adopted(pool, expert)
    assert [c.capacity for c in pool.chunks] == [100] and not pool.chunks[0].free
    newcomer = backend("q.new", lr=8e-3)
    adopted(pool, newcomer)
    assert [c.capacity for c in pool.chunks] == [100, 25]  # max(MIN_CHUNK, 1, 100 // 4)


def test_an_expert_pooled_again_keeps_its_row_and_is_known_by_its_pool():
    expert = backend("k.0", lr=9e-3)
    params = list(expert.module.parameters())
    pool = Pool(params)
    first = adopted(pool, expert)
    free = sum(len(c.free) for c in pool.chunks)
    assert pool.member(expert, params) is first  # its parameters are its row's views
    again = adopted(pool, expert)
    assert again is first and (again.chunk, again.row) == (first.chunk, first.row)
    assert sum(len(c.free) for c in pool.chunks) == free  # no other row taken
    assert Pool(params).member(expert, params) is None  # another pool does not know it
    expert.module.up.weight.data = expert.module.up.weight.data.clone()  # a parameter given new storage
    assert pool.member(expert, params) is None


def test_a_row_given_back_while_its_pool_is_busy_waits_for_the_next_operation():
    """An expert may be collected while its pool's lock is held on the same thread (a garbage
    collection set off inside a pool operation): giving its row back must not wait for that lock."""
    experts = [backend(f"g.{i}", lr=1.1e-2) for i in range(2)]
    pool = Pool(list(experts[0].module.parameters()))
    for expert in experts:
        adopted(pool, expert)
    chunk = experts[1].pooled.chunk
    free = len(chunk.free)
    with pool._lock:
        del experts[1], expert
        gc.collect()  # the finalizer runs here, on this thread, while the lock is held
        assert len(chunk.free) == free  # not yet freed
    pool.reserve(0)  # the next operation frees it
    assert len(chunk.free) == free + 1


def test_only_trainable_parameters_of_one_dtype_and_device_are_poolable():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert poolable([a, b])
    assert not poolable([])
    assert not poolable([a, torch.zeros(2)])  # one frozen
    assert not poolable([a, torch.zeros(2, dtype=torch.float64, requires_grad=True)])
    assert not poolable([a, torch.zeros(2, device="meta", requires_grad=True)])
