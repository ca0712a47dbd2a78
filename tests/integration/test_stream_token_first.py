"""In a private swarm a request stream's token is checked before any chunk is read
(docs/security.md, "gRPC calls"): against a real private node (``--no-tls``, so that this test
can write the stream's bytes itself), a stream with a wrong token is refused UNAUTHENTICATED while
its first chunk is still unsent, and a stream of chunks that do not parse is refused
UNAUTHENTICATED, not with the parse error that a member's token gets for the same bytes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from swarm_fixtures import NodeProcess

from dmoe.core.auth import SwarmKey
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(60)
METHOD = "/dmoe.ExpertService/ForwardStream"
GARBAGE = [b"\xff\xfe garbage, not a Chunk \x00\x01" * 40] * 8


@pytest.fixture(scope="module")
def private_node(tmp_path_factory) -> Iterator[tuple[SwarmKey, SwarmKey, NodeProcess]]:
    """(the swarm's key, another key, a node of that swarm without TLS)."""
    workdir = tmp_path_factory.mktemp("token")
    key, other = SwarmKey.generate(workdir / "swarm.key"), SwarmKey.generate(workdir / "other.key")
    node = NodeProcess(workdir, ["--swarm-key", str(workdir / "swarm.key"), "--no-tls",
                                 "--experts", "ffn.[0:1]", "--hidden-dim", "8"])
    try:
        yield key, other, node.start()
    finally:
        node.cleanup()


def raw_stream(channel: grpc.Channel):
    """ForwardStream taking and giving raw bytes (each request message one serialized Chunk)."""
    return channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)


def refusal(channel: grpc.Channel, requests: Iterator[bytes], metadata) -> grpc.RpcError:
    """How the node ends a ForwardStream of these request messages with this metadata."""
    with pytest.raises(grpc.RpcError) as refused:
        list(raw_stream(channel)(requests, timeout=20, metadata=metadata))
    return refused.value


def test_a_wrong_token_is_refused_before_the_first_chunk_is_sent(private_node):
    _, other, node = private_node
    release, sent = threading.Event(), []

    def never_sent() -> Iterator[bytes]:
        release.wait(30)  # the node must answer without this chunk
        sent.append(1)
        yield pb.Chunk(data=b"x").SerializeToString()

    channel = grpc.insecure_channel(node.endpoint)
    try:
        error = refusal(channel, never_sent(), other.call_metadata(METHOD))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        assert sent == []
    finally:
        release.set()
        channel.close()


def test_garbage_chunks_with_a_wrong_token_get_the_token_refusal_not_a_parse_error(private_node):
    key, other, node = private_node
    channel = grpc.insecure_channel(node.endpoint)
    try:
        for metadata, why in ((other.call_metadata(METHOD), "wrong swarm key"), (None, "swarm's key"),
                              ((("dmoe-auth", "not.a.token"),), "malformed")):
            error = refusal(channel, iter(GARBAGE), metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
            assert why in error.details()
        # a member's token: the node reads the same bytes, and refuses what it read
        error = refusal(channel, iter(GARBAGE), key.call_metadata(METHOD))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    finally:
        channel.close()
