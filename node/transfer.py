"""State transfer: an expert's parameters, optimizer state and version, from one node to another.

The wire is ExpertService.GetState (``proto/dmoe/proto/expert.proto``): one request (a uid), and a
reply stream whose first message is a :class:`StateHeader` (uid, expert class, optimizer, version,
each tensor's name, dtype and shape, the total byte size and the sha256 of the bytes), followed by
``data`` messages that carry the tensors' raw little-endian bytes back to back, in the header's
order. The tensors are named as in the node's safetensors checkpoints (``module.<name>``,
``optimizer.<parameter index>.<slot>``; Adam's step is a 0-dim float32 tensor, as torch keeps it).
Nothing a peer sends is executed or unpickled.

- Donor: :func:`export_state` copies an expert's state (under its lock) and hashes it;
  :func:`state_chunks` cuts it into the reply stream.
- Receiver: :func:`receive_state` checks a reply stream against the local expert before anything is
  kept: the uid, expert class and optimizer; every tensor's name, shape and dtype against the local
  expert's own (:meth:`~dmoe.node.backend.ExpertBackend.state_schema`), so the buffer it allocates is
  sized by the local schema, never by the peer; the byte count as announced; the sha256; every value
  finite. Any mismatch raises :class:`StateRefused`.
- :func:`fetch_expert_state` is the client call (also what replica averaging uses to read a
  replica's parameters): it dials a node (TLS and the call token in a private swarm), bounds the
  call by a deadline and by the longest silence it waits for, and returns an :class:`ExpertState`.
- :mod:`dmoe.node.joining` uses it at a node's start, before the node announces its experts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from dmoe.core.auth import SwarmKey, fullmethod
from dmoe.core.wire import DTYPES, dtype_name
from dmoe.node.backend import ExpertBackend
from dmoe.proto import expert_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ExpertService"].full_name
GET_STATE = fullmethod(SERVICE, "GetState")
MAX_STATE_MESSAGE_BYTES = 8 << 20  # largest GetState reply message a receiver reads (data: <= 1 MiB)
MAX_VERSION = 1 << 62
DEFAULT_STALL_TIMEOUT = 10.0
MiB = 1 << 20


def call_timeout(num_bytes: int, *, stall_timeout: float, min_bytes_per_second: float) -> float:
    """The deadline of a GetState call for a state of ``num_bytes``: one ``stall_timeout`` for the first
    message, the bytes at the slowest rate waited for, and one more ``stall_timeout``, so that a replica
    that falls silent (after its first message or before) is given up by the stall check, as stalled,
    and the deadline ends only a replica that keeps sending but too slowly."""
    return 2 * stall_timeout + num_bytes / min_bytes_per_second


class TransferError(Exception):
    """No state from this replica: the call failed, timed out, or its state was refused."""


class StateRefused(TransferError):
    """The replica's reply does not pass the checks: it is malformed, does not fit the local expert,
    or is not the state it announced."""


class ReplicaBusy(TransferError):
    """The replica serves as many state transfers as it allows at once (RESOURCE_EXHAUSTED): the same
    replica is worth asking again shortly, unlike one that failed."""


class NotNewer(TransferError):
    """The replica's state is not newer than the version the caller asked to exceed."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version


