"""Tensors on the wire: ``dmoe.proto.Tensor`` <-> ``torch.Tensor``, compression, and chunking.

The encodings are hivemind's layouts (``hivemind.compression``: none, float16, uniform 8-bit), so either
side may be hivemind's code; the encoders and decoders are this module's own (hivemind's 8-bit encoder
spent about twice as long, through torch's deprecated quantized tensors and a scatter per bucket; its
8-bit decoder fails under numpy >= 2.3). Decoding adds what a server reading bytes from strangers needs:
an allow-list of dtypes, a bound on rank and element count, and an exact check of the buffer length for
every encoding, so a malformed tensor is a :class:`~dmoe.errors.WireError` (INVALID_ARGUMENT on a node),
never a crash or an allocation chosen by the peer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Callable, Iterator, Sequence

import numpy as np
import torch

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

COMPRESSIONS = frozenset({pb.NONE, pb.FLOAT16, pb.UNIFORM_8BIT})
FP16_MAX = torch.finfo(torch.float16).max
UNIFORM_BINS = 256  # uniform 8-bit: 256 buckets spanning 6 standard deviations around the mean
UNIFORM_RANGE_IN_SIGMAS = 6


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
    tensor = tensor.contiguous()
    if compression == pb.FLOAT16:
        buffer = tensor.to(torch.float32).clamp(-FP16_MAX, FP16_MAX).to(torch.float16).numpy().tobytes()
    elif compression == pb.UNIFORM_8BIT:
        buffer = _encode_8bit(tensor)
    elif name == "bfloat16":  # 2 bytes each, as they are (numpy has no bfloat16)
        buffer = tensor.view(torch.int16).numpy().tobytes()
    else:
        buffer = tensor.numpy().tobytes()
    return pb.Tensor(buffer=buffer, shape=list(tensor.shape), dtype=name, compression=compression)


def _encode_8bit(tensor: torch.Tensor) -> bytes:
    """Uniform 8-bit: bucket i holds the values within half a step of mean + (i - 128) x step, step
    = 6 x (unbiased std) / 256, the ends clamped; each bucket decodes to the mean of its values. The
    layout: the codebook's size (int64), the codebook (float32), one uint8 index per element."""
    shift = tensor.mean()
    values = tensor.to(torch.float32)
    centered = values - shift
    scale = UNIFORM_RANGE_IN_SIGMAS * (centered.norm() / math.sqrt(centered.numel() - 1)) / UNIFORM_BINS
    offset = UNIFORM_BINS // 2
    if scale > 0:
        indices = torch.round(centered / scale).add_(offset).clamp_(0, UNIFORM_BINS - 1).to(torch.uint8)
    else:  # every value the same: one bucket
        indices = torch.full(centered.shape, offset, dtype=torch.uint8)
    indices = indices.flatten()
    sums = torch.bincount(indices, weights=values.flatten(), minlength=UNIFORM_BINS)
    codebook = (sums / torch.bincount(indices, minlength=UNIFORM_BINS).clamp_min_(1)).to(torch.float32)
    return b"".join((np.int64(UNIFORM_BINS).tobytes(), codebook.numpy().tobytes(), indices.numpy().tobytes()))


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
    if message.compression not in COMPRESSIONS:
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
    dtype = DTYPES[message.dtype]
    if message.compression == pb.UNIFORM_8BIT:
        tensor = _decode_8bit(buffer, shape, dtype)
    elif message.compression == pb.FLOAT16:
        tensor = torch.from_numpy(np.frombuffer(buffer, dtype=np.float16).copy()).to(dtype).reshape(shape)
    elif message.dtype == "bfloat16":
        tensor = torch.from_numpy(np.frombuffer(buffer, dtype=np.int16).copy()).view(dtype).reshape(shape)
    else:
        tensor = torch.from_numpy(np.frombuffer(buffer, dtype=_NUMPY[message.dtype]).copy()).reshape(shape)
    if tuple(tensor.shape) != shape or tensor.dtype != DTYPES[message.dtype]:
        raise WireError("tensor decoded to the wrong shape or dtype")
    return tensor


_NUMPY = {name: np.dtype(name) for name in DTYPES if name != "bfloat16"}


def deserialize_plain(messages: Sequence[pb.Tensor],
                      like: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Decode, with one copy for all of them, the messages that are uncompressed and exactly of the shape
    and dtype of their ``like`` (a batched reply's parts, hundreds of small tensors); None for each of
    the others, left to :func:`deserialize` (which also says what is wrong with them)."""
    out: list[torch.Tensor | None] = [None] * len(messages)
    # by dtype and trailing shape: one copy, then one split along the first dimension, for each
    alike: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, (message, want) in enumerate(zip(messages, like)):
        name = dtype_name(want.dtype)
        if (want.numel() > 0 and want.dim() > 0 and message.compression == pb.NONE and message.dtype == name
                and name in _NUMPY
                and tuple(message.shape) == tuple(want.shape)
                and len(message.buffer) == want.numel() * want.element_size()):
            alike.setdefault((name, tuple(want.shape[1:])), []).append(i)
    for (name, trailing), indices in alike.items():
        joined = np.frombuffer(b"".join(messages[i].buffer for i in indices), dtype=_NUMPY[name]).copy()
        rows = torch.from_numpy(joined).view(-1, *trailing)
        for i, piece in zip(indices, rows.split([like[i].shape[0] for i in indices])):
            out[i] = piece
    return out


def _decode_8bit(buffer: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Checked decoding of the UNIFORM_8BIT layout (any codebook of 1..256 entries: hivemind's quantile
    8-bit layout decodes alike)."""
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
    )
    if numel and int(indices.max()) >= codebook_size:
        raise WireError("8-bit index outside its codebook")
    return codebook.to(dtype)[indices.long()].reshape(shape)


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
