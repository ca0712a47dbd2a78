"""Bad input gets a precise status and changes nothing; the next good request is served."""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import numpy as np
import pytest
import torch
from swarm_fixtures import expert_version, module_node, stub, wait_for

from dmoe.core.wire import deserialize, serialize, split_chunks
from dmoe.proto import expert_pb2 as pb

HIDDEN = 32
UID = "ffn.0"
pytestmark = pytest.mark.timeout(120)
INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)


node = module_node(
    "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), "--max-message-bytes", str(256 << 10),
    "--max-request-bytes", str(1 << 20), "--max-batch-tokens", "1024", "--max-queued-tokens", "2048",
    "--max-inflight-bytes", str(1100 << 10),
)


def good_forward(service) -> torch.Tensor:
    x = torch.linspace(-1, 1, 4 * HIDDEN).reshape(4, HIDDEN)
    reply = service.Forward(pb.ForwardRequest(uid=UID, inputs=[serialize(x)]), timeout=30)
    return deserialize(reply.outputs[0], max_numel=1 << 20)


def raw_tensor(shape, dtype="float32", buffer=None, compression=pb.NONE) -> pb.Tensor:
    if buffer is None:
        buffer = np.zeros(int(np.prod(shape)), dtype=np.float32).tobytes()
    return pb.Tensor(buffer=buffer, shape=shape, dtype=dtype, compression=compression)


def nan_input() -> torch.Tensor:
    x = torch.zeros(3, HIDDEN)
    x[1, 2] = float("nan")
    return x


def inf_input() -> torch.Tensor:
    x = torch.zeros(3, HIDDEN)
    x[0, 0] = float("inf")
    return x


BAD_FORWARDS = {
    "unknown uid": (pb.ForwardRequest(uid="ffn.99", inputs=[serialize(torch.zeros(2, HIDDEN))]), NOT_FOUND),
    "empty uid": (pb.ForwardRequest(inputs=[serialize(torch.zeros(2, HIDDEN))]), NOT_FOUND),
    "wrong width": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.zeros(2, HIDDEN + 1))]), INVALID),
    "wrong rank": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.zeros(2, 2, HIDDEN))]), INVALID),
    "wrong dtype": (pb.ForwardRequest(uid=UID, inputs=[serialize(
        torch.zeros(2, HIDDEN, dtype=torch.float64))]), INVALID),
    "integer dtype": (pb.ForwardRequest(uid=UID, inputs=[serialize(
        torch.zeros(2, HIDDEN, dtype=torch.int64))]), INVALID),
    "no inputs": (pb.ForwardRequest(uid=UID), INVALID),
    "two inputs": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.zeros(2, HIDDEN))] * 2), INVALID),
    "zero tokens": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.zeros(0, HIDDEN))]), INVALID),
    "nan": (pb.ForwardRequest(uid=UID, inputs=[serialize(nan_input())]), INVALID),
    "inf": (pb.ForwardRequest(uid=UID, inputs=[serialize(inf_input())]), INVALID),
    "absurdly large": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.full((2, HIDDEN), -1e6))]),
                       grpc.StatusCode.OUT_OF_RANGE),
    "short buffer": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor([2, HIDDEN], buffer=b"\0" * 10)]),
                     INVALID),
    "unknown dtype": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor([2, HIDDEN], dtype="object")]), INVALID),
    "negative dim": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor([-2, HIDDEN], buffer=b"")]), INVALID),
    "huge claimed shape": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor([1 << 40, 1 << 20], buffer=b"")]),
                           INVALID),
    "unknown compression": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor([2, HIDDEN], compression=7)]),
                            INVALID),
    "8bit codebook overflow": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor(
        [2, HIDDEN], compression=pb.UNIFORM_8BIT,
        buffer=np.int64(1 << 30).tobytes() + b"\0" * 64)]), INVALID),
    "8bit index past codebook": (pb.ForwardRequest(uid=UID, inputs=[raw_tensor(
        [2, HIDDEN], compression=pb.UNIFORM_8BIT,
        buffer=np.int64(4).tobytes() + np.zeros(4, np.float32).tobytes() + b"\x09" * (2 * HIDDEN))]),
                                 INVALID),
    "unknown reply compression": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.zeros(2, HIDDEN))],
                                                    reply_compression=9), INVALID),
    "too many tokens": (pb.ForwardRequest(uid=UID, inputs=[serialize(torch.zeros(1025, HIDDEN))]), EXHAUSTED),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_bad_forward_gets_status_and_changes_nothing(service, case):
    request, code = BAD_FORWARDS[case]
    before_version, before_output = expert_version(service, UID), good_forward(service)
    with pytest.raises(grpc.RpcError) as error:
        service.Forward(request, timeout=30)
    assert error.value.code() == code, error.value.details()
    assert error.value.details()
    assert expert_version(service, UID) == before_version
    torch.testing.assert_close(good_forward(service), before_output, rtol=0, atol=0)


def bad_backward(grad_outputs: list[pb.Tensor], inputs: list[pb.Tensor] | None = None) -> pb.BackwardRequest:
    return pb.BackwardRequest(uid=UID, inputs=inputs or [serialize(torch.ones(3, HIDDEN))],
                              grad_outputs=grad_outputs)