@dataclasses.dataclass(kw_only=True, slots=True)
class ExpertState:
    """An expert's state as received from a replica, checked against the local expert."""

    uid: str
    expert_cls: str
    optimizer: str  # the optimizer's name ("adam")
    version: int  # optimizer steps applied
    tensors: dict[str, torch.Tensor]  # checkpoint layout: module.<name>, optimizer.<index>.<slot>
    with_optimizer: bool  # False: fetched without the optimizer's state (parameters only)
    num_bytes: int  # of the tensors, as they travelled
    sha256: str  # hex digest of those bytes
    endpoint: str = ""  # where it came from
    seconds: float = 0.0  # how long the call took

    @property
    def parameters(self) -> dict[str, torch.Tensor]:
        """The module's state (its state_dict), by name without the ``module.`` prefix."""
        return {k.removeprefix("module."): v for k, v in self.tensors.items() if k.startswith("module.")}

    def metadata(self) -> dict[str, str]:
        """The metadata a checkpoint of this state carries."""
        return {"uid": self.uid, "expert_cls": self.expert_cls, "optimizer": self.optimizer,
                "version": str(self.version)}

    def load_into(self, backend: ExpertBackend) -> None:
        """Make ``backend`` this state: parameters, optimizer state and version (CheckpointError,
        changing nothing, if it does not fit). Only a state fetched with the optimizer's."""
        if not self.with_optimizer:
            raise ValueError("a state fetched without its optimizer's cannot replace an expert's")
        backend.load_state_tensors(self.tensors, self.metadata())


# ---- donor ----------------------------------------------------------------------------------------
def export_state(backend: ExpertBackend, *, optimizer: bool = True
                 ) -> tuple[pb.StateHeader, list[memoryview]]:
    """The header of ``backend``'s state and the raw bytes of its tensors, in the header's order.
    Copies the state (under the expert's lock) and hashes it: run it off the event loop."""
    if sys.byteorder != "little":
        raise RuntimeError("the wire carries little-endian tensors; this machine is big-endian")
    tensors, metadata = backend.state_tensors(optimizer=optimizer)
    header = pb.StateHeader(uid=metadata["uid"], expert_cls=metadata["expert_cls"],
                            optimizer=metadata["optimizer"], version=int(metadata["version"]))
    hasher, views, total = hashlib.sha256(), [], 0
    for name, tensor in tensors.items():
        dtype = dtype_name(tensor.dtype)
        if dtype not in DTYPES:
            raise ValueError(f"{backend.uid}: {name} is {dtype}, which the wire does not carry")
        view = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        header.tensors.add(name=name, dtype=dtype, shape=list(tensor.shape))
        hasher.update(view)
        views.append(view)
        total += view.nbytes
    header.total_bytes, header.sha256 = total, hasher.digest()
    return header, views


