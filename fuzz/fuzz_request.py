"""Coverage-guided fuzzing of a node's request path, in-process, with atheris (libFuzzer).

Each fuzz input is one selector byte followed by a payload:

- bits 4-5, what the payload is: 0, a serialized request (a unary Forward or Backward); 1, a
  serialized ``InfoRequest``; 2, a request stream: frames of a 2-byte little-endian length and that
  many bytes, each frame one stream message (a serialized ``Chunk``, or anything); 3, a batched
  request (a ``ForwardBatchRequest`` or ``BackwardBatchRequest``; with bit 6 set, a ``PackedRequest``);
- bit 0: the request is a ``BackwardRequest`` (set) or a ``ForwardRequest`` (so are a batch's parts);
- bit 1: replace the request's uid by a hosted one, so that mutated requests keep reaching an expert
  (a batch's parts: the hosted experts in turn);
- bits 2-3: which hosted expert, when bit 1 is set.

A request takes the path ``ExpertService`` takes before it queues one: ``_parse``, then
``check_declared_request`` and ``decode_request`` (``dmoe.node.service``); an accepted request then
runs one forward on its expert. Backward is never run: it changes parameters. A stream's messages
are joined by ``ChunkJoiner`` first (within ``STREAM_MAX_BYTES``, so that overlong streams are
reached), and what they join to takes the same path. A batched request is split into its parts
(``batch_parts``: the whole batch may be refused), and each of its first ``BATCH_PARTS_RUN`` parts
takes the request path alone; a part refused must be refused like a request, and the other parts go
on. A packed request takes the packed path (``parse_packed``: the whole call may be refused; then
``check_packed_part`` for each part and ``decode_packed``), and each of its first ``BATCH_PARTS_RUN``
accepted parts runs one forward. An Info payload goes to
``check_info_request`` (at most ``MAX_INFO_UIDS`` uids), whose answer must be the request's uids,
each once, all hosted.
The experts are real ``ExpertBackend`` objects on the CPU, built by
``dmoe.node.experts.build_backend`` with the limits of a default ``NodeConfig``: ``ffn.0`` and
``ffn.1`` (feed-forward, inputs ``[tokens, 8]``) and ``attn.0`` (transformer block, ``[batch, seq, 8]``).

An input may end in two ways only: accepted, or refused with ``RequestError`` and one of
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, OUT_OF_RANGE and a message. Anything else is a crash
that libFuzzer reports with the input saved as ``crash-<sha1>``: another exception or status code,
decoded tensors that are not what the request declared, or forward outputs that differ from
``output_shapes``.
At the end the script prints a table and writes a JSON report (inputs tried, accepted, refused per
code, seconds, whether every expert parameter equals a copy taken before fuzzing); it exits with 3
when a parameter changed. The report is written from a C ``on_exit`` handler, because libFuzzer ends
the process with ``exit()`` and Python's own ``atexit`` handlers never run.

Run:
    python fuzz/fuzz_request.py --seconds 60 --json /tmp/fuzz.json
    python fuzz/fuzz_request.py --runs 20000 -artifact_prefix=/tmp/crashes/ CORPUS_DIR
    python fuzz/fuzz_request.py crash-<sha1>        # replay saved inputs
Arguments the script does not know go to libFuzzer (flags like ``-dict=``, corpus directories: the
first one given receives the new inputs). Seed requests (valid ones in every compression, a few
that each refusal code answers, Info requests, and streams in order, out of order, with an empty
chunk, overlong and with garbage) are written to a temporary corpus directory.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import atheris
import grpc
import numpy as np
import torch

with atheris.instrument_imports(include=["dmoe"]):
    from dmoe.core.wire import DTYPES, dtype_name, serialize
    from dmoe.node.backend import ExpertBackend
    from dmoe.node.config import NodeConfig
    from dmoe.node.experts import build_backend
    from dmoe.node.service import (
        MAX_BATCH_PARTS,
        ChunkJoiner,
        RequestError,
        _parse,
        batch_parts,
        check_declared_request,
        check_info_request,
        check_packed_part,
        decode_packed,
        decode_request,
        parse_packed,
    )
    from dmoe.proto import expert_pb2 as pb

ALLOWED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.OUT_OF_RANGE)
HIDDEN = 8
MAX_LEN = 4096  # bytes per input: buffers stay small, the declared shapes do not
KINDS = ("request", "info", "stream", "batch")  # by bits 4-5 of the selector
PACKED = 1 << 6  # with "batch": a packed request
MAX_INFO_UIDS = 16  # the Info limit here (the node's default is far above what MAX_LEN could name)
STREAM_MAX_BYTES = 2048  # max_request_bytes of the streams here, so that inputs can pass it
BATCH_PARTS_RUN = 4  # parts of a batch that take the request path (each is as costly as a request)
LIBFUZZER_DEFAULTS = [f"-max_len={MAX_LEN}", "-rss_limit_mb=2048", "-timeout=60"]
FFN = NodeConfig(experts=["ffn.[0:2]"], hidden_dim=HIDDEN, inner_dim=2 * HIDDEN, device="cpu")
ATTN = NodeConfig(experts=["attn.[0:1]"], expert_cls="transformer", hidden_dim=HIDDEN, inner_dim=2 * HIDDEN,
                  device="cpu")
Snapshot = dict[str, dict[str, torch.Tensor]]
_EXIT_HOOKS: list[ctypes._CFuncPtr] = []


@dataclasses.dataclass(slots=True)
class Report:
    """What the fuzzer has seen so far."""

    inputs: int = 0
    accepted: int = 0
    accepted_backward: int = 0  # decoded BackwardRequests (their forward ran, never their backward)
    refused: Counter[str] = dataclasses.field(default_factory=Counter)  # status code name -> inputs
    kinds: Counter[str] = dataclasses.field(default_factory=Counter)  # "<kind> accepted|refused" -> inputs
    parts: Counter[str] = dataclasses.field(default_factory=Counter)  # batches' parts: "accepted" or a code
    started: float = dataclasses.field(default_factory=time.monotonic)
    crash: str | None = None  # traceback of the input that crashed the fuzzer


def make_backends() -> dict[str, ExpertBackend]:
    cpu = torch.device("cpu")
    return {uid: build_backend(uid, config, cpu) for config in (FFN, ATTN) for uid in config.uids}


def snapshot(backends: dict[str, ExpertBackend]) -> Snapshot:
    return {uid: {name: value.detach().clone() for name, value in b.module.state_dict().items()}
            for uid, b in backends.items()}


def unchanged(backends: dict[str, ExpertBackend], before: Snapshot) -> bool:
    after = snapshot(backends)
    return all(b.version == 0 and not b.optimizer.state for b in backends.values()) and all(
        after[uid].keys() == tensors.keys() and all(torch.equal(after[uid][k], v) for k, v in tensors.items())
        for uid, tensors in before.items())


class Target:
    """The function libFuzzer calls, the experts it drives and what it has seen so far."""

    def __init__(self, backends: dict[str, ExpertBackend]):
        self.backends, self.uids = backends, sorted(backends)
        self.report = Report()

    def __call__(self, data: bytes) -> None:
        self.report.inputs += 1
        kind = KINDS[(data[0] >> 4) & 3] if data else KINDS[0]
        if kind == "batch" and data[0] & PACKED:
            kind = "packed"
        try:
            backward = self.run(data)
        except RequestError as e:
            if e.code not in ALLOWED or not e.message:
                self.report.crash = f"RequestError {e.code.name}: {e.message!r}"
                raise
            self.report.refused[e.code.name] += 1
            self.report.kinds[f"{kind} refused"] += 1
        except BaseException:
            self.report.crash = traceback.format_exc()
            raise
        else:
            self.report.accepted += 1
            self.report.accepted_backward += backward
            self.report.kinds[f"{kind} accepted"] += 1

    def run(self, data: bytes) -> bool:
        selector, payload = (data[0], data[1:]) if data else (0, b"")
        kind = KINDS[(selector >> 4) & 3]
        if kind == "info":
            self.run_info(payload)
            return False
        if kind == "stream":
            joiner = ChunkJoiner(STREAM_MAX_BYTES)
            for message in frames(payload):
                joiner.add(message)
            payload = joiner.join()
            expect(len(payload) == joiner.num_bytes <= STREAM_MAX_BYTES,
                   f"a stream joined to {len(payload)} bytes, {joiner.num_bytes} counted")
        backward = bool(selector & 1)
        request_cls = pb.BackwardRequest if backward else pb.ForwardRequest
        if kind == "batch":
            if selector & PACKED:
                return self.run_packed(selector, payload, backward)
            return self.run_batch(selector, payload, backward)
        request = _parse(request_cls, payload)
        if selector & 2:
            request.uid = self.uids[(selector >> 2) % len(self.uids)]
        return self.run_request(request, backward)

    def run_batch(self, selector: int, payload: bytes, backward: bool) -> bool:
        """The first BATCH_PARTS_RUN parts of a batch on the request path (the others are checked as
        the node does before any part is parsed, and take the same path as these would); a part
        refused is counted and the others go on."""
        parts = batch_parts(payload, backward=backward)
        expect(len(parts) <= MAX_BATCH_PARTS, f"a batch of {len(parts)} parts passed batch_parts")
        expect(sum(len(p) for p in parts) <= len(payload), "parts longer than their batch")
        accepted_backward = False
        for index, part in enumerate(parts[:BATCH_PARTS_RUN]):
            try:
                request = _parse(pb.BackwardRequest if backward else pb.ForwardRequest, part)
                if selector & 2:
                    request.uid = self.uids[((selector >> 2) + index) % len(self.uids)]
                accepted_backward |= self.run_request(request, backward)
            except RequestError as e:
                if e.code not in ALLOWED or not e.message:
                    self.report.crash = f"RequestError {e.code.name} of part {index}: {e.message!r}"
                    raise AssertionError(self.report.crash) from None
                self.report.parts[e.code.name] += 1
            else:
                self.report.parts["accepted"] += 1
        return accepted_backward

    def run_packed(self, selector: int, payload: bytes, backward: bool) -> bool:
        """A packed request on the path the node takes (parse, each part checked, the tensors decoded and the
        parts' values checked), then one forward for each of its first BATCH_PARTS_RUN parts accepted; a
        part refused is counted and the others go on."""
        request = parse_packed(payload, backward=backward, max_batch_tokens=FFN.max_batch_tokens)
        rows, shape = list(request.rows), tuple(request.inputs.shape)
        expect(0 < len(rows) == len(request.uids) <= MAX_BATCH_PARTS and min(rows) >= 1
               and sum(rows) == shape[0], f"packed rows {rows[:8]} for inputs {list(shape)} passed")
        if selector & 2:
            for index in range(len(request.uids)):
                request.uids[index] = self.uids[((selector >> 2) + index) % len(self.uids)]
        checked: dict[int, ExpertBackend] = {}
        refused: dict[int, RequestError] = {}
        for index, (uid, n) in enumerate(zip(request.uids, rows)):
            try:
                checked[index], _ = check_packed_part(self.backends, uid, (n, *shape[1:]), request,
                                                      backward=backward,
                                                      max_batch_tokens=FFN.max_batch_tokens)
            except RequestError as e:
                refused[index] = e
        if checked:
            xs, grads, bad = decode_packed(request, rows, checked, backward=backward,
                                           max_input_abs=FFN.max_input_abs, max_grad_abs=FFN.max_grad_abs)
            refused.update(bad)
            expect(set(xs) == set(checked) and (grads is None or set(grads) == set(checked)),
                   "decode_packed answered for other parts than those checked")
        for index, e in refused.items():
            if e.code not in ALLOWED or not e.message:
                self.report.crash = f"RequestError {e.code.name} of packed part {index}: {e.message!r}"
                raise AssertionError(self.report.crash)
            self.report.parts[e.code.name] += 1
        accepted = [i for i in checked if i not in refused]
        for index in accepted[:BATCH_PARTS_RUN]:
            x = xs[index]
            expect(tuple(x.shape) == (rows[index], *shape[1:]) and x.dtype == DTYPES[request.inputs.dtype],
                   f"part {index} decoded to {list(x.shape)} x {x.dtype}")
            (output,) = checked[index].forward([x])
            expect(output.shape == x.shape and output.dtype == x.dtype,
                   f"part {index}: outputs {list(output.shape)} for inputs {list(x.shape)}")
            self.report.parts["accepted"] += 1
        return backward and bool(accepted)

    def run_request(self, request: pb.ForwardRequest | pb.BackwardRequest, backward: bool) -> bool:
        """One parsed request on the path ExpertService takes before it queues it, and one forward."""
        backend, rows, num_tokens = check_declared_request(self.backends, request,
                                                           max_batch_tokens=FFN.max_batch_tokens)
        inputs, grads = decode_request(backend, request, backward=backward,
                                       max_input_abs=FFN.max_input_abs, max_grad_abs=FFN.max_grad_abs)
        # accepted: what was decoded must be what was declared, and what check_declared_request promised
        shapes = [tuple(t.shape) for t in request.inputs]
        expect(0 < num_tokens <= FFN.max_batch_tokens, f"{num_tokens} tokens passed check_declared_request")
        expect(len(inputs) == len(backend.input_schema),
               f"{len(inputs)} inputs passed check_declared_request")
        expect_decoded(inputs, request.inputs, backend.max_numel)
        expect(all(t.shape[0] == rows for t in inputs), f"inputs of {shapes} do not all have {rows} rows")
        expect((grads is not None) == backward, "grad_outputs decoded for Forward, or missing for Backward")
        if grads is not None:
            expect_decoded(grads, request.grad_outputs, backend.max_numel)
        outputs = backend.forward(inputs)
        got = [(tuple(o.shape), dtype_name(o.dtype)) for o in outputs]
        expect(got == backend.output_shapes(shapes), f"outputs {got} for inputs {shapes}, not output_shapes")
        return backward

    def run_info(self, payload: bytes) -> None:
        uids = check_info_request(self.backends, payload, max_info_uids=MAX_INFO_UIDS)
        named = list(pb.InfoRequest.FromString(payload).uids)
        expect(uids == list(dict.fromkeys(named)), f"Info answers {uids} for {named}")
        expect(len(uids) <= MAX_INFO_UIDS and all(uid in self.backends for uid in uids),
               f"Info accepted {uids}")


def frames(payload: bytes) -> list[bytes]:
    """A stream's messages: each a 2-byte little-endian length, then that many bytes (fewer at the end)."""
    found, at = [], 0
    while at < len(payload):
        size = int.from_bytes(payload[at : at + 2], "little")
        found.append(payload[at + 2 : at + 2 + size])
        at += 2 + size
    return found


def framed(messages: Sequence[bytes]) -> bytes:
    return b"".join(len(m).to_bytes(2, "little") + m for m in messages)


def expect(condition: bool, message: str) -> None:
    """An oracle (not an assert, so that python -O keeps it)."""
    if not condition:
        raise AssertionError(message)


def expect_decoded(tensors: list[torch.Tensor], messages: Sequence[pb.Tensor], max_numel: int) -> None:
    expect(len(tensors) == len(messages), f"{len(messages)} tensors decoded to {len(tensors)}")
    for tensor, message in zip(tensors, messages):
        expect(tuple(tensor.shape) == tuple(message.shape) and tensor.dtype == DTYPES[message.dtype],
               f"{list(message.shape)} x {message.dtype} decoded to {list(tensor.shape)} x {tensor.dtype}")
        expect(tensor.numel() <= max_numel, f"{tensor.numel()} elements decoded, above max_numel {max_numel}")


def seeds(backends: dict[str, ExpertBackend]) -> list[bytes]:
    """Valid requests for every expert in every compression, then one for each refusal code."""
    uids = sorted(backends)
    generator = torch.Generator().manual_seed(0)
    found: list[bytes] = []
    for uid, backend in sorted(backends.items()):
        shape = [2, 3, HIDDEN] if len(backend.input_schema[0].shape) == 3 else [3, HIDDEN]
        x = torch.randn(shape, generator=generator)
        grad = torch.randn(backend.output_shapes([tuple(shape)])[0][0], generator=generator)
        for compression in (pb.NONE, pb.FLOAT16, pb.UNIFORM_8BIT):
            inputs = [serialize(x, compression)]
            forward = pb.ForwardRequest(uid=uid, inputs=inputs, reply_compression=compression)
            backward = pb.BackwardRequest(uid=uid, inputs=inputs, grad_outputs=[serialize(grad, compression)])
            found += [b"\x00" + forward.SerializeToString(), b"\x01" + backward.SerializeToString()]
            forward.uid = backward.uid = ""
            forced = 2 | uids.index(uid) << 2
            found += [bytes([forced]) + forward.SerializeToString(),
                      bytes([forced | 1]) + backward.SerializeToString()]
    good = serialize(torch.zeros(2, HIDDEN))
    nan = pb.Tensor(shape=[1, HIDDEN], dtype="float32", buffer=np.full(HIDDEN, np.nan, np.float32).tobytes())
    too_many = pb.Tensor(shape=[1 << 20, HIDDEN], dtype="float32")
    refused = [
        pb.ForwardRequest(uid="ffn.99", inputs=[good]),  # NOT_FOUND
        pb.ForwardRequest(uid="ffn.0", inputs=[too_many]),  # RESOURCE_EXHAUSTED
        pb.ForwardRequest(uid="ffn.0", inputs=[nan]),  # INVALID_ARGUMENT: the values
        pb.ForwardRequest(uid="ffn.0", inputs=[serialize(torch.full((2, HIDDEN), 1e9))]),  # OUT_OF_RANGE
        pb.ForwardRequest(uid="ffn.0", inputs=[good], reply_compression=7),  # INVALID_ARGUMENT: the schema
    ]
    undecodable = b"\x01\xff\xff"
    return (found + [b"\x00" + r.SerializeToString() for r in refused] + [undecodable]
            + info_seeds(uids) + stream_seeds(found[0][1:], found[1][1:]) + batch_seeds(found, refused)
            + packed_seeds())


INFO, STREAM = bytes([1 << 4]), 2 << 4


def info_seeds(uids: list[str]) -> list[bytes]:
    """Info requests: all, some, repeated, one unknown, too many, garbage."""
    requests = [[], uids[:1], uids, uids * 3, [uids[0], "ffn.99"], [uids[0]] * (MAX_INFO_UIDS + 1)]
    return [INFO + pb.InfoRequest(uids=r).SerializeToString() for r in requests] + [INFO + b"\x0a\xff"]


def stream_seeds(forward: bytes, backward: bytes) -> list[bytes]:
    """A Forward and a Backward in order, in chunks of 64 bytes, then the same Forward out of order,
    with an empty chunk, overlong, with a message that is no Chunk, and in one chunk with two data fields."""
    def chunks(data: bytes, size: int = 64) -> list[bytes]:
        return [pb.Chunk(data=data[i : i + size]).SerializeToString() for i in range(0, len(data), size)]

    in_order = chunks(forward)
    return [
        bytes([STREAM]) + framed(in_order),
        bytes([STREAM | 1]) + framed(chunks(backward)),
        bytes([STREAM]) + framed(in_order[1:] + in_order[:1]),
        bytes([STREAM]) + framed(in_order[:1] + [pb.Chunk().SerializeToString()] + in_order[1:]),
        bytes([STREAM]) + framed(chunks(forward * (STREAM_MAX_BYTES // len(forward) + 1), 512)),
        bytes([STREAM]) + framed(in_order[:1] + [b"\xff\x01garbage"] + in_order[1:]),
        bytes([STREAM]) + framed([pb.Chunk(data=forward[:8]).SerializeToString()
                                  + pb.Chunk(data=forward).SerializeToString()]),
    ]


BATCH = 3 << 4


def batch_seeds(requests: list[bytes], refused: list[pb.ForwardRequest]) -> list[bytes]:
    """Batches: valid requests of each direction (a few experts and compressions), some with the
    refused ones among them, with uids forced, and empty. (A batch of more than MAX_BATCH_PARTS
    parts is tests/unit/node/test_batch_requests.py's: as a seed, mutated, walking its thousand parts
    in instrumented Python took most of the fuzzer's time.)"""
    forward = [pb.ForwardRequest.FromString(r[1:]) for r in requests if r[0] == 0]
    backward = [pb.BackwardRequest.FromString(r[1:]) for r in requests if r[0] == 1]
    return [
        bytes([BATCH]) + pb.ForwardBatchRequest(parts=forward[::4]).SerializeToString(),
        bytes([BATCH | 1]) + pb.BackwardBatchRequest(parts=backward[::4]).SerializeToString(),
        bytes([BATCH]) + pb.ForwardBatchRequest(parts=forward[:2] + refused).SerializeToString(),
        bytes([BATCH | 2]) + pb.ForwardBatchRequest(parts=forward[:3]).SerializeToString(),
        bytes([BATCH]),
    ]


def packed_seeds() -> list[bytes]:
    """Packed requests of each direction and compression for the feed-forward experts, one with a part no
    expert hosts and one with a part of values out of bounds, one with uids forced, and empty."""
    generator = torch.Generator().manual_seed(1)
    x, grad = torch.randn(5, HIDDEN, generator=generator), torch.randn(5, HIDDEN, generator=generator)
    found = []
    for compression in (pb.NONE, pb.FLOAT16, pb.UNIFORM_8BIT):
        forward = pb.PackedRequest(uids=["ffn.0", "ffn.1"], rows=[2, 3], inputs=serialize(x, compression),
                                   reply_compression=compression)
        backward = pb.PackedRequest(uids=["ffn.1", "ffn.0"], rows=[4, 1], inputs=serialize(x, compression),
                                    grad_outputs=serialize(grad, compression))
        found += [bytes([BATCH | PACKED]) + forward.SerializeToString(),
                  bytes([BATCH | PACKED | 1]) + backward.SerializeToString()]
    large = torch.cat([x[:3], torch.full((2, HIDDEN), 1e9)])
    found += [
        bytes([BATCH | PACKED]) + pb.PackedRequest(uids=["ffn.0", "ffn.99"], rows=[3, 2],
                                                   inputs=serialize(x)).SerializeToString(),
        bytes([BATCH | PACKED]) + pb.PackedRequest(uids=["ffn.0", "ffn.1"], rows=[3, 2],
                                                   inputs=serialize(large)).SerializeToString(),
        bytes([BATCH | PACKED | 2]) + pb.PackedRequest(uids=["", "", ""], rows=[1, 1, 3],
                                                       inputs=serialize(x)).SerializeToString(),
        bytes([BATCH | PACKED]),
    ]
    return found


def print_table(summary: dict) -> None:
    rows = [("inputs tried", summary["inputs"]), ("accepted", summary["accepted"]),
            ("  of them Backward", summary["accepted_backward"])]
    rows += [(f"refused {code}", summary["refused"].get(code, 0)) for code in (c.name for c in ALLOWED)]
    rows += [(kind, n) for kind, n in summary["kinds"].items()]
    rows += [(f"batch parts {end}", n) for end, n in summary["parts"].items()]
    rows += [("seconds", f"{summary['seconds']:.1f}"), ("inputs/s", f"{summary['inputs_per_s']:.0f}"),
             ("parameters unchanged", "yes" if summary["parameters_unchanged"] else "NO")]
    if summary["crash"]:
        rows.append(("crash", summary["crash"].strip().splitlines()[-1]))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows), flush=True)


def install_exit_report(write: Callable[[], None]) -> None:
    """Call write() once when the process exits: libFuzzer ends with exit(), which skips Python's
    atexit, so the hook is registered with the C library too (on_exit on glibc)."""
    done = False

    def once(*_) -> None:
        nonlocal done
        if not done:
            done = True
            write()

    hook = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)(once)
    _EXIT_HOOKS.append(hook)  # the C library holds a pointer to it until exit
    libc = ctypes.CDLL(None)
    if hasattr(libc, "on_exit"):
        libc.on_exit(hook, None)
    atexit.register(once)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="other arguments are passed to libFuzzer")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--runs", type=int, help="stop after this many inputs (libFuzzer -runs)")
    stop.add_argument("--seconds", type=float,
                      help="stop after this many seconds (default 60; libFuzzer -max_total_time)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args, extra = parser.parse_known_args(argv[1:])
    torch.set_num_threads(1)
    backends = make_backends()
    before = snapshot(backends)
    target = Target(backends)

    positional = [a for a in extra if not a.startswith("-")]
    replay = bool(positional) and all(os.path.isfile(p) for p in positional)
    corpus = tempfile.mkdtemp(prefix="dmoe-fuzz-seeds-")
    if not replay:
        for i, seed in enumerate(seeds(backends)):
            Path(corpus, f"seed-{i:03d}").write_bytes(seed)
    flags = [*LIBFUZZER_DEFAULTS]
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    elif not replay:
        flags.append(f"-max_total_time={max(1, round(args.seconds if args.seconds is not None else 60))}")
    libfuzzer_args = [*flags, *extra] + ([] if replay else [corpus])

    def write() -> None:
        seconds = time.monotonic() - target.report.started
        report = target.report
        summary = {
            "inputs": report.inputs, "accepted": report.accepted,
            "accepted_backward": report.accepted_backward,
            "refused": dict(report.refused), "kinds": dict(sorted(report.kinds.items())),
            "parts": dict(sorted(report.parts.items())),
            "seconds": round(seconds, 3),
            "inputs_per_s": report.inputs / seconds if seconds > 0 else 0.0,
            "parameters_unchanged": unchanged(backends, before), "experts": sorted(backends),
            "crash": report.crash, "libfuzzer_args": libfuzzer_args,
        }
        shutil.rmtree(corpus, ignore_errors=True)
        print_table(summary)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        sys.stdout.flush()
        if not summary["parameters_unchanged"]:
            print("expert parameters changed while fuzzing", file=sys.stderr, flush=True)
            os._exit(3)

    install_exit_report(write)
    atheris.Setup([argv[0], *libfuzzer_args], target)
    target.report.started = time.monotonic()
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
