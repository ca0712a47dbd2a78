"""State transfer between real nodes on 127.0.0.1: a node that starts hosting a live uid takes a
replica's trained state (parameters, optimizer state, version) before it serves; a restarted node
takes a replica's state only when newer than its checkpoint; a replica whose GetState reply is
broken or hostile is refused and the node falls back; a private swarm's GetState needs its key."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time

import grpc
import pytest
import torch
from swarm_fixtures import expert_version, stub, wait_for

from dmoe.core.auth import SwarmKey
from dmoe.core.records import ExpertRecord, find_experts
from dmoe.core.tls import channel_credentials
from dmoe.core.wire import deserialize, serialize
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend
from dmoe.node.joining import TransferPolicy, _take_from, replicas_of
from dmoe.node.transfer import SERVICE, TransferError, export_state, fetch_expert_state, state_chunks
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(240)
HIDDEN = 16
PROBE = torch.linspace(-2, 2, 5 * HIDDEN).reshape(5, HIDDEN)
GET_STATE = f"/{SERVICE}/GetState"
LATE_HEADER_S = 0.3


def local_expert(uid: str):
    """This process's copy of expert ``uid`` as a node with the test's options builds it."""
    return build_backend(uid, NodeConfig(hidden_dim=HIDDEN), torch.device("cpu"))


def probe_output(service, uid: str, metadata=None) -> torch.Tensor:
    reply = service.Forward(pb.ForwardRequest(uid=uid, inputs=[serialize(PROBE)]), timeout=30,
                            metadata=metadata)
    return deserialize(reply.outputs[0], max_numel=1 << 20)


def train_steps(service, uid: str, steps: int, seed: int = 0, key: SwarmKey | None = None) -> None:
    for step in range(steps):
        x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(seed + step))
        metadata = key.call_metadata(f"/{SERVICE}/Backward") if key else None
        service.Backward(pb.BackwardRequest(uid=uid, inputs=[serialize(x)], grad_outputs=[serialize(x)]),
                         timeout=30, metadata=metadata)


def live_on(dht, uid: str, node_id: str) -> bool:
    return any(r.node_id == node_id for r in replicas_of(find_experts(dht, [uid]).get(uid)))


def test_a_joining_node_takes_the_donors_trained_state_before_it_serves(node_factory, dht_factory):
    dht = dht_factory([])
    swarm = dht.visible_maddrs[0]
    args = ["--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN), "--swarm", swarm]
    donor = node_factory(*args, name="donor")
    _, donor_service = stub(donor.endpoint)
    train_steps(donor_service, "ffn.0", 3)
    train_steps(donor_service, "ffn.1", 1, seed=10)
    trained = probe_output(donor_service, "ffn.0")
    seed_output = local_expert("ffn.0").forward([PROBE])[0]
    assert not torch.allclose(trained, seed_output)
    wait_for(lambda: live_on(dht, "ffn.0", donor.ready["node_id"]), 30, "the donor's record")

    joiner = node_factory(*args, name="joiner")
    taken = joiner.ready["transferred"]
    assert {uid: t["version"] for uid, t in taken.items()} == {"ffn.0": 3, "ffn.1": 1}
    assert {t["endpoint"] for t in taken.values()} == {donor.endpoint}
    parameters = local_expert("ffn.0").module.state_dict().values()
    parameter_bytes = sum(v.numel() * v.element_size() for v in parameters)
    assert taken["ffn.1"]["bytes"] > 3 * parameter_bytes  # with Adam's two moments and steps
    _, service = stub(joiner.endpoint)
    # it serves the donor's expert: the version of its first record and of Info, and the same outputs
    joiner_records = wait_for(lambda: [r for r in replicas_of(find_experts(dht, ["ffn.0"]).get("ffn.0"))
                                       if r.node_id == joiner.ready["node_id"]], 30, "the joiner's record")
    assert [r.version for r in joiner_records] == [3]
    assert expert_version(service, "ffn.0") == 3 and expert_version(service, "ffn.1") == 1
    torch.testing.assert_close(probe_output(service, "ffn.0"), trained, rtol=0, atol=0)
    torch.testing.assert_close(probe_output(service, "ffn.1"), probe_output(donor_service, "ffn.1"),
                               rtol=0, atol=0)
    # the optimizer state came too: the same further step keeps both identical
    train_steps(donor_service, "ffn.0", 1, seed=100)
    train_steps(service, "ffn.0", 1, seed=100)
    torch.testing.assert_close(probe_output(service, "ffn.0"), probe_output(donor_service, "ffn.0"),
                               rtol=0, atol=0)

    # the client call, as replica averaging uses it: parameters alone, and a uid the node lacks
    expect = local_expert("ffn.0")
    params = asyncio.run(fetch_expert_state(donor.endpoint, "ffn.0", key=None, tls=False, timeout=30,
                                            expect=expect, optimizer=False))
    assert params.version == 4 and not params.with_optimizer
    assert params.num_bytes == sum(p.numel() * 4 for p in expect.module.state_dict().values())
    with pytest.raises(TransferError, match="NOT_FOUND"):
        asyncio.run(fetch_expert_state(donor.endpoint, "ffn.7", key=None, tls=False, timeout=30,
                                       expect=local_expert("ffn.7")))


def test_a_restarted_node_takes_the_newer_state_and_keeps_its_own_when_newer(node_factory, dht_factory,
                                                                             tmp_path):
    dht = dht_factory([])
    swarm = dht.visible_maddrs[0]
    common = ["--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--swarm", swarm,
              "--heartbeat-interval", "1", "--record-ttl", "3"]
    first = ["--checkpoint-dir", str(tmp_path / "a"), *common]
    a = node_factory(*first, name="a")
    b = node_factory("--checkpoint-dir", str(tmp_path / "b"), *common, name="b")
    assert b.ready["transferred"]["ffn.0"]["version"] == 0  # a's untrained state
    _, a_service = stub(a.endpoint)
    train_steps(a_service, "ffn.0", 2)
    assert a.terminate() == 0  # its checkpoint: version 2
    _, b_service = stub(b.endpoint)
    train_steps(b_service, "ffn.0", 3, seed=50)  # b: version 3, from the untrained state
    b_output = probe_output(b_service, "ffn.0")
    wait_for(lambda: live_on(dht, "ffn.0", b.ready["node_id"]), 30, "b's record")

    a = node_factory(*first, name="a-restarted")
    assert a.ready["restored"] == {"ffn.0": 2}
    assert a.ready["transferred"]["ffn.0"]["version"] == 3
    _, a_service = stub(a.endpoint)
    assert expert_version(a_service, "ffn.0") == 3
    torch.testing.assert_close(probe_output(a_service, "ffn.0"), b_output, rtol=0, atol=0)

    train_steps(a_service, "ffn.0", 2, seed=70)  # a: version 5, ahead of b's 3
    a_output = probe_output(a_service, "ffn.0")
    assert a.terminate() == 0
    wait_for(lambda: live_on(dht, "ffn.0", b.ready["node_id"]), 30, "b's record")
    a = node_factory(*first, name="a-ahead")
    assert a.ready["restored"] == {"ffn.0": 5} and a.ready["transferred"] == {}
    assert "not newer than this node's checkpoint" in a.log()
    _, a_service = stub(a.endpoint)
    assert expert_version(a_service, "ffn.0") == 5
    torch.testing.assert_close(probe_output(a_service, "ffn.0"), a_output, rtol=0, atol=0)


class BadDonor:
    """GetState answered as a broken or hostile node would: per uid, ``nan`` (a NaN, hash made to
    match), ``shape`` (a tensor declared with another shape), ``hash`` (a byte changed in transit),
    ``garbage`` (a reply that is no StateChunk), ``stall`` (the header, then silence), ``late-stall``
    (the header after ``LATE_HEADER_S``, then silence)."""

    def __init__(self, modes: dict[str, str]):
        self.modes = modes
        self.calls: dict[str, int] = dict.fromkeys(modes, 0)
        self.released = threading.Event()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
        handler = grpc.unary_stream_rpc_method_handler(self.get_state, request_deserializer=pb.GetStateRequest
                                                       .FromString, response_serializer=None)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE,
                                                                                   {"GetState": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def get_state(self, request: pb.GetStateRequest, context):
        mode = self.modes[request.uid]
        self.calls[request.uid] += 1
        donor = local_expert(request.uid)
        donor.backward([PROBE], [torch.ones_like(PROBE)])
        messages = list(state_chunks(*export_state(donor), 4096))
        header = messages[0].header
        if mode == "garbage":
            yield b"\xff\xfe not a protobuf"
            return
        if mode in ("stall", "late-stall"):
            if mode == "late-stall":  # the header itself comes late (a loaded or distant replica)
                self.released.wait(LATE_HEADER_S)
            yield messages[0].SerializeToString()
            self.released.wait(60)
            return
        if mode == "shape":
            header.tensors[0].shape[0] += 1
        elif mode == "nan":
            data = bytearray(messages[1].data)
            data[:4] = torch.tensor([float("nan")]).numpy().tobytes()
            messages[1].data = bytes(data)
            header.sha256 = hashlib.sha256(b"".join(m.data for m in messages[1:])).digest()
        elif mode == "hash":
            data = bytearray(messages[-1].data)
            data[-1] ^= 0x40
            messages[-1].data = bytes(data)
        for message in messages:
            yield message.SerializeToString()

    def stop(self) -> None:
        self.released.set()
        self.server.stop(0)


@pytest.fixture
def bad_donor():
    donor = BadDonor({"ffn.0": "nan", "ffn.1": "shape", "ffn.2": "hash", "ffn.3": "garbage",
                      "ffn.4": "stall"})
    yield donor
    donor.stop()


def test_a_hostile_replica_is_refused_and_the_node_starts_from_its_seed(node_factory, dht_factory, bad_donor):
    dht = dht_factory([])
    swarm = dht.visible_maddrs[0]
    args = ["--experts", "ffn.[0:5]", "--hidden-dim", str(HIDDEN), "--swarm", swarm]
    # a node whose records send its callers to the bad donor, as a node behind a hostile proxy would
    hostile = node_factory(*args, "--announce-port", str(bad_donor.port), name="hostile")
    uids = [f"ffn.{i}" for i in range(5)]
    wait_for(lambda: all(live_on(dht, uid, hostile.ready["node_id"]) for uid in uids), 30, "its records")

    started = time.monotonic()
    joiner = node_factory(*args, name="joiner")
    took = time.monotonic() - started
    assert bad_donor.calls == dict.fromkeys(uids, 1)
    assert joiner.ready["transferred"] == {}
    log = joiner.log()
    for why in ("holds NaN or Inf", "this expert's is", "sha256", "undecodable StateChunk",
                "nothing received"):
        assert why in log, why
    assert took < 45, f"a stalled replica held the start for {took:.0f}s"  # its stall_timeout is 10 s
    _, service = stub(joiner.endpoint)
    for uid in uids:
        assert expert_version(service, uid) == 0
        torch.testing.assert_close(probe_output(service, uid), local_expert(uid).forward([PROBE])[0],
                                   rtol=0, atol=0)
    with pytest.raises(TransferError, match="nothing received for 0.5s"):
        asyncio.run(fetch_expert_state(f"127.0.0.1:{bad_donor.port}", "ffn.4", key=None, tls=False,
                                       timeout=30, expect=local_expert("ffn.4"), stall_timeout=0.5))


def test_a_replica_whose_first_message_comes_late_then_stalls_is_given_up_as_stalled(caplog):
    """A joining node's call to a replica is bounded by the stall check (no message for stall_timeout)
    and by a deadline for the state's bytes at the slowest rate waited for. The deadline leaves room for a
    stall after the first message however late that message came, so a replica that goes silent is given
    up as stalled, with that reason in the log, and soon after the stall timeout."""
    donor = BadDonor({"ffn.4": "late-stall"})
    try:
        backend = local_expert("ffn.4")
        record = ExpertRecord(uid="ffn.4", endpoint=f"127.0.0.1:{donor.port}", node_id="late")
        policy = TransferPolicy(stall_timeout=0.5)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="dmoe.node.joining"):
            taken = asyncio.run(_take_from("ffn.4", backend, record, key=None, newer_than=None, timeout=30,
                                           policy=policy))
        took = time.monotonic() - started
    finally:
        donor.stop()
    assert taken is None and donor.calls == {"ffn.4": 1}
    assert "not taking the state of the replica" in caplog.text
    assert "nothing received for 0.5s" in caplog.text, caplog.text
    assert LATE_HEADER_S + 0.5 <= took < 10, took


def test_a_private_swarm_transfers_over_its_tls_and_refuses_outsiders(node_factory, tmp_path):
    key_path = tmp_path / "swarm.key"
    key = SwarmKey.generate(key_path)
    args = ["--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--swarm-key", str(key_path)]
    donor = node_factory(*args, name="donor")
    assert donor.ready["tls"] is True
    credentials, options = channel_credentials(key)
    channel = grpc.secure_channel(donor.endpoint, credentials, options=options)
    service = pbg.ExpertServiceStub(channel)
    train_steps(service, "ffn.0", 2, key=key)
    request = pb.GetStateRequest(uid="ffn.0")
    for metadata, why in ((None, "call it with the swarm's key"),
                          (SwarmKey(b"\x01" * 32).call_metadata(GET_STATE), "wrong swarm key"),
                          (key.call_metadata(f"/{SERVICE}/Info"), "wrong swarm key")):
        with pytest.raises(grpc.RpcError) as refused:
            list(service.GetState(request, timeout=10, metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in refused.value.details()
    with pytest.raises(grpc.RpcError) as outsider:  # without the key, not even a TLS connection
        list(pbg.ExpertServiceStub(grpc.insecure_channel(donor.endpoint)).GetState(request, timeout=10))
    assert outsider.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(TransferError):
        asyncio.run(fetch_expert_state(donor.endpoint, "ffn.0", key=None, tls=True, timeout=10,
                                       expect=local_expert("ffn.0")))
    state = asyncio.run(fetch_expert_state(donor.endpoint, "ffn.0", key=key, tls=True, timeout=30,
                                           expect=local_expert("ffn.0")))
    assert state.version == 2

    joiner = node_factory(*args, "--swarm", donor.swarm[0], name="joiner")
    assert joiner.ready["transferred"]["ffn.0"]["version"] == 2
    joined = grpc.secure_channel(joiner.endpoint, credentials, options=options)
    info = pb.InfoRequest(uids=["ffn.0"])
    info_method = f"/{SERVICE}/Info"
    assert pbg.ExpertServiceStub(joined).Info(info, timeout=10, metadata=key.call_metadata(info_method)
                                              ).experts[0].version == 2
    forward = f"/{SERVICE}/Forward"
    joined_output = probe_output(pbg.ExpertServiceStub(joined), "ffn.0", key.call_metadata(forward))
    torch.testing.assert_close(joined_output, probe_output(service, "ffn.0", key.call_metadata(forward)),
                               rtol=0, atol=0)
    channel.close()
    joined.close()
