"""What a node counts before it parses or lists anything a peer sent: fields on the wire
(within_fields), Info's uids (check_info_request), a stream's chunks (ChunkJoiner)."""

from __future__ import annotations

import grpc
import pytest
import torch

from dmoe.core.wire import serialize
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend
from dmoe.node.service import (
    MAX_REQUEST_FIELDS,
    MAX_TENSOR_FIELDS,
    ChunkJoiner,
    RequestError,
    _parse,
    check_info_request,
    within_fields,
)
from dmoe.proto import expert_pb2 as pb


def test_fields_are_counted_at_the_top_and_in_each_tensor():
    good = pb.BackwardRequest(uid="ffn.0", inputs=[serialize(torch.ones(1024, 8))],
                              grad_outputs=[serialize(torch.ones(1024, 8))])
    assert _parse(pb.BackwardRequest, good.SerializeToString()) == good
    many = pb.ForwardRequest(uid="ffn.0", inputs=[pb.Tensor()] * (MAX_REQUEST_FIELDS + 1)).SerializeToString()
    assert not within_fields(many, MAX_REQUEST_FIELDS)
    with pytest.raises(RequestError, match="more than 256 fields") as refused:
        _parse(pb.ForwardRequest, many)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # a shape sent unpacked, one field per dimension, inside one tensor
    dims = b"\x10\x01" * (MAX_TENSOR_FIELDS + 1)
    length = bytes([len(dims) & 0x7F | 0x80, len(dims) >> 7])  # a two-byte varint
    unpacked = b"\x1a" + length + dims  # grad_outputs (field 3), a Tensor of 65 fields
    with pytest.raises(RequestError, match="tensor of more than 64"):
        _parse(pb.BackwardRequest, unpacked)
    assert _parse(pb.ForwardRequest, unpacked).uid == ""  # field 3 of a ForwardRequest is no tensor
    # repeated fields of a Chunk (the last one counts) and unknown fields are fields too
    with pytest.raises(RequestError, match="Chunk of more than 16 fields"):
        _parse(pb.Chunk, b"\x0a\x01x" * 17)
    assert _parse(pb.Chunk, b"\x0a\x01x" * 16).data == b"x"


def test_wire_data_it_cannot_follow_is_left_to_the_parser():
    overlong_varint = b"\x12" + b"\xff" * 10 + b"\x01"
    for garbage in (b"\xff\xfe\x00garbage\x12\x99", overlong_varint, b"\x0b"):
        assert within_fields(garbage, 2)
        with pytest.raises(RequestError, match="undecodable"):
            _parse(pb.ForwardRequest, garbage)


def test_info_names_each_uid_once_within_the_limit():
    config = NodeConfig(experts=["ffn.[0:2]"], hidden_dim=8, inner_dim=16, device="cpu")
    backends = {uid: build_backend(uid, config, torch.device("cpu")) for uid in config.uids}

    def uids(*names: str) -> list[str]:
        return check_info_request(backends, pb.InfoRequest(uids=names).SerializeToString(), max_info_uids=4)

    assert uids("ffn.1", "ffn.0", "ffn.1", "ffn.1") == ["ffn.1", "ffn.0"] and uids() == []
    with pytest.raises(RequestError, match="at most 4 uids .max_info_uids.") as refused:
        uids(*["ffn.0"] * 5)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(RequestError, match="max_info_uids"):  # refused before parsing: too many bytes
        check_info_request(backends, pb.InfoRequest(uids=["x" * 2000]).SerializeToString(), max_info_uids=4)
    with pytest.raises(RequestError, match="'ffn.9'") as unknown:
        uids("ffn.0", "ffn.9")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


def test_chunks_carry_data_within_the_request_limit():
    joiner = ChunkJoiner(max_bytes=10)
    assert joiner.add(pb.Chunk(data=b"abcd").SerializeToString()) == 4
    with pytest.raises(RequestError, match="empty chunk") as empty:
        joiner.add(pb.Chunk().SerializeToString())
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert joiner.add(pb.Chunk(data=b"efghij").SerializeToString()) == 6
    with pytest.raises(RequestError, match="exceeds 10 bytes .max_request_bytes.") as overlong:
        joiner.add(pb.Chunk(data=b"k").SerializeToString())
    assert overlong.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert joiner.join() == b"abcdefghij" and joiner.num_chunks == 2