def state_chunks(header: pb.StateHeader, views: Sequence[memoryview], chunk_bytes: int
                 ) -> Iterator[pb.StateChunk]:
    """The reply stream of GetState: the header, then the bytes of ``views`` back to back in data
    messages of at most ``chunk_bytes`` (a message may span tensors)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    yield pb.StateChunk(header=header)
    pieces: list[memoryview] = []
    held = 0
    for view in views:
        start = 0
        while start < view.nbytes:
            piece = view[start : start + chunk_bytes - held]
            pieces.append(piece)
            held += piece.nbytes
            start += piece.nbytes
            if held == chunk_bytes:
                yield pb.StateChunk(data=b"".join(pieces))
                pieces, held = [], 0
    if held:
        yield pb.StateChunk(data=b"".join(pieces))


# ---- receiver -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class _Slice:
    name: str
    shape: tuple[int, ...]
    dtype: str
    start: int
    stop: int


def check_header(header: pb.StateHeader, *, uid: str, expect: ExpertBackend, schema: Mapping[str, tuple],
                 newer_than: int | None) -> list[_Slice]:
    """Where each tensor lies in the bytes that follow ``header``, if the header fits the local
    expert (``schema`` is its :meth:`~dmoe.node.backend.ExpertBackend.state_schema`); else
    StateRefused (NotNewer if its version is not above ``newer_than``)."""
    if header.uid != uid:
        raise StateRefused(f"state of {header.uid!r} sent for {uid!r}")
    if header.expert_cls != expect.expert_cls:
        raise StateRefused(f"expert class {header.expert_cls!r}, this node's is {expect.expert_cls!r}")
    if header.optimizer != expect.optimizer_name:
        raise StateRefused(f"optimizer {header.optimizer!r}, this node's is {expect.optimizer_name!r}")
    if not 0 <= header.version <= MAX_VERSION:
        raise StateRefused(f"version {header.version} out of range")
    if newer_than is not None and header.version <= newer_than:
        raise NotNewer(f"version {header.version}, not newer than {newer_than}", header.version)
    if len(header.tensors) > len(schema):
        raise StateRefused(f"{len(header.tensors)} tensors, this expert has at most {len(schema)}")
    slices, offset, seen = [], 0, set()
    slots_by_param: dict[str, set[str]] = {}
    for tensor in header.tensors:
        name, shape = tensor.name, tuple(tensor.shape)
        if name in seen:
            raise StateRefused(f"tensor {name!r} twice")
        seen.add(name)
        if name not in schema:
            raise StateRefused(f"unknown tensor {name!r}")
        if name.startswith("optimizer."):  # (in the schema only when the optimizer's state was asked for)
            index, slot = name.removeprefix("optimizer.").split(".", 1)
            slots_by_param.setdefault(index, set()).add(slot)
        want_shape, want_dtype = schema[name]
        if shape != tuple(want_shape) or tensor.dtype != want_dtype:
            raise StateRefused(f"{name} is {tensor.dtype}{list(shape)}, this expert's is "
                               f"{want_dtype}{list(want_shape)}")
        size = math.prod(shape) * DTYPES[tensor.dtype].itemsize
        slices.append(_Slice(name, shape, tensor.dtype, offset, offset + size))
        offset += size
    missing = [name for name in schema if name.startswith("module.") and name not in seen]
    if missing:
        raise StateRefused(f"{len(missing)} of the module's tensors missing, e.g. {missing[0]!r}")
    for index, slots in slots_by_param.items():  # a parameter has all of its optimizer slots, or none
        expected = {n.split(".", 2)[2] for n in schema if n.startswith(f"optimizer.{index}.")}
        if slots != expected:
            raise StateRefused(f"parameter {index} has optimizer slots {sorted(slots)}, "
                               f"expected {sorted(expected)}")
    if header.total_bytes != offset:
        raise StateRefused(f"announces {header.total_bytes} bytes, its tensors hold {offset}")
    if len(header.sha256) != hashlib.sha256().digest_size:
        raise StateRefused("no sha256 of the state")
    return slices


async def receive_state(messages: AsyncIterator[bytes], *, uid: str, expect: ExpertBackend,
                        optimizer: bool = True, newer_than: int | None = None) -> ExpertState:
    """The state a GetState reply stream (its serialized messages) carries, once every check of the
    module docstring has passed; else StateRefused or NotNewer (raised after the header alone)."""
    schema = expect.state_schema(optimizer=optimizer)
    header_message = _parse(await anext(messages, None))
    if header_message is None or header_message.WhichOneof("part") != "header":
        raise StateRefused("the reply does not start with a header")
    header = header_message.header
    slices = check_header(header, uid=uid, expect=expect, schema=schema, newer_than=newer_than)
    buffer = bytearray(header.total_bytes)  # == the local schema's size of the tensors announced
    view, received, hasher = memoryview(buffer), 0, hashlib.sha256()
    async for data in messages:
        message = _parse(data)
        if message is None or message.WhichOneof("part") != "data":
            raise StateRefused("a second header, or an empty message, after the header")
        size = len(message.data)
        if received + size > len(buffer):
            raise StateRefused(f"more than the {len(buffer)} bytes announced")
        view[received : received + size] = message.data
        hasher.update(message.data)
        received += size
    if received != len(buffer):
        raise StateRefused(f"the stream ended after {received} of {len(buffer)} bytes")
    if hasher.digest() != header.sha256:
        raise StateRefused("sha256 of the bytes received does not match the header's")
    tensors = await asyncio.to_thread(_decode, buffer, slices)
    return ExpertState(uid=uid, expert_cls=header.expert_cls, optimizer=header.optimizer,
                       version=header.version, tensors=tensors, with_optimizer=optimizer,
                       num_bytes=len(buffer), sha256=header.sha256.hex())


def _decode(buffer: bytearray, slices: list[_Slice]) -> dict[str, torch.Tensor]:
    """The tensors of ``slices`` (sharing ``buffer``); StateRefused if a float holds NaN or Inf."""
    tensors = {}
    for piece in slices:
        dtype = DTYPES[piece.dtype]
        if piece.stop == piece.start:
            tensor = torch.empty(piece.shape, dtype=dtype)
        else:
            tensor = torch.frombuffer(buffer, dtype=dtype, offset=piece.start,
                                      count=(piece.stop - piece.start) // dtype.itemsize).reshape(piece.shape)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StateRefused(f"{piece.name} holds NaN or Inf")
        tensors[piece.name] = tensor
    return tensors


def _parse(data: bytes | None) -> pb.StateChunk | None:
    if data is None:
        return None
    try:
        return pb.StateChunk.FromString(data)
    except DecodeError as e:
        raise StateRefused(f"undecodable StateChunk: {e}") from None


# ---- the client call ------------------------------------------------------------------------------
async def fetch_expert_state(endpoint: str, uid: str, *, key: SwarmKey | None, tls: bool, timeout: float,
                             expect: ExpertBackend, optimizer: bool = True, newer_than: int | None = None,
                             stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> ExpertState:
    """Expert ``uid``'s state from the node at ``endpoint`` (host:port), checked against ``expect``,
    the local expert of the same uid (see :func:`receive_state`).

    ``key``: the swarm key of a private swarm (None: an open swarm); ``tls``: the node speaks the
    swarm's TLS (its record's ``tls``). ``timeout`` bounds the whole call, ``stall_timeout`` the
    wait for each message. ``optimizer=False`` asks for the parameters alone (a third of the bytes
    with Adam: what replica averaging needs). ``newer_than``: stop after the header unless
    the replica's version is above it (NotNewer). Raises TransferError (StateRefused for a state that
    fails a check) and never loads anything: :meth:`ExpertState.load_into` does that."""
    started = time.perf_counter()
    options = [("grpc.max_receive_message_length", MAX_STATE_MESSAGE_BYTES)]
    if tls:
        if key is None:
            raise TransferError(f"{endpoint} speaks a private swarm's TLS: a swarm key is needed")
        from dmoe.core.tls import channel_credentials

        credentials, tls_options = channel_credentials(key)
        channel = grpc.aio.secure_channel(endpoint, credentials, options=options + tls_options)
    else:
        channel = grpc.aio.insecure_channel(endpoint, options=options)
    async with channel:
        call = channel.unary_stream(GET_STATE, request_serializer=pb.GetStateRequest.SerializeToString,
                                    response_deserializer=None)  # parsed in receive_state: garbage is refused
        stream = call(pb.GetStateRequest(uid=uid, skip_optimizer=not optimizer), timeout=timeout,
                      metadata=key.call_metadata(GET_STATE) if key is not None else None)
        try:
            state = await receive_state(_read(stream, stall_timeout), uid=uid, expect=expect,
                                        optimizer=optimizer, newer_than=newer_than)
        except grpc.aio.AioRpcError as e:
            error = ReplicaBusy if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else TransferError
            raise error(f"{e.code().name}: {e.details()}") from None
        finally:
            stream.cancel()
    state.endpoint, state.seconds = endpoint, time.perf_counter() - started
    return state


async def _read(stream: Any, stall_timeout: float) -> AsyncIterator[bytes]:
    while True:
        try:
            data = await asyncio.wait_for(stream.read(), stall_timeout)
        except TimeoutError:
            raise TransferError(f"nothing received for {stall_timeout:g}s") from None
        if data is grpc.aio.EOF:
            return
        yield data
