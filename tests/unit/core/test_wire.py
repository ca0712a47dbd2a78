import asyncio

import numpy as np
import pytest
import torch

from dmoe.core.wire import (
    compression_from_name,
    deserialize,
    deserialize_plain,
    join_chunks,
    serialize,
    split_chunks,
)
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


@pytest.mark.parametrize("compression", [pb.NONE, pb.FLOAT16, pb.UNIFORM_8BIT])
def test_the_encodings_are_hiveminds_layouts_both_ways(compression):
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    hivemind_type = {pb.NONE: runtime_pb2.NONE, pb.FLOAT16: runtime_pb2.FLOAT16,
                     pb.UNIFORM_8BIT: runtime_pb2.UNIFORM_8BIT}[compression]
    torch.manual_seed(0)
    x = torch.randn(96, 64) * 3 + 1
    theirs = serialize_torch_tensor(x, hivemind_type)
    ours = serialize(x, compression)
    from_theirs = deserialize(pb.Tensor(buffer=theirs.buffer, shape=list(x.shape), dtype="float32",
                                        compression=compression), max_numel=x.numel())
    from_ours = deserialize(ours, max_numel=x.numel())
    if compression == pb.UNIFORM_8BIT:
        # the same buckets (hivemind sums each in float32, this module in float64: codebooks agree to
        # float32 rounding), so the same decoded values
        assert len(ours.buffer) == len(theirs.buffer) == 8 + 4 * 256 + x.numel()
        assert ours.buffer[8 + 4 * 256:] == theirs.buffer[8 + 4 * 256:]
        torch.testing.assert_close(from_ours, from_theirs, rtol=1e-6, atol=1e-6)
        # each value decodes to its bucket's mean: within one step (6 sigma / 256) inside the range
        step = 6 * float(x.std()) / 256
        inside = (x - x.mean()).abs() < 127 * step
        assert float((from_ours - x)[inside].abs().max()) <= step
    else:
        assert ours.buffer == theirs.buffer  # the same bytes, and hivemind decodes ours
        encoded = runtime_pb2.Tensor(buffer=ours.buffer, size=list(x.shape), dtype="float32",
                                     compression=hivemind_type)
        torch.testing.assert_close(deserialize_torch_tensor(encoded), from_ours, rtol=0, atol=0)
        assert torch.equal(from_ours, from_theirs)
        assert torch.equal(from_ours, x if compression == pb.NONE else x.half().float())


def test_8bit_of_a_constant_tensor_is_exact():
    x = torch.full((4, 8), 2.5)
    message = serialize(x, pb.UNIFORM_8BIT)
    assert message.compression == pb.UNIFORM_8BIT and torch.equal(deserialize(message, max_numel=32), x)


def test_plain_parts_decode_at_once_and_the_others_are_left_to_deserialize():
    like = [torch.randn(3, 4), torch.randn(1, 4), torch.randn(2, 4), torch.randn(2, 4),
            torch.randn(2, 4).double(), torch.randn(5, 4)]
    messages = [serialize(like[0]), serialize(like[1]),
                serialize(like[2], pb.FLOAT16),  # compressed: not plain
                serialize(torch.randn(4, 2)),  # the same elements in another shape
                serialize(like[4]),  # float64, as its like: plain too
                serialize(like[5])]
    messages[5].buffer = messages[5].buffer[:-4]  # one element short
    decoded = deserialize_plain(messages, like)
    assert [t is None for t in decoded] == [False, False, True, True, False, True]
    for i in (0, 1, 4):
        assert torch.equal(decoded[i], like[i]) and decoded[i].dtype == like[i].dtype
    assert torch.equal(decoded[0], deserialize(messages[0], max_numel=12))
    assert deserialize_plain([], []) == []


def test_plain_parts_of_several_shapes_and_empty_ones():
    like = [torch.randn(2, 3), torch.randn(1, 5), torch.randn(3, 3), torch.zeros(2, 0), torch.randn(4)]
    decoded = deserialize_plain([serialize(t) for t in like], like)
    for tensor, want in zip(decoded, like):
        if want.numel() == 0:
            assert tensor is None  # left to deserialize
        else:
            assert torch.equal(tensor, want) and tensor.shape == want.shape
