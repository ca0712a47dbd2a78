"""Fuzzing of a node's request path: property-based tests against a real node, and a short run of
the coverage-guided fuzzer (``fuzz/fuzz_request.py``).

The property: whatever a peer sends to any method (Forward, Backward, Info, and the streams), the
call ends with OK or with INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or OUT_OF_RANGE and a message; never
INTERNAL, UNKNOWN, UNAVAILABLE or DEADLINE_EXCEEDED (a hung node). Afterwards the node still serves,
every expert's version moved by exactly the Backward calls that succeeded, and an expert no Backward
reached answers a fixed input exactly as before. Requests are drawn from strategies that mix
well-formed parts (a hosted uid, ``[rows, hidden]`` float32 tensors with buffers of the exact
length) with hostile ones (unknown uids, negative, huge and many dimensions, unknown dtypes and
compression tags, short or random buffers, NaN, huge values), so that many requests get deep into
decoding before they are refused.
Info requests name hosted, unknown and repeated uids, up to past the node's ``--max-info-uids``;
stream framing is drawn as a good request's chunks in order, out of order, with empty chunks, past
``--max-request-bytes``, with Chunk messages of inconsistent encodings, or with garbage messages.
Hypothesis runs derandomized, so every run draws the same examples.

Run: ``.venv/bin/python -m pytest -q tests/integration/test_fuzz.py`` (about 30 s on 2 cores).
``DMOE_FUZZ_EXAMPLES=N`` draws N examples in each property test instead (a longer run; fuzz/README.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarm_fixtures import expert_version, module_node

from dmoe.core.wire import DTYPES, deserialize, serialize, split_chunks
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(240)

HIDDEN = 8
UIDS = ["ffn.0", "ffn.1"]
TOUCHED = "ffn.0"  # the one hosted uid Backward requests name; ffn.1 only ever sees Forward and garbage
MAX_BATCH_TOKENS = 256
OK = grpc.StatusCode.OK
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.OUT_OF_RANGE}
ALLOWED = {OK, *REFUSALS}
SERVICE = "/dmoe.ExpertService"
ROOT = Path(__file__).resolve().parents[2]
FUZZER = ROOT / "fuzz" / "fuzz_request.py"
# The coverage-guided fuzzer is bounded by its count of inputs, not by time: $DMOE_FUZZ_RUNS, 300,000 by
# default. Its timeout only catches a hang: the count at 300 inputs/s (it ran 480/s on a 2-core machine
# at a load average of 15; a quiet one runs the 300,000 in under 3 minutes) plus a minute to start.
FUZZER_RUNS = int(os.environ.get("DMOE_FUZZ_RUNS", "300000"))
FUZZER_TIMEOUT_S = 60 + FUZZER_RUNS / 300
EXAMPLES = int(os.environ.get("DMOE_FUZZ_EXAMPLES", "0"))  # 0: each test's own count
MAX_INFO_UIDS = 64
MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES = 32 << 10, 64 << 10
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def examples(n: int) -> int:
    return EXAMPLES or n


node = module_node(
    "--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), "--inner-dim", str(2 * HIDDEN),
    "--max-batch-tokens", str(MAX_BATCH_TOKENS), "--peer-rate", "1000000", "--peer-burst", "1000000",
    # every successful Backward must step (assert_node_unchanged counts them): no influence limits
    "--peer-steps-per-minute", "0", "--max-peer-step-share", "1",
    "--max-info-uids", str(MAX_INFO_UIDS), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
    "--max-request-bytes", str(MAX_REQUEST_BYTES),
)

# (method, status code name) -> calls; and Backward calls that succeeded, per uid
CALLS: Counter[tuple[str, str]] = Counter()
BACKWARD_OK: Counter[str] = Counter()


# ---- strategies ------------------------------------------------------------------------------------
# A request is drawn well-formed (a hosted uid, one [rows, HIDDEN] float32 tensor in a valid compression
# with a buffer of the exact length and small values) except for a few flaws, each a field drawn from
# a hostile strategy instead, so that most requests get deep into decoding before they are refused.
FLAWS = ("uid", "count", "rows", "reply", "shape", "dtype", "compression", "buffer", "values")
GRAD_FLAWS = ("grad_count", "grad_rows", "grad_shape", "grad_dtype", "grad_compression", "grad_buffer",
              "grad_values")
NAMED_DTYPES = [*DTYPES, "bool", "int8", "int16", "complex64", "float8_e4m3fn", "object", "float",
                "torch.float32", "FLOAT32", ""]
VALID_COMPRESSIONS = [pb.NONE, pb.FLOAT16, pb.UNIFORM_8BIT]
dims = st.one_of(
    st.integers(0, 4), st.just(HIDDEN),
    st.sampled_from([-1, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, -(2**40), -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
hostile = {
    "uid": st.one_of(st.sampled_from(["ffn.99", "", "ffn", "ffn.0.0", " ffn.0", "FFN.0"]),
                     st.text(max_size=24)),
    "count": st.sampled_from([0, 2, 3]),
    "shape": st.one_of(st.lists(dims, max_size=3), st.lists(dims, min_size=4, max_size=12)),
    "dtype": st.one_of(st.sampled_from(NAMED_DTYPES), st.text(max_size=12)),
    "compression": st.one_of(st.sampled_from(VALID_COMPRESSIONS), st.integers(-(2**31), 2**31 - 1)),
    "reply": st.one_of(st.sampled_from([3, 4, -1, 255]), st.integers(-(2**31), 2**31 - 1)),
}


def tensor_bytes(values: torch.Tensor) -> bytes:
    if values.dtype == torch.bfloat16:
        values = values.view(torch.int16)
    return values.contiguous().numpy().tobytes()


@st.composite
def buffers(draw: st.DrawFn, shape: list[int], dtype: str, compression: int, *,
            exact: bool, good: bool) -> bytes:
    """A buffer of exactly the length the shape, dtype and compression ask for (unless not exact, or
    the shape has no such length), holding small values or zeros (good), or a NaN or Inf, huge values
    or random bytes (not good)."""
    numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if not 0 <= numel <= 4096 or not exact:
        return draw(st.binary(max_size=300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fill = draw(st.sampled_from(["small", "zeros"] if good else ["nonfinite", "huge", "bytes"]))
    values = torch.from_numpy(rng.uniform(-2.0, 2.0, numel).astype(np.float32))
    if fill == "zeros":
        values.zero_()
    elif fill == "nonfinite" and numel:
        values[int(rng.integers(numel))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    elif fill == "huge":
        values *= 1e6
    if compression == pb.FLOAT16:
        return rng.bytes(2 * numel) if fill == "bytes" else tensor_bytes(values.half())
    if compression == pb.UNIFORM_8BIT:
        sizes = st.integers(1, 256)
        size = draw(sizes if good else st.one_of(sizes, st.integers(-(2**63), 2**63 - 1)))
        kept = min(max(size, 0), 256)
        codebook = rng.bytes(4 * kept) if fill == "bytes" else values[:kept].numpy().tobytes()
        codebook += b"\0" * (4 * kept - len(codebook))
        top = max(1, kept) + (0 if good else draw(st.sampled_from([0, 1, 255])))  # past the codebook, maybe
        indices = rng.integers(0, min(top, 256), numel, dtype=np.uint8)
        return np.int64(size).tobytes() + codebook + indices.tobytes()
    if dtype not in DTYPES or fill == "bytes":
        return rng.bytes(numel * (DTYPES[dtype].itemsize if dtype in DTYPES else 4))
    return tensor_bytes(values.to(DTYPES[dtype]))


@st.composite
def tensor_lists(draw: st.DrawFn, rows: int, flaws: frozenset[str], prefix: str = "") -> list[pb.Tensor]:
    """The inputs (or grad_outputs, with prefix 'grad_') of a request with these flaws."""
    def flawed(field: str) -> bool:
        return prefix + field in flaws

    count = draw(hostile["count"]) if flawed("count") else 1
    rows = rows + draw(st.sampled_from([-1, 1, 1 << 20])) if flawed("rows") else rows
    found = []
    for _ in range(count):
        shape = draw(hostile["shape"]) if flawed("shape") else [rows, HIDDEN]
        dtype = draw(hostile["dtype"]) if flawed("dtype") else "float32"
        compression = draw(hostile["compression"] if flawed("compression")
                           else st.sampled_from(VALID_COMPRESSIONS))
        buffer = draw(buffers(shape, dtype, compression,
                              exact=not flawed("buffer"), good=not flawed("values")))
        found.append(pb.Tensor(buffer=buffer, shape=shape, dtype=dtype, compression=compression))
    return found


@st.composite
def forward_requests(draw: st.DrawFn) -> pb.ForwardRequest:
    flaws = frozenset(draw(st.sets(st.sampled_from(FLAWS), max_size=4)))
    rows = draw(st.one_of(st.integers(1, 8), st.just(MAX_BATCH_TOKENS)))
    return pb.ForwardRequest(
        uid=draw(hostile["uid"] if "uid" in flaws else st.sampled_from(UIDS)),
        inputs=draw(tensor_lists(rows, flaws)),
        reply_compression=draw(hostile["reply"] if "reply" in flaws else st.sampled_from(VALID_COMPRESSIONS)),
    )


@st.composite
def backward_requests(draw: st.DrawFn) -> pb.BackwardRequest:
    """At least one flaw: a BackwardRequest without one would move the parameters of TOUCHED."""
    flaws = frozenset(draw(st.sets(st.sampled_from(FLAWS + GRAD_FLAWS), min_size=1, max_size=4)))
    rows = draw(st.integers(1, 8))
    uid = draw(hostile["uid"].filter(lambda uid: uid not in UIDS) if "uid" in flaws else st.just(TOUCHED))
    return pb.BackwardRequest(
        uid=uid, inputs=draw(tensor_lists(rows, flaws)),
        grad_outputs=draw(tensor_lists(rows, flaws, "grad_")),
        reply_compression=draw(hostile["reply"] if "reply" in flaws else st.sampled_from(VALID_COMPRESSIONS)),
    )


def good_request() -> bytes:
    return pb.ForwardRequest(uid=UIDS[1], inputs=[serialize(torch.ones(2, HIDDEN))]).SerializeToString()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """data with a few bytes replaced, inserted or cut off: near misses of a valid message."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        action = draw(st.sampled_from(["set", "insert", "truncate"]))
        if action == "set" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif action == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del out[at:]
    return bytes(out)


