"""Tensors on the wire: ``dmoe.proto.Tensor`` <-> ``torch.Tensor``, compression, and chunking.

The encodings themselves are hivemind's (``hivemind.compression``: none, float16, uniform 8-bit);
this module adds what a server reading bytes from strangers needs before it hands them to those
decoders: an allow-list of dtypes, a bound on rank and element count, and an exact check of the
buffer length for every encoding, so a malformed tensor is a :class:`~dmoe.errors.WireError`
(INVALID_ARGUMENT on a node), never a crash or an allocation chosen by the peer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Callable, Iterator

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from dmoe.core.compression import COMPRESSION_NAMES
from dmoe.errors import MessageTooLarge, WireError
from dmoe.proto import expert_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
MAX_RANK = 8
MAX_DIM = 2**31 - 1
CODEBOOK_HEADER_BYTES = 8

_TO_HIVEMIND = {
    pb.NONE: runtime_pb2.CompressionType.NONE,
    pb.FLOAT16: runtime_pb2.CompressionType.FLOAT16,
    pb.UNIFORM_8BIT: runtime_pb2.CompressionType.UNIFORM_8BIT,
}


def compression_from_name(name: str) -> int:
    """'none' | 'fp16' | '8bit' -> the wire enum value."""
    try:
        return COMPRESSION_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; "
                         f"choose one of {', '.join(COMPRESSION_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def serialize(tensor: torch.Tensor, compression: int = pb.NONE) -> pb.Tensor:
    """Encode a tensor; lossy compression applies to floating-point tensors only (others go raw)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    name = dtype_name(tensor.dtype)
    if name not in DTYPES:
        raise WireError(f"dtype {name} cannot be sent; supported: {', '.join(DTYPES)}")
    if name not in FLOAT_DTYPES or tensor.numel() < 2 or (compression == pb.FLOAT16 and name == "bfloat16"):
        compression = pb.NONE
    if name == "bfloat16" and compression == pb.NONE:  # hivemind widens these to fp32 by default;
                                                      # send 2 bytes
        buffer = tensor.contiguous().view(torch.int16).numpy().tobytes()
    elif compression == pb.NONE:  # the bytes hivemind's NoCompression writes, without its per-call objects
        buffer = tensor.contiguous().numpy().tobytes()
    else:
        buffer = serialize_torch_tensor(tensor.contiguous(), _TO_HIVEMIND[compression]).buffer
    return pb.Tensor(buffer=buffer, shape=list(tensor.shape), dtype=name, compression=compression)


def _expected_length(message: pb.Tensor, numel: int) -> int | None:
    """Exact buffer length for this message, or None where the encoding carries its own header."""
    if message.compression == pb.NONE:
        return numel * DTYPES[message.dtype].itemsize
    if message.compression == pb.FLOAT16:
        return numel * 2
    return None


def deserialize(message: pb.Tensor, *, max_numel: int) -> torch.Tensor:
    """Decode a tensor read from the network, or raise WireError saying what is wrong with it."""
    if message.dtype not in DTYPES:
        raise WireError(f"unsupported dtype {message.dtype!r}; supported: {', '.join(DTYPES)}")
    if message.compression not in _TO_HIVEMIND:
        raise WireError(f"unknown compression tag {message.compression}")
    shape = tuple(message.shape)
    if len(shape) > MAX_RANK or any(d < 0 or d > MAX_DIM for d in shape):
        raise WireError(f"invalid shape {list(shape)}")
    numel = math.prod(shape)
    if numel > max_numel:
        raise WireError(f"tensor of {numel} elements exceeds the limit of {max_numel}")
    if message.compression != pb.NONE and message.dtype not in FLOAT_DTYPES:
        raise WireError(f"compression {pb.Compression.Name(message.compression)} needs a float dtype")
    if message.compression == pb.FLOAT16 and message.dtype == "bfloat16":
        raise WireError("FLOAT16 compression does not carry bfloat16 tensors")
    buffer = message.buffer
    expected = _expected_length(message, numel)
    if expected is not None and len(buffer) != expected:
        raise WireError(f"buffer of {len(buffer)} bytes does not hold {numel} x {message.dtype} "
                        f"({expected} bytes)")
    if message.compression == pb.UNIFORM_8BIT:
        tensor = _decode_8bit(buffer, shape, DTYPES[message.dtype])
    elif message.compression == pb.NONE:  # the length is exact (checked above): the values, copied
        dtype = DTYPES[message.dtype]
        tensor = (torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape) if numel
                  else torch.empty(shape, dtype=dtype))
    else:
        encoded = runtime_pb2.Tensor(
            buffer=buffer, size=shape, dtype=message.dtype, compression=_TO_HIVEMIND[message.compression]
        )
        tensor = deserialize_torch_tensor(encoded)
    if tuple(tensor.shape) != shape or tensor.dtype != DTYPES[message.dtype]:
        raise WireError("tensor decoded to the wrong shape or dtype")
    return tensor


def _decode_8bit(buffer: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Checked decoding of hivemind's UNIFORM_8BIT layout (hivemind 1.1.12's own decoder fails under
    numpy >= 2.3, which no longer converts a 1-element array to int)."""
    if len(buffer) < CODEBOOK_HEADER_BYTES:
        raise WireError("8-bit tensor without its codebook header")
    codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
    if not 1 <= codebook_size <= 256:
        raise WireError(f"8-bit codebook of {codebook_size} entries (1..256 allowed)")
    numel = math.prod(shape)
    expected = CODEBOOK_HEADER_BYTES + 4 * codebook_size + numel
    if len(buffer) != expected:
        raise WireError(f"8-bit buffer of {len(buffer)} bytes, expected {expected}")
    codebook = torch.from_numpy(
        np.frombuffer(buffer, offset=CODEBOOK_HEADER_BYTES, count=codebook_size, dtype=np.float32).copy()
    )
    indices = torch.from_numpy(
        np.frombuffer(buffer, offset=CODEBOOK_HEADER_BYTES + 4 * codebook_size, dtype=np.uint8).copy()
    ).int()
    if numel and int(indices.max()) >= codebook_size:
        raise WireError("8-bit index outside its codebook")
    return codebook.to(dtype)[indices].reshape(shape)


def split_chunks(data: bytes, chunk_bytes: int) -> Iterator[pb.Chunk]:
    """Cut one serialized message into Chunk messages of at most chunk_bytes each (at least one)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    view = memoryview(data)
    yield pb.Chunk(data=bytes(view[:chunk_bytes]))
    for start in range(chunk_bytes, len(data), chunk_bytes):
        yield pb.Chunk(data=bytes(view[start : start + chunk_bytes]))


async def join_chunks(
    chunks: AsyncIterable[pb.Chunk], *, max_bytes: int, on_chunk: Callable[[int], None] | None = None
) -> bytes:
    """Join a stream of chunks into one message, refusing to hold more than max_bytes
    (:class:`~dmoe.errors.MessageTooLarge`). ``on_chunk(size)`` is called for each chunk kept, so a
    receiver can account for what all its streams hold and stop one by raising."""
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk.data)
        if total > max_bytes:
            raise MessageTooLarge(f"streamed message exceeds {max_bytes} bytes")
        if on_chunk is not None:
            on_chunk(len(chunk.data))
        parts.append(chunk.data)
    return b"".join(parts)
