"""A real node called through a plain generated gRPC stub: results equal local torch."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from swarm_fixtures import expert_version, module_node

from dmoe.core.experts import create_expert
from dmoe.core.wire import deserialize, serialize, split_chunks
from dmoe.proto import expert_pb2 as pb

HIDDEN = 32
MAX_NUMEL = 1 << 26
pytestmark = pytest.mark.timeout(120)


node = module_node(
    "--experts", "ffn.[0:4]", "--hidden-dim", str(HIDDEN), "--max-message-bytes", str(256 << 10),
    "--max-request-bytes", str(1 << 20), "--max-batch-tokens", "4096",
)


def local_expert(uid: str) -> torch.nn.Module:
    return create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0]


def forward(service, uid: str, x: torch.Tensor, compression: int = pb.NONE) -> torch.Tensor:
    request = pb.ForwardRequest(uid=uid, inputs=[serialize(x)], reply_compression=compression)
    reply = service.Forward(request, timeout=30)
    return deserialize(reply.outputs[0], max_numel=MAX_NUMEL)


def test_info_describes_experts(service):
    info = service.Info(pb.InfoRequest(), timeout=10)
    assert [e.uid for e in info.experts] == ["ffn.0", "ffn.1", "ffn.2", "ffn.3"]
    expert = info.experts[0]
    assert expert.expert_cls == "ffn"
    assert list(expert.inputs[0].shape) == [-1, HIDDEN] and expert.inputs[0].dtype == "float32"
    assert list(expert.outputs[0].shape) == [-1, HIDDEN]
    assert expert.num_parameters == sum(p.numel() for p in local_expert("ffn.0").parameters())
    assert info.max_batch_tokens == 4096 and info.device == "cpu"


def test_forward_equals_local_module(service):
    x = torch.randn(10, HIDDEN)
    with torch.no_grad():
        expected = local_expert("ffn.0")(x)
    torch.testing.assert_close(forward(service, "ffn.0", x), expected, rtol=1e-5, atol=1e-6)


def test_forward_with_compressed_reply(service):
    x = torch.randn(10, HIDDEN)
    with torch.no_grad():
        expected = local_expert("ffn.0")(x)
    fp16 = forward(service, "ffn.0", x, pb.FLOAT16)
    assert fp16.dtype == torch.float32
    torch.testing.assert_close(fp16, expected, rtol=1e-3, atol=1e-3)


def test_backward_equals_autograd_and_local_adam_step(service):
    uid = "ffn.1"
    local = local_expert(uid)
    x = torch.randn(16, HIDDEN)
    grad_out = torch.randn(16, HIDDEN)
    before = expert_version(service, uid)

    reply = service.Backward(
        pb.BackwardRequest(uid=uid, inputs=[serialize(x)], grad_outputs=[serialize(grad_out)]), timeout=30
    )
    remote_grad = deserialize(reply.grad_inputs[0], max_numel=MAX_NUMEL)

    x_local = x.clone().requires_grad_(True)
    local(x_local).backward(grad_out)
    torch.testing.assert_close(remote_grad, x_local.grad, rtol=1e-5, atol=1e-6)

    # the node applied one Adam step (lr 1e-3, clipping at norm 1.0): do the same here and compare (Adam's
    # first step hardly depends on the gradient's scale: test_backend.py checks the clipping, with SGD)
    torch.nn.utils.clip_grad_norm_(list(local.parameters()), 1.0)
    torch.optim.Adam(local.parameters(), lr=1e-3).step()
    assert expert_version(service, uid) == before + 1
    probe = torch.randn(8, HIDDEN)
    with torch.no_grad():
        expected = local(probe)
    torch.testing.assert_close(forward(service, uid, probe), expected, rtol=1e-5, atol=1e-6)


def test_streamed_forward_above_the_unary_limit(service):
    x = torch.randn(4096, HIDDEN)  # 512 KiB > the node's 256 KiB message limit
    request = pb.ForwardRequest(uid="ffn.2", inputs=[serialize(x)])
    with pytest.raises(grpc.RpcError) as unary:
        service.Forward(request, timeout=30)
    assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    chunks = service.ForwardStream(split_chunks(request.SerializeToString(), 100 << 10), timeout=60)
    reply = pb.ForwardResponse.FromString(b"".join(c.data for c in chunks))
    with torch.no_grad():
        expected = local_expert("ffn.2")(x)
    torch.testing.assert_close(deserialize(reply.outputs[0], max_numel=MAX_NUMEL), expected,
                               rtol=1e-5, atol=1e-5)


def test_streamed_backward(service):
    uid = "ffn.3"
    x, grad_out = torch.randn(64, HIDDEN), torch.randn(64, HIDDEN)
    request = pb.BackwardRequest(uid=uid, inputs=[serialize(x)], grad_outputs=[serialize(grad_out)])
    chunks = service.BackwardStream(split_chunks(request.SerializeToString(), 4096), timeout=60)
    reply = pb.BackwardResponse.FromString(b"".join(c.data for c in chunks))
    x_local = x.clone().requires_grad_(True)
    local_expert(uid)(x_local).backward(grad_out)
    torch.testing.assert_close(deserialize(reply.grad_inputs[0], max_numel=MAX_NUMEL), x_local.grad,
                               rtol=1e-5, atol=1e-6)


def test_counters_in_info(service):
    before = service.Info(pb.InfoRequest(uids=["ffn.0"]), timeout=10).experts[0].stats
    forward(service, "ffn.0", torch.randn(7, HIDDEN))
    after = service.Info(pb.InfoRequest(uids=["ffn.0"]), timeout=10).experts[0].stats
    assert after.forward_calls == before.forward_calls + 1
    assert after.forward_tokens == before.forward_tokens + 7
    assert after.latency_p50_ms > 0 and after.latency_p99_ms >= after.latency_p50_ms
    assert after.queued_tokens == 0


def test_health_and_reflection_answer(node):
    with grpc.insecure_channel(node.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service_name in ("", "dmoe.ExpertService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "dmoe.ExpertService" in database.get_services()
        pool = DescriptorPool(database)
        methods = {m.name for m in pool.FindServiceByName("dmoe.ExpertService").methods}
        assert methods == {"Forward", "Backward", "ForwardStream", "BackwardStream", "Info", "GetState",
                           "ForwardBatch", "BackwardBatch", "ForwardBatchStream", "BackwardBatchStream",
                           "ForwardPacked", "BackwardPacked"}