raw_messages = st.one_of(st.binary(max_size=512), mutated(good_request()),
                         forward_requests().map(pb.ForwardRequest.SerializeToString).flatmap(mutated))


@st.composite
def chunk_streams(draw: st.DrawFn, backward: bool) -> list[pb.Chunk]:
    """Random Chunks, or a (possibly mutated) request cut into chunks of a random size."""
    if draw(st.integers(0, 3)) == 0:
        return [pb.Chunk(data=data) for data in draw(st.lists(st.binary(max_size=200), max_size=5))]
    request = draw(backward_requests() if backward else forward_requests())
    data = request.SerializeToString()
    if draw(st.integers(0, 3)) == 0:
        data = draw(mutated(data))
    chunk_bytes = draw(st.integers(max(1, len(data) // 16), max(1, len(data))))  # 16 chunks at most
    return list(split_chunks(data, chunk_bytes))


info_uids = st.one_of(st.sampled_from(UIDS), st.sampled_from(["ffn.99", "", "ffn", "FFN.0", "ffn.0 "]),
                      st.text(max_size=12))
info_requests = st.one_of(
    st.lists(info_uids, max_size=8),
    st.lists(st.sampled_from(UIDS), max_size=3 * MAX_INFO_UIDS),  # repeats, and past the limit
    st.builds(lambda uid, n: [uid] * n, st.sampled_from(UIDS), st.integers(MAX_INFO_UIDS - 2, 20_000)),
).map(lambda uids: pb.InfoRequest(uids=uids))

FRAMINGS = ("in order", "out of order", "empty chunk", "overlong", "inconsistent", "garbage")


def chunk_message(data: bytes, variant: int) -> bytes:
    """One Chunk carrying data, encoded in one of the ways protobuf allows, or nearly: 0 plain; 1
    with an unknown field; 2 with its data field twice (the last one counts); 3 a length prefix
    past the end; 4 data with the wrong wire type."""
    plain = pb.Chunk(data=data).SerializeToString()
    if variant == 1:
        return plain + b"\x10\x07"  # field 2, a varint: unknown to Chunk
    if variant == 2:
        return pb.Chunk(data=b"\x00" * 3).SerializeToString() + plain
    if variant == 3:
        return b"\x0a" + bytes([min(len(data) + 5, 127)]) + data[:120]
    if variant == 4:
        return b"\x08\x01" + plain
    return plain


@st.composite
def framed_streams(draw: st.DrawFn, backward: bool) -> tuple[str, list[bytes]]:
    """(framing, stream messages): a request (good, or with flaws) cut into chunks, then framed."""
    framing = draw(st.sampled_from(FRAMINGS))
    if draw(st.booleans()):
        data = good_request() if not backward else draw(backward_requests()).SerializeToString()
    else:
        data = draw(backward_requests() if backward else forward_requests()).SerializeToString()
    if framing == "overlong":
        data = data * (MAX_REQUEST_BYTES // max(1, len(data)) + 1)
    size = draw(st.integers(max(1, len(data) // 16), max(1, min(len(data), MAX_MESSAGE_BYTES // 2))))
    chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    messages = [pb.Chunk(data=c).SerializeToString() for c in chunks]
    if framing == "out of order":
        messages = draw(st.permutations(messages))
    elif framing == "empty chunk":
        messages.insert(draw(st.integers(0, len(messages))), pb.Chunk().SerializeToString())
    elif framing == "inconsistent":
        at = draw(st.integers(0, len(messages) - 1))
        messages[at] = chunk_message(chunks[at], draw(st.integers(1, 4)))
    elif framing == "garbage":
        messages.insert(draw(st.integers(0, len(messages))), draw(st.binary(max_size=64)))
    return framing, messages


# ---- calls -----------------------------------------------------------------------------------------
def outcome(method: str, call: Callable[[], object]) -> tuple[grpc.StatusCode, object]:
    """Run one call; assert it ended with an allowed status and, if an error, a message; count it."""
    try:
        reply = call()
        code = OK
    except grpc.RpcError as error:
        reply, code = None, error.code()
        assert code in ALLOWED, f"{method}: {code.name}: {error.details()}"
        assert error.details(), f"{method}: {code.name} without a message"
    CALLS[method, code.name] += 1
    return code, reply


def check_forward_reply(request: pb.ForwardRequest, reply: pb.ForwardResponse) -> None:
    assert len(reply.outputs) == 1
    output = deserialize(reply.outputs[0], max_numel=1 << 20)
    assert tuple(output.shape) == tuple(request.inputs[0].shape) and bool(torch.isfinite(output).all())


def check_backward_reply(request: pb.BackwardRequest, reply: pb.BackwardResponse) -> None:
    BACKWARD_OK[request.uid] += 1
    assert len(reply.grad_inputs) == 1
    assert tuple(deserialize(reply.grad_inputs[0], max_numel=1 << 20).shape) == tuple(request.inputs[0].shape)


def raw_unary(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    return channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def raw_stream(channel: grpc.Channel, method: str) -> Callable[..., Iterable[bytes]]:
    return channel.stream_stream(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def joined(chunks: Iterable[pb.Chunk]) -> bytes:
    return b"".join(chunk.data for chunk in chunks)


# ---- baseline and the final check ------------------------------------------------------------------
FIXED_INPUT = torch.linspace(-1, 1, 4 * HIDDEN).reshape(4, HIDDEN)


def fixed_forward(service, uid: str) -> torch.Tensor:
    reply = service.Forward(pb.ForwardRequest(uid=uid, inputs=[serialize(FIXED_INPUT)]), timeout=30)
    return deserialize(reply.outputs[0], max_numel=1 << 20)


@pytest.fixture(scope="module")
def baseline(service) -> dict[str, tuple[int, torch.Tensor]]:
    """Each expert's version and its output for FIXED_INPUT, before any fuzzing."""
    return {uid: (expert_version(service, uid), fixed_forward(service, uid)) for uid in UIDS}


def assert_node_unchanged(service, baseline: dict[str, tuple[int, torch.Tensor]]) -> None:
    """The node still serves; versions moved by the successful Backward calls alone; an expert that
    no Backward changed answers FIXED_INPUT exactly as before."""
    for uid, (version, output) in baseline.items():
        now = fixed_forward(service, uid)
        assert expert_version(service, uid) == version + BACKWARD_OK[uid], (uid, BACKWARD_OK)
        if BACKWARD_OK[uid] == 0:
            torch.testing.assert_close(now, output, rtol=0, atol=0)
    assert BACKWARD_OK[UIDS[1]] == 0  # the witness: no Backward named it


# ---- property tests --------------------------------------------------------------------------------
def test_forward_requests(service, baseline):
    @settings(max_examples=examples(300), **SETTINGS)
    @given(forward_requests())
    def forward(request: pb.ForwardRequest) -> None:
        code, reply = outcome("Forward", lambda: service.Forward(request, timeout=30))
        if code == OK:
            check_forward_reply(request, reply)

    forward()
    assert_node_unchanged(service, baseline)
    assert CALLS["Forward", "OK"] > 0 and CALLS["Forward", "INVALID_ARGUMENT"] > 0  # deep, and refused
    assert CALLS["Forward", "NOT_FOUND"] > 0 and CALLS["Forward", "RESOURCE_EXHAUSTED"] > 0


def test_backward_requests(service, baseline):
    @settings(max_examples=examples(300), **SETTINGS)
    @given(backward_requests())
    def backward(request: pb.BackwardRequest) -> None:
        code, reply = outcome("Backward", lambda: service.Backward(request, timeout=30))
        if code == OK:
            check_backward_reply(request, reply)

    backward()
    assert_node_unchanged(service, baseline)
    assert CALLS["Backward", "INVALID_ARGUMENT"] > 0 and CALLS["Backward", "NOT_FOUND"] > 0


@pytest.mark.parametrize("method", ["Forward", "Backward", "Info"])
def test_raw_bytes_to_unary_methods(channel, service, baseline, method):
    call = raw_unary(channel, method)

    @settings(max_examples=examples(150), **SETTINGS)
    @given(raw_messages)
    def raw(data: bytes) -> None:
        code, _ = outcome(f"{method} (raw)", lambda: call(data, timeout=30))
        if code == OK and method == "Backward":
            BACKWARD_OK[pb.BackwardRequest.FromString(data).uid] += 1

    raw()
    assert_node_unchanged(service, baseline)


@pytest.mark.parametrize("method", ["ForwardStream", "BackwardStream"])
def test_chunk_streams(service, baseline, method):
    backward = method == "BackwardStream"
    call = getattr(service, method)

    @settings(max_examples=examples(100), **SETTINGS)
    @given(chunk_streams(backward))
    def stream(chunks: list[pb.Chunk]) -> None:
        code, _ = outcome(method, lambda: list(call(iter(chunks), timeout=30)))
        if code == OK and backward:
            BACKWARD_OK[pb.BackwardRequest.FromString(joined(chunks)).uid] += 1

    stream()
    assert_node_unchanged(service, baseline)


@pytest.mark.parametrize("method", ["ForwardStream", "BackwardStream"])
def test_raw_bytes_as_stream_messages(channel, service, baseline, method):
    """Stream messages that are not even Chunks (the streams parse Chunks with grpc's deserialiser)."""
    call = raw_stream(channel, method)
    chunk = pb.Chunk(data=good_request()).SerializeToString()

    @settings(max_examples=examples(60), **SETTINGS)
    @given(st.lists(st.one_of(st.binary(max_size=64), mutated(chunk)), max_size=4))
    def stream(messages: list[bytes]) -> None:
        code, _ = outcome(f"{method} (raw)", lambda: list(call(iter(messages), timeout=30)))
        if code == OK and method == "BackwardStream":
            BACKWARD_OK[pb.BackwardRequest.FromString(joined(map(pb.Chunk.FromString, messages))).uid] += 1

    stream()
    assert_node_unchanged(service, baseline)


def test_info_requests(service, baseline):
    @settings(max_examples=examples(150), **SETTINGS)
    @given(info_requests)
    def info(request: pb.InfoRequest) -> None:
        code, reply = outcome("Info", lambda: service.Info(request, timeout=30))
        named = list(dict.fromkeys(request.uids))
        if len(request.uids) > MAX_INFO_UIDS:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        elif any(uid not in UIDS for uid in named):
            assert code == grpc.StatusCode.NOT_FOUND
        else:
            assert code == OK and [e.uid for e in reply.experts] == (named or UIDS)

    info()
    assert_node_unchanged(service, baseline)
    assert {code for method, code in CALLS if method == "Info"} >= {"OK", "NOT_FOUND", "RESOURCE_EXHAUSTED"}


@pytest.mark.parametrize("method", ["ForwardStream", "BackwardStream"])
def test_stream_framing(channel, service, baseline, method):
    backward = method == "BackwardStream"
    call = raw_stream(channel, method)
    good = pb.Chunk(data=good_request()).SerializeToString()

    @settings(max_examples=examples(120), **SETTINGS)
    @given(framed_streams(backward))
    def stream(drawn: tuple[str, list[bytes]]) -> None:
        framing, messages = drawn
        code, _ = outcome(f"{method} ({framing})", lambda: list(call(iter(messages), timeout=30)))
        if framing == "empty chunk":
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        elif framing == "overlong":
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        elif framing == "in order" and not backward and messages[0] == good:
            assert code == OK
        if code == OK and backward:
            BACKWARD_OK[pb.BackwardRequest.FromString(joined(map(pb.Chunk.FromString, messages))).uid] += 1

    stream()
    assert_node_unchanged(service, baseline)
    framings = {m.split(" (")[1].rstrip(")") for m, _ in CALLS
                if m.startswith(f"{method} (") and "raw" not in m}
    assert framings == set(FRAMINGS), framings


def test_node_serves_and_is_unchanged_after_fuzzing(service, baseline, record_property, capsys):
    assert_node_unchanged(service, baseline)
    total = sum(CALLS.values())
    record_property("calls", total)
    record_property("calls_by_outcome", dict(sorted((f"{m}: {c}", n) for (m, c), n in CALLS.items())))
    with capsys.disabled():
        print(f"\nnode fuzzing: {total} calls, {sum(BACKWARD_OK.values())} Backward OK")
        for (method, code), n in sorted(CALLS.items()):
            print(f"  {method:<24} {code:<20} {n}")


# ---- the coverage-guided fuzzer, briefly -----------------------------------------------------------
@pytest.mark.timeout(FUZZER_TIMEOUT_S + 60)
def test_coverage_guided_fuzzer(tmp_path, record_property):
    """fuzz/fuzz_request.py runs FUZZER_RUNS inputs, reaches both acceptance and every refusal code,
    crashes on nothing and changes no parameter."""
    report_path = tmp_path / "fuzz.json"
    result = subprocess.run(
        [sys.executable, str(FUZZER), "--runs", str(FUZZER_RUNS), "--json", str(report_path),
         f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, capture_output=True, text=True, timeout=FUZZER_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    report = json.loads(report_path.read_text())
    record_property("fuzzer_inputs", report["inputs"])
    assert report["inputs"] == FUZZER_RUNS
    assert report["parameters_unchanged"] and report["crash"] is None
    assert report["accepted"] > 0 and report["accepted_backward"] > 0
    assert {code for code, n in report["refused"].items() if n} == {code.name for code in REFUSALS}
    assert report["accepted"] + sum(report["refused"].values()) == report["inputs"]
    kinds = {kind for kind, n in report["kinds"].items() if n}
    assert kinds == {f"{kind} {end}" for kind in ("request", "info", "stream", "batch", "packed")
                     for end in ("accepted", "refused")}
    assert not list(tmp_path.glob("crash-*"))
