"""The wire format's checks at their edges (dmoe.core.wire): every bound of deserialize accepts its
limit and refuses one past it with its own message, the 8-bit layout's header, codebook and indices are
checked exactly, and serialize picks the encoding the docs say (lossy only for float tensors of two
elements or more, never FLOAT16 for bfloat16) and clamps float16 at its largest finite value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmoe.core.wire import MAX_DIM, MAX_RANK, deserialize, serialize, split_chunks
from dmoe.errors import WireError
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def test_rank_and_dimension_bounds_accept_the_limit_and_refuse_one_past_it():
    assert MAX_RANK == 8 and MAX_DIM == 2**31 - 1
    x = torch.arange(1.0, 3.0).reshape(2, *[1] * (MAX_RANK - 1))
    assert torch.equal(deserialize(serialize(x), max_numel=2), x)
    with pytest.raises(WireError, match=r"invalid shape \[2, 1, 1, 1, 1, 1, 1, 1, 1\]"):
        deserialize(serialize(x.unsqueeze(-1)), max_numel=2)
    empty = deserialize(pb.Tensor(buffer=b"", shape=[MAX_DIM, 0], dtype="float32"), max_numel=0)
    assert empty.shape == (MAX_DIM, 0)
    for shape in ([MAX_DIM + 1, 0], [0, -1]):
        with pytest.raises(WireError, match="invalid shape"):
            deserialize(pb.Tensor(buffer=b"", shape=shape, dtype="float32"), max_numel=0)
    with pytest.raises(WireError, match="exceeds the limit of 5"):
        deserialize(serialize(torch.zeros(6)), max_numel=5)
    assert deserialize(serialize(torch.zeros(6)), max_numel=6).shape == (6,)


def _8bit(codebook: list[float], indices: list[int]) -> pb.Tensor:
    buffer = (np.int64(len(codebook)).tobytes() + np.array(codebook, dtype=np.float32).tobytes()
              + np.array(indices, dtype=np.uint8).tobytes())
    return pb.Tensor(buffer=buffer, shape=[len(indices)], dtype="float32", compression=pb.UNIFORM_8BIT)


def test_the_8bit_layout_is_checked_exactly():
    with pytest.raises(WireError, match="without its codebook header"):
        deserialize(pb.Tensor(buffer=b"\0" * 7, shape=[0], dtype="float32", compression=pb.UNIFORM_8BIT),
                    max_numel=1)
    assert deserialize(_8bit([1.5], []), max_numel=1).shape == (0,)  # the header and one entry: nothing else
    assert deserialize(_8bit([1.5], [0, 0]), max_numel=2).tolist() == [1.5, 1.5]
    book = [float(i) for i in range(256)]
    assert deserialize(_8bit(book, [255, 0, 7]), max_numel=3).tolist() == [255.0, 0.0, 7.0]
    for size in (0, 257):
        with pytest.raises(WireError, match=f"codebook of {size} entries"):
            deserialize(_8bit([0.0] * size, [0]), max_numel=1)
    with pytest.raises(WireError, match="index outside its codebook"):
        deserialize(_8bit([1.0, 2.0], [0, 2]), max_numel=2)
    short = pb.Tensor(buffer=_8bit([1.0, 2.0], [0]).buffer, shape=[2], dtype="float32",
                      compression=pb.UNIFORM_8BIT)  # one index for two elements
    with pytest.raises(WireError, match="8-bit buffer of 17 bytes, expected 18"):
        deserialize(short, max_numel=2)
    long = pb.Tensor(buffer=_8bit([1.0, 2.0], [0, 1, 1]).buffer, shape=[2], dtype="float32",
                     compression=pb.UNIFORM_8BIT)  # three indices for two elements
    with pytest.raises(WireError, match="8-bit buffer of 19 bytes, expected 18"):
        deserialize(long, max_numel=2)


def test_lossy_encodings_only_for_float_tensors_of_two_elements_or_more():
    assert serialize(torch.tensor([3.0]), pb.UNIFORM_8BIT).compression == pb.NONE
    assert serialize(torch.tensor([3.0]), pb.FLOAT16).compression == pb.NONE
    two = serialize(torch.tensor([1.0, 3.0]), pb.UNIFORM_8BIT)
    assert two.compression == pb.UNIFORM_8BIT and len(two.buffer) == 8 + 4 * 256 + 2
    assert deserialize(two, max_numel=2).tolist() == [1.0, 3.0]  # two buckets, each its own value
    assert serialize(torch.tensor([1.0, 3.0]), pb.FLOAT16).compression == pb.FLOAT16
    bf16 = torch.tensor([1.0, 3.0, -2.0], dtype=torch.bfloat16)
    as_is = serialize(bf16, pb.FLOAT16)
    assert as_is.compression == pb.NONE and len(as_is.buffer) == 6
    assert torch.equal(deserialize(as_is, max_numel=3), bf16)
    assert serialize(bf16, pb.UNIFORM_8BIT).compression == pb.UNIFORM_8BIT
    with pytest.raises(WireError, match="FLOAT16 compression does not carry bfloat16"):
        deserialize(pb.Tensor(buffer=b"\0" * 6, shape=[3], dtype="bfloat16", compression=pb.FLOAT16),
                    max_numel=3)


def test_float16_clamps_at_its_largest_finite_value_both_ways():
    x = torch.tensor([1e6, -1e6, 70000.0, -3.0])
    y = deserialize(serialize(x, pb.FLOAT16), max_numel=4)
    assert y.tolist() == [65504.0, -65504.0, 65504.0, -3.0]
    assert len(serialize(x, pb.FLOAT16).buffer) == 8


def test_8bit_steps_are_six_sigmas_over_256_buckets():
    # values at mean + k steps, k whole: each lands in its own bucket and decodes exactly
    torch.manual_seed(1)
    base = torch.randn(4096)
    x = torch.cat([base, torch.tensor([0.0])])
    message = serialize(x, pb.UNIFORM_8BIT)
    centered = x - x.mean()
    step = 6 * float(centered.norm() / (x.numel() - 1) ** 0.5) / 256
    indices = np.frombuffer(message.buffer, offset=8 + 4 * 256, dtype=np.uint8)
    want = torch.round(centered / step).add(128).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(indices, want)


def test_every_dtype_goes_raw_as_it_is_and_float16_buffers_are_checked_too():
    for x in (torch.tensor([1, 2, 255], dtype=torch.uint8), torch.tensor([-5, 7, 9], dtype=torch.int32),
              torch.tensor([1.5, -2.0, 3.0], dtype=torch.float16)):
        message = serialize(x)
        assert message.buffer == x.numpy().tobytes() and torch.equal(deserialize(message, max_numel=3), x)
    short = pb.Tensor(buffer=b"\0" * 6, shape=[2, 2], dtype="float32", compression=pb.FLOAT16)
    with pytest.raises(WireError, match=r"buffer of 6 bytes does not hold 4 x float32 \(8 bytes\)"):
        deserialize(short, max_numel=4)


def test_8bit_of_a_constant_tensor_is_all_in_the_middle_bucket():
    message = serialize(torch.full((5,), -3.0), pb.UNIFORM_8BIT)
    assert np.frombuffer(message.buffer, offset=8 + 4 * 256, dtype=np.uint8).tolist() == [128] * 5
    assert deserialize(message, max_numel=5).tolist() == [-3.0] * 5


def test_chunks_need_a_positive_size():
    for size in (0, -1):
        with pytest.raises(ValueError, match="chunk_bytes must be positive"):
            list(split_chunks(b"abc", size))
    assert [c.data for c in split_chunks(b"abc", 1)] == [b"a", b"b", b"c"]