BAD_BACKWARDS = {
    "nan gradient": bad_backward([serialize(nan_input())]),
    "inf gradient": bad_backward([serialize(inf_input())]),
    "gradient of the wrong batch": bad_backward([serialize(torch.ones(4, HIDDEN))]),
    "gradient of the wrong width": bad_backward([serialize(torch.ones(3, HIDDEN - 1))]),
    "no gradient": bad_backward([]),
    "float64 gradient": bad_backward([serialize(torch.ones(3, HIDDEN, dtype=torch.float64))]),
    "nan input": bad_backward([serialize(torch.ones(3, HIDDEN))], [serialize(nan_input())]),
    "absurdly large gradient": bad_backward([serialize(torch.full((3, HIDDEN), 1e6))]),
    "absurdly large input": bad_backward([serialize(torch.ones(3, HIDDEN))],
                                         [serialize(torch.full((3, HIDDEN), 1e6))]),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARDS))
def test_bad_backward_moves_no_parameter(service, case):
    before_version, before_output = expert_version(service, UID), good_forward(service)
    with pytest.raises(grpc.RpcError) as error:
        service.Backward(BAD_BACKWARDS[case], timeout=30)
    if case.startswith("absurdly"):  # well-formed, but beyond the node's bounds: the caller's to fix
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE, error.value.details()
        assert "above this node's bound" in error.value.details()
    else:
        assert error.value.code() == INVALID, error.value.details()
    assert expert_version(service, UID) == before_version
    torch.testing.assert_close(good_forward(service), before_output, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["Forward", "Backward", "Info"])
def test_garbage_bytes_are_invalid_argument(channel, service, method):
    before_output = good_forward(service)
    call = channel.unary_unary(f"/dmoe.ExpertService/{method}")
    with pytest.raises(grpc.RpcError) as error:
        call(b"\xff\xfe\x00garbage\x12\x99", timeout=10)
    assert error.value.code() == INVALID
    assert "undecodable" in error.value.details()
    torch.testing.assert_close(good_forward(service), before_output, rtol=0, atol=0)


def test_oversize_messages_are_resource_exhausted(channel, service):
    too_big = b"\x00" * (300 << 10)  # over the 256 KiB unary limit
    with pytest.raises(grpc.RpcError) as unary:
        channel.unary_unary("/dmoe.ExpertService/Forward")(too_big, timeout=10)
    assert unary.value.code() == EXHAUSTED
    chunks = split_chunks(b"\x00" * ((1 << 20) + 1), 128 << 10)  # over the 1 MiB request limit
    with pytest.raises(grpc.RpcError) as streamed:
        list(service.ForwardStream(chunks, timeout=30))
    assert streamed.value.code() == EXHAUSTED
    assert good_forward(service).shape == (4, HIDDEN)


def test_overload_is_shed_with_resource_exhausted(node_factory):
    """Far more queued tokens than the node admits: some calls are shed at once, none hangs, and
    every call that was admitted is answered correctly. The expert takes 0.5 s per batch, so the
    queue (two requests' worth) is full however fast the node reads requests; with an expert of
    microseconds, whether anything queues at all depends on how the machine schedules threads."""
    slow = node_factory("--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), "--expert-cls",
                        "experts_for_tests:SleepyExpert", "--max-batch-tokens", "1024",
                        "--max-queued-tokens", "2048")
    channel, service = stub(slow.endpoint)
    try:
        x = torch.randn(1024, HIDDEN)
        request = pb.ForwardRequest(uid="ffn.1", inputs=[serialize(x)])
        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            futures = [pool.submit(service.Forward.future(request, timeout=60).exception) for _ in range(48)]
            errors = [f.result(timeout=90) for f in futures]
        codes = [e.code() if e is not None else grpc.StatusCode.OK for e in errors]
        assert set(codes) <= {grpc.StatusCode.OK, EXHAUSTED}, codes
        assert codes.count(EXHAUSTED) > 0 and codes.count(grpc.StatusCode.OK) > 0
        stats = service.Info(pb.InfoRequest(uids=["ffn.1"]), timeout=10).experts[0].stats
        assert stats.rejected == codes.count(EXHAUSTED)
        assert stats.queued_tokens == 0
        assert good_forward(service).shape == (4, HIDDEN)
    finally:
        channel.close()


def test_streams_share_a_budget_of_bytes_in_flight(service):
    """A stream held open with 700 KiB received leaves no room for another 700 KiB (1100 KiB budget)."""
    release = threading.Event()

    def held_open():
        yield from split_chunks(b"\x00" * (700 << 10), 175 << 10)  # chunks within the 256 KiB message limit
        release.wait(30)

    first = service.ForwardStream(held_open(), timeout=60)
    first_result = concurrent.futures.ThreadPoolExecutor(1).submit(lambda: list(first))
    try:
        wait_for(lambda: service.Info(pb.InfoRequest(), timeout=10).receiving_bytes == 700 << 10, 20,
                 "the first stream to arrive")
        with pytest.raises(grpc.RpcError) as second:
            list(service.ForwardStream(split_chunks(b"\x00" * (700 << 10), 175 << 10), timeout=30))
        assert second.value.code() == EXHAUSTED and "too much data" in second.value.details()
    finally:
        release.set()
    with pytest.raises(grpc.RpcError) as held:
        first_result.result(60)
    assert held.value.code() == INVALID  # zeros are no ForwardRequest
    assert good_forward(service).shape == (4, HIDDEN)
