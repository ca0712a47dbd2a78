"""The client's side of one call per node, in-process: batched requests framed as protobuf frames
them (and as the node splits them), a failed part judged as its own call's status would be, the
requests of one turn of the event loop queued per node and direction, withdrawn requests sent to
nobody, nodes without batched calls remembered for a while, and the flag that turns it all off."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import UNBATCHED_RECHECK, Dispatcher, ExpertCall, PartFailed, _length_delimited
from dmoe.client.health import (
    Disagreement,
    EndpointHealth,
    describe,
    is_misbehaviour,
    is_refusal,
    judge_refusals,
    status_code,
)
from dmoe.config import load_config
from dmoe.lm.config import TrainConfig
from dmoe.node.service import batch_parts
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(30)
A = "/ip4/127.0.0.1/tcp/1/p2p/QmXfMpTEMEVFNh5dvQBBgmLq35sSUGnpRSCtMiMXn5ydXs"


@pytest.mark.parametrize("sizes", [[0], [1, 126, 127, 128], [300, 16383, 16384, 20000]])
def test_a_batch_framed_here_is_what_protobuf_writes_and_what_the_node_splits(sizes):
    """Part sizes across the lengths of one, two and three bytes of varint."""
    parts = []
    for size in sizes:
        part = pb.BackwardRequest(uid="ffn.0")
        part.inputs.add(buffer=b"x" * max(0, size - 10))
        parts.append(part)
    data = b"".join(_length_delimited(1, p.SerializeToString()) for p in parts)
    assert data == pb.BackwardBatchRequest(parts=parts).SerializeToString()
    assert [bytes(p) for p in batch_parts(data, backward=True)] == [p.SerializeToString() for p in parts]


def test_a_failed_part_is_judged_as_its_own_call_would_be():
    health = EndpointHealth(ban_base=1.0, ban_max=8.0, quarantine_time=100.0)
    shed = PartFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "ffn.2 has 7 tokens queued; limit 6")
    assert status_code(shed) == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_misbehaviour(shed)
    assert describe(shed) == "RESOURCE_EXHAUSTED: ffn.2 has 7 tokens queued; limit 6"
    health.report("n1:1", "ffn.2", shed)  # an ordinary failure: the node is backed off
    assert health.failures("n1:1") == 1 and not health.quarantined("n1:1", "ffn.2")
    missing = PartFailed(grpc.StatusCode.NOT_FOUND, "no expert 'ffn.9' on this node")
    health.report("n2:1", "ffn.9", missing)  # misbehaviour: that expert there, quarantined
    assert is_misbehaviour(missing) and health.quarantined("n2:1", "ffn.9") and health.failures("n2:1") == 0
    refused = PartFailed(grpc.StatusCode.INVALID_ARGUMENT, "inputs[0] of ffn.1 must be ...")
    assert is_refusal(refused)
    reports = []
    judge_refusals([("call", refused)], True, lambda call, error: reports.append(error))
    assert isinstance(reports[0], Disagreement) and "INVALID_ARGUMENT" in str(reports[0])


def call_to(endpoint: str, uid: str) -> ExpertCall:
    return ExpertCall(uid, endpoint, torch.ones(2, 4), torch.arange(2))


def test_the_requests_of_one_turn_wait_per_node_and_direction_and_withdrawn_ones_go_nowhere():
    async def scenario() -> None:
        dispatcher = Dispatcher(asyncio.get_running_loop())
        waits = [dispatcher._enqueue(call_to(endpoint, uid), torch.ones(2, 4), None, 10.0, backward, None)
                 for endpoint in ("n1:1", "n2:1") for uid in ("ffn.0", "ffn.1", "ffn.2")
                 for backward in (False, True)]
        assert {key: [q.call.uid for q in queue] for key, queue in dispatcher._queued.items()} == {
            (endpoint, False, backward): ["ffn.0", "ffn.1", "ffn.2"]
            for endpoint in ("n1:1", "n2:1") for backward in (False, True)}
        for wait in waits:  # every request withdrawn in the same turn (a deadline, an overtaken spare)
            wait.cancel()
        await asyncio.sleep(0)  # the turn is over: the queues are sent
        assert dispatcher._queued == {} and dispatcher._sending == set()  # nothing was left to send
        later = dispatcher._enqueue(call_to("n1:1", "ffn.3"), torch.ones(2, 4), None, 10.0, False, None)
        assert [q.call.uid for q in dispatcher._queued["n1:1", False, False]] == ["ffn.3"]  # a new queue
        later.cancel()
        await asyncio.sleep(0)
        assert dispatcher._queued == {}

    asyncio.run(scenario())


def test_a_node_without_batched_calls_is_called_per_expert_for_a_while():
    dispatcher = Dispatcher(asyncio.new_event_loop())
    try:
        assert dispatcher.batch_per_node and dispatcher._batching("n1:1", False)
        dispatcher._unbatched["n1:1", False] = time.monotonic()
        assert not dispatcher._batching("n1:1", False) and dispatcher._batching("n1:1", True)
        dispatcher._unbatched["n1:1", False] = time.monotonic() - UNBATCHED_RECHECK - 1
        assert dispatcher._batching("n1:1", False)  # asked again: it may have been upgraded
        assert ("n1:1", False) not in dispatcher._unbatched
    finally:
        dispatcher._loop.close()


def test_calls_per_expert_are_a_swarm_option(tmp_path):
    assert SwarmConfig().batch_per_node is True
    toml = tmp_path / "train.toml"
    toml.write_text(f'[swarm]\ninitial_peers = ["{A}"]\nbatch_per_node = false\n')
    assert load_config(TrainConfig, toml_path=toml, environ={}).swarm.batch_per_node is False
