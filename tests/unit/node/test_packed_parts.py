"""A packed call's parts on a node, in process: parts of experts of one schema checked once per call must
still fail alone where their own call would (another schema, too many tokens), and the parts' shared
outcome (runtime.Parts) must settle once, in order, and drop the parts of a call that has gone."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from swarm_fixtures import wait_for

from dmoe.core.wire import deserialize, serialize
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend
from dmoe.node.guard import CallGuard
from dmoe.node.runtime import Overloaded, Parts, Runtime, Task
from dmoe.node.service import ExpertServicer, _caller
from dmoe.node.stats import ExpertCounters
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(60)
HIDDEN = 8
LIMIT = 64  # tokens per part


@pytest.fixture(scope="module")
def node():
    narrow = NodeConfig(experts=["ffn.[0:3]"], hidden_dim=HIDDEN, inner_dim=HIDDEN, device="cpu")
    wide = NodeConfig(experts=["wide.[0:2]"], hidden_dim=HIDDEN + 1, inner_dim=HIDDEN, device="cpu")
    backends = {uid: build_backend(uid, config, torch.device("cpu"))
                for config in (narrow, wide) for uid in config.uids}
    runtime = Runtime(backends, max_batch_tokens=LIMIT, max_queued_tokens=4 * LIMIT, batching=True,
                      grouping=True)
    runtime.start()
    counters = {uid: ExpertCounters() for uid in backends}
    guard = CallGuard(verifier=None, max_calls_per_peer=5, max_parts_per_peer=64, peer_rate=1e6,
                      peer_burst=1e6)
    yield ExpertServicer(backends, runtime, counters, max_batch_tokens=LIMIT, max_request_bytes=1 << 20,
                         node_info=lambda uids: pb.NodeInfo(), chunk_bytes=1 << 16,
                         max_inflight_bytes=1 << 20, guard=guard)
    runtime.shutdown(10)


async def packed_call(servicer: ExpertServicer, request: pb.PackedRequest) -> pb.PackedReply:
    key = servicer.guard.admit("/dmoe.ExpertService/ForwardPacked", "ipv4:127.0.0.1:5000", None)
    _caller.set(key)
    try:
        return await servicer._run_packed(request.SerializeToString(), backward=False)
    finally:
        servicer.guard.release(key)


def test_parts_checked_once_per_schema_still_fail_alone_where_their_own_call_would(node):
    uids = ["ffn.0", "wide.0", "ffn.1", "wide.1", "ffn.2", "ffn.0", "gone.0"]
    rows = [2, 3, 1, LIMIT, LIMIT + 1, 4, 1]
    x = torch.randn(sum(rows), HIDDEN)
    before = {uid: (c.forward_calls, c.forward_tokens) for uid, c in node.counters.items()}
    reply = asyncio.run(packed_call(node, pb.PackedRequest(uids=uids, rows=rows, inputs=serialize(x))))
    ok, invalid = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    exhausted, missing = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.NOT_FOUND.value[0]
    # another schema's parts (inputs of HIDDEN + 1 features) fail alone, before and after the narrow ones
    # passed; a narrow part of more tokens than a part may carry fails alone too, checked as its own call
    assert list(reply.codes) == [ok, invalid, ok, invalid, exhausted, ok, missing]
    assert f"exceeds this node's limit of {LIMIT}" in reply.messages[4]
    outputs = deserialize(reply.outputs, max_numel=x.numel()).split([2, 1, 4])
    for uid, start, out in zip(["ffn.0", "ffn.1", "ffn.0"], [0, 2 + 3, 2 + 3 + 1 + LIMIT + LIMIT + 1],
                               outputs):
        torch.testing.assert_close(out, node.backends[uid].forward([x[start:start + out.shape[0]]])[0])
    after = {uid: (c.forward_calls, c.forward_tokens) for uid, c in node.counters.items()}
    grown = {uid: (after[uid][0] - before[uid][0], after[uid][1] - before[uid][1]) for uid in after}
    assert grown == {"ffn.0": (2, 6), "ffn.1": (1, 1), "ffn.2": (0, 0), "wide.0": (0, 0), "wide.1": (0, 0)}


def test_the_parts_settle_once_in_order_with_each_ones_outcome(node):
    done = threading.Event()
    calls = []
    parts = Parts(3, lambda: (calls.append(list(parts.outcomes)), done.set()))
    xs = [torch.randn(2, HIDDEN), torch.randn(1, HIDDEN)]
    items = [("ffn.1", Task([xs[0]], None, 2, 2, parts.part(0))),
             ("ffn.2", Task([torch.randn(5 * LIMIT, HIDDEN)], None, 5 * LIMIT, 5 * LIMIT, parts.part(1))),
             ("ffn.0", Task([xs[1]], None, 1, 1, parts.part(2)))]
    queued = node.runtime.submit_many(items)
    assert isinstance(queued[1], Overloaded)  # over its queue: its caller settles it
    assert not done.is_set()
    items[1][1].future.set_exception(queued[1])
    assert done.wait(30)
    [outcomes] = calls
    assert outcomes[1] is queued[1]
    for outcome, (uid, _), x in zip([outcomes[0], outcomes[2]], [items[0], items[2]], xs):
        torch.testing.assert_close(outcome[0], node.backends[uid].forward([x])[0])


def test_the_parts_of_a_call_that_has_gone_are_dropped_before_they_run():
    config = NodeConfig(experts=["ffn.[0:2]"], hidden_dim=HIDDEN, inner_dim=HIDDEN, device="cpu")
    backends = {uid: build_backend(uid, config, torch.device("cpu")) for uid in config.uids}
    runtime = Runtime(backends, max_batch_tokens=LIMIT, max_queued_tokens=LIMIT, batching=True,
                      grouping=True)
    settled = threading.Event()
    parts = Parts(2, settled.set)
    for index, uid in enumerate(config.uids):
        x = torch.randn(3, HIDDEN)
        runtime.submit(uid, Task([x], [torch.randn(3, HIDDEN)], 3, 3, parts.part(index)))
    parts.cancel()  # the call's deadline passed before the runtime took its parts
    runtime.start()
    try:
        later = Parts(1, lambda: None)
        runtime.submit("ffn.0", Task([torch.randn(1, HIDDEN)], None, 1, 1, later.part(0)))
        wait_for(lambda: later.outcomes[0] is not None, 30, "the later part answered")
        assert not settled.is_set() and parts.outcomes == [None, None]
        assert [b.version for b in backends.values()] == [0, 0]  # neither cancelled backward stepped
        assert runtime.queued_tokens("ffn.0") == runtime.queued_tokens("ffn.1") == 0
    finally:
        runtime.shutdown(10)
