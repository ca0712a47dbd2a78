import asyncio

import numpy as np
import pytest
import torch

from dmoe.core.wire import compression_from_name, deserialize, join_chunks, serialize, split_chunks
from dmoe.errors import MessageTooLarge, WireError
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_roundtrip_is_exact_without_compression(dtype):
    x = (torch.randn(5, 7) * 10).to(dtype)
    y = deserialize(serialize(x), max_numel=100)
    assert y.dtype == dtype and torch.equal(y, x)


@pytest.mark.parametrize("name,tolerance", [("fp16", 1e-2), ("8bit", 0.2)])
def test_lossy_compression_is_close_and_smaller(name, tolerance):
    x = torch.randn(64, 128)
    message = serialize(x, compression_from_name(name))
    assert len(message.buffer) < x.numel() * 4 / 1.9
    y = deserialize(message, max_numel=x.numel())
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y - x).abs().mean() < tolerance


def test_integer_tensors_ignore_lossy_compression():
    x = torch.arange(10)
    message = serialize(x, pb.UNIFORM_8BIT)
    assert message.compression == pb.NONE and torch.equal(deserialize(message, max_numel=10), x)


def test_numel_limit_and_length_checks():
    with pytest.raises(WireError, match="exceeds"):
        deserialize(serialize(torch.zeros(10, 10)), max_numel=99)
    bad = pb.Tensor(buffer=b"\0" * 12, shape=[2, 2], dtype="float32")
    with pytest.raises(WireError, match="does not hold"):
        deserialize(bad, max_numel=100)
    with pytest.raises(WireError, match="float dtype"):
        deserialize(pb.Tensor(buffer=b"\0" * 8, shape=[8], dtype="uint8", compression=pb.FLOAT16),
                    max_numel=100)
    header = np.int64(0).tobytes()
    with pytest.raises(WireError, match="codebook"):
        deserialize(pb.Tensor(buffer=header, shape=[0], dtype="float32", compression=pb.UNIFORM_8BIT),
                    max_numel=9)


def test_unknown_compression_name():
    with pytest.raises(ValueError, match="none, fp16, 8bit"):
        compression_from_name("zip")


def test_chunks_roundtrip_and_limit():
    data = bytes(range(256)) * 41
    chunks = list(split_chunks(data, 1000))
    assert len(chunks) == 11 and all(len(c.data) <= 1000 for c in chunks)
    sizes: list[int] = []
    assert asyncio.run(join_chunks(_aiter(chunks), max_bytes=len(data), on_chunk=sizes.append)) == data
    assert sum(sizes) == len(data) and len(sizes) == 11
    assert [c.data for c in split_chunks(b"", 10)] == [b""]
    with pytest.raises(MessageTooLarge, match=f"exceeds {len(data) - 1} bytes"):
        asyncio.run(join_chunks(_aiter(chunks), max_bytes=len(data) - 1))


async def _aiter(items):
    for item in items:
        yield item
