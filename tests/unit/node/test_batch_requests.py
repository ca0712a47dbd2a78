"""A node's batched calls in-process: the parts found on the wire before anything is parsed
(batch_parts), each part a call of its peer (CallGuard.admit_part), and each part served as its own
call would be by a real ExpertServicer and Runtime, failing alone with its own call's status."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from dmoe.core.wire import deserialize, serialize
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend
from dmoe.node.guard import CallGuard, Refused
from dmoe.node.runtime import Runtime
from dmoe.node.service import (
    MAX_BATCH_FIELDS,
    MAX_BATCH_PARTS,
    ExpertServicer,
    RequestError,
    _caller,
    _parse,
    batch_parts,
    parse_packed,
)
from dmoe.node.stats import ExpertCounters
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(60)
HIDDEN = 8
PEER = "ipv4:127.0.0.1:5000"


def forward(uid: str, rows: int, width: int = HIDDEN) -> pb.ForwardRequest:
    return pb.ForwardRequest(uid=uid, inputs=[serialize(torch.randn(rows, width))])


def test_the_parts_are_found_in_order_and_other_fields_are_skipped():
    parts = [forward("ffn.0", 2), pb.ForwardRequest(), forward("ffn.1", 300)]  # an empty part, a long one
    data = pb.ForwardBatchRequest(parts=parts).SerializeToString()
    later = b"\x10\x07" + b"\x1a\x03abc"  # fields 2 (a varint) and 3 (bytes) of some later version
    found = batch_parts(later[:2] + data + later[2:], backward=False)
    assert [_parse(pb.ForwardRequest, part) for part in found] == parts
    assert batch_parts(b"", backward=True) == []


@pytest.mark.parametrize("data, why", [
    (b"\x0a\x05abc", "cut short"),  # a part of 5 bytes, 3 sent
    (b"\x08\x01", "field 1 of wire type 0"),  # the parts field as a number
    (b"\x13\x14", "wire type 3"),  # a group
    (b"\x02\x00", "field 0 of wire type 2"),
])
def test_a_batch_that_cannot_be_followed_is_refused_whole(data, why):
    with pytest.raises(RequestError, match=f"undecodable BackwardBatchRequest: {why}") as refused:
        batch_parts(data, backward=True)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_too_many_parts_or_fields_refuse_the_whole_call_before_any_is_parsed():
    empty_parts = b"\x0a\x00" * (MAX_BATCH_PARTS + 1)
    with pytest.raises(RequestError, match=f"at most {MAX_BATCH_PARTS} parts") as refused:
        batch_parts(empty_parts, backward=False)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(batch_parts(empty_parts[2:], backward=False)) == MAX_BATCH_PARTS
    # two parts of empty tensors, each 2 bytes a field: more fields in all than the batch may hold
    tensors = pb.ForwardRequest(uid="ffn.0", inputs=[pb.Tensor()] * (MAX_BATCH_FIELDS // 2))
    data = pb.ForwardBatchRequest(parts=[tensors, tensors]).SerializeToString()
    with pytest.raises(RequestError, match=f"more than {MAX_BATCH_FIELDS} fields in all") as refused:
        batch_parts(data, backward=False)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # one such part alone is within the batch's fields, and refused alone by its own limits
    [part] = batch_parts(data[: len(data) // 2], backward=False)
    with pytest.raises(RequestError, match="more than 256 fields"):
        _parse(pb.ForwardRequest, part)


def test_a_packed_call_of_too_many_parts_fields_or_rows_is_refused_whole_before_it_is_decoded():
    x = serialize(torch.zeros(MAX_BATCH_PARTS + 1, HIDDEN))
    count = MAX_BATCH_PARTS + 1
    many = pb.PackedRequest(uids=["ffn.0"] * count, rows=[1] * count, inputs=x)
    with pytest.raises(RequestError, match=f"at most {MAX_BATCH_PARTS} parts") as refused:
        parse_packed(many.SerializeToString(), backward=False, max_batch_tokens=16)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    del many.uids[-1], many.rows[-1]
    many.inputs.CopyFrom(serialize(torch.zeros(MAX_BATCH_PARTS, HIDDEN)))
    parsed = parse_packed(many.SerializeToString(), backward=False, max_batch_tokens=16)
    assert len(parsed.uids) == MAX_BATCH_PARTS
    # fields counted on the wire: row counts one field each (unpacked), three per part, too many to parse
    data = b"".join(b"\x10\x01" for _ in range(3 * MAX_BATCH_PARTS)) + pb.PackedRequest(
        uids=["ffn.0"], inputs=serialize(torch.zeros(1, HIDDEN))).SerializeToString()
    with pytest.raises(RequestError) as refused:
        parse_packed(data, backward=False, max_batch_tokens=16)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # more rows than its parts may carry (16 each here): refused before anything is decoded
    rows = pb.PackedRequest(uids=["ffn.0", "ffn.1"], rows=[17, 16], inputs=serialize(torch.zeros(33, HIDDEN)))
    with pytest.raises(RequestError, match="exceeds the limit of 16 per part") as refused:
        parse_packed(rows.SerializeToString(), backward=False, max_batch_tokens=16)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    rows.rows[:] = [17, 15]
    rows.inputs.CopyFrom(serialize(torch.zeros(32, HIDDEN)))
    assert list(parse_packed(rows.SerializeToString(), backward=False, max_batch_tokens=16).rows) == [17, 15]


def test_each_part_after_the_first_is_in_flight_among_the_peers_parts_and_against_the_rate():
    guard = CallGuard(verifier=None, max_calls_per_peer=1, max_parts_per_peer=2, peer_rate=1e-9,
                      peer_burst=100)
    key = guard.admit("/m", PEER, None)  # the peer's one call: the parts have a limit of their own
    guard.admit_part(key)
    guard.admit_part(key)
    with pytest.raises(Refused, match=r"2 parts of batched calls of yours are in flight.*=2\)") as part:
        guard.admit_part(key)
    assert part.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(Refused, match="max_calls_per_peer=1"):  # the calls' limit is apart
        guard.admit("/m", PEER, None)
    guard.release_part(key)
    guard.admit_part(key)  # a part given back makes room for one more
    for _ in range(2):
        guard.release_part(key)
    guard.release(key)
    rated = CallGuard(verifier=None, max_calls_per_peer=100, max_parts_per_peer=100, peer_rate=1e-9,
                      peer_burst=2)
    key = rated.admit("/m", PEER, None)
    rated.admit_part(key)  # the burst of 2 is spent
    with pytest.raises(Refused, match="requests per second") as part:
        rated.admit_part(key)
    with pytest.raises(Refused) as call:
        rated.admit("/m", PEER, None)
    assert (part.value.code, part.value.message) == (call.value.code, call.value.message)
    assert rated.num_rate_limited == 2


@pytest.fixture
def servicer():
    config = NodeConfig(experts=["ffn.[0:3]"], hidden_dim=HIDDEN, inner_dim=2 * HIDDEN, device="cpu")
    backends = {uid: build_backend(uid, config, torch.device("cpu")) for uid in config.uids}
    runtime = Runtime(backends, max_batch_tokens=64, max_queued_tokens=6, batching=True)
    runtime.start()
    counters = {uid: ExpertCounters() for uid in backends}
    guard = CallGuard(verifier=None, max_calls_per_peer=5, max_parts_per_peer=4, peer_rate=1e6,
                      peer_burst=1e6)
    yield ExpertServicer(backends, runtime, counters, max_batch_tokens=64, max_request_bytes=1 << 20,
                         node_info=lambda uids: pb.NodeInfo(), chunk_bytes=1 << 16,
                         max_inflight_bytes=1 << 20, guard=guard, max_input_abs=1e4)
    runtime.shutdown(10)


async def as_call(servicer: ExpertServicer, run):
    """Run as a handler does, admitted by the guard (which counts the call's first part)."""
    key = servicer.guard.admit("/dmoe.ExpertService/ForwardBatch", PEER, None)
    _caller.set(key)
    try:
        return await run()
    finally:
        servicer.guard.release(key)


def test_each_part_is_served_as_its_own_call_and_fails_alone(servicer):
    parts = [forward("ffn.0", 3),
             forward("ffn.1", 3, HIDDEN + 1),  # bad shape: INVALID_ARGUMENT
             forward("ffn.9", 3),  # not hosted: NOT_FOUND
             forward("ffn.2", 7),  # more tokens than may wait in its queue (6): RESOURCE_EXHAUSTED
             forward("ffn.0", 2),
             forward("ffn.2", 1)]  # the fifth part after the call's own, of a peer allowed four
    data = pb.ForwardBatchRequest(parts=parts).SerializeToString()
    reply = asyncio.run(as_call(servicer, lambda: servicer._run_batch(data, backward=False)))
    codes = [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert [p.code for p in reply.parts] == [c.value[0] for c in codes]
    assert "max_parts_per_peer=4" in reply.parts[5].message
    for request, part in zip(parts[:5], reply.parts):
        try:  # the same request in a per-expert call
            own = asyncio.run(as_call(servicer, lambda: servicer._run(request, backward=False)))
        except RequestError as e:
            assert (part.code, part.message) == (e.code.value[0], e.message) and not part.tensors
        else:
            assert part.code == 0
            torch.testing.assert_close(deserialize(part.tensors[0], max_numel=1 << 10),
                                       deserialize(own.outputs[0], max_numel=1 << 10))
    stats = {uid: (c.forward_calls, c.forward_tokens, c.errors, c.rejected)
             for uid, c in servicer.counters.items()}
    # each part (and each per-expert call after it) counted in its expert's stats
    assert stats == {"ffn.0": (4, 10, 0, 0), "ffn.1": (0, 0, 2, 0), "ffn.2": (0, 0, 0, 2)}
    peer = servicer.guard._peers["127.0.0.1"]
    assert (peer.in_flight, peer.parts_in_flight) == (0, 0)  # every call and part given back
