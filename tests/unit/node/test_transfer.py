"""State transfer without sockets: an expert's state exported as GetState chunks, and the receiver's
checks of every part of a reply (header, sizes, bytes, hash, values) before it keeps anything."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from collections.abc import Callable

import grpc
import pytest
import torch

from dmoe.core.records import ExpertRecord
from dmoe.errors import ConfigError
from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend
from dmoe.node.joining import TransferPolicy, replicas_of, take_live_states
from dmoe.node.transfer import (
    SERVICE,
    ExpertState,
    NotNewer,
    StateRefused,
    export_state,
    receive_state,
    state_chunks,
)
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")
HIDDEN = 8


def backend(uid: str = "ffn.0", **overrides) -> ExpertBackend:
    config = NodeConfig(hidden_dim=HIDDEN, inner_dim=12, max_batch_tokens=64, max_queued_tokens=64,
                        **overrides)
    return build_backend(uid, config, CPU)


def train(expert: ExpertBackend, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, HIDDEN, generator=generator)
        expert.backward([x], [torch.randn(4, HIDDEN, generator=generator)])


def reply(expert: ExpertBackend, chunk_bytes: int = 100, optimizer: bool = True) -> list[pb.StateChunk]:
    header, views = export_state(expert, optimizer=optimizer)
    return list(state_chunks(header, views, chunk_bytes))


def receive(messages: list[pb.StateChunk] | list[bytes], expect: ExpertBackend, **kwargs) -> ExpertState:
    async def stream():
        for message in messages:
            yield message if isinstance(message, bytes) else message.SerializeToString()

    return asyncio.run(receive_state(stream(), uid=expect.uid, expect=expect, **kwargs))


def test_a_trained_state_moves_whole_and_training_goes_on_identically():
    donor, fresh = backend(), backend()
    train(donor, 3)
    messages = reply(donor, chunk_bytes=100)
    assert messages[0].WhichOneof("part") == "header"
    data = [m.data for m in messages[1:]]
    assert all(m.WhichOneof("part") == "data" for m in messages[1:])
    assert all(len(d) == 100 for d in data[:-1]) and 0 < len(data[-1]) <= 100  # pieces span tensors
    header = messages[0].header
    assert header.version == 3 and header.optimizer == "adam" and header.expert_cls == "ffn"
    assert header.total_bytes == sum(map(len, data))
    assert header.sha256 == hashlib.sha256(b"".join(data)).digest()
    names = {t.name for t in header.tensors}
    assert {"module.up.weight", "optimizer.0.step", "optimizer.0.exp_avg", "optimizer.3.exp_avg_sq"} <= names

    state = receive(messages, fresh)
    assert state.version == 3 and state.num_bytes == header.total_bytes and state.with_optimizer
    state.load_into(fresh)
    assert fresh.version == 3
    donor_tensors, _ = donor.state_tensors()
    fresh_tensors, _ = fresh.state_tensors()
    assert donor_tensors.keys() == fresh_tensors.keys()
    for name in donor_tensors:
        torch.testing.assert_close(fresh_tensors[name], donor_tensors[name], rtol=0, atol=0, msg=name)
    # the optimizer state came along: one more identical step keeps them identical
    train(donor, 1, seed=5)
    train(fresh, 1, seed=5)
    for (name, a), b in zip(donor.module.state_dict().items(), fresh.module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_an_untrained_state_has_no_optimizer_slots_and_loads():
    donor, other = backend(), backend()
    train(other, 2)
    messages = reply(donor)
    assert not [t for t in messages[0].header.tensors if t.name.startswith("optimizer.")]
    receive(messages, other).load_into(other)
    assert other.version == 0 and other.optimizer.state_dict()["state"] == {}


def test_parameters_alone_when_the_optimizer_is_skipped():
    donor, fresh = backend(), backend()
    train(donor, 2)
    messages = reply(donor, optimizer=False)
    assert all(t.name.startswith("module.") for t in messages[0].header.tensors)
    state = receive(messages, fresh, optimizer=False)
    assert not state.with_optimizer and set(state.parameters) == set(donor.module.state_dict())
    with pytest.raises(ValueError, match="without its optimizer"):
        state.load_into(fresh)
    with pytest.raises(StateRefused, match="at most 4"):  # optimizer state where none was asked for
        receive(reply(donor), fresh, optimizer=False)
    renamed = reply(donor, optimizer=False)
    renamed[0].header.tensors[-1].name = "optimizer.0.exp_avg"
    with pytest.raises(StateRefused, match="unknown tensor 'optimizer.0.exp_avg'"):
        receive(renamed, fresh, optimizer=False)


def test_state_schema_follows_the_optimizer():
    adam = backend().state_schema()
    assert adam["optimizer.0.exp_avg"] == ((12, HIDDEN), "float32")
    assert adam["optimizer.0.step"] == ((), "float32")
    assert backend().state_schema(optimizer=False).keys() == {k for k in adam if k.startswith("module.")}
    assert all(k.startswith("module.") for k in backend(optimizer="sgd").state_schema())


def test_a_newer_than_check_stops_after_the_header():
    donor, fresh = backend(), backend()
    train(donor, 2)
    header_only = reply(donor)[:1]  # reading past the header would fail: the stream ends there
    with pytest.raises(NotNewer) as not_newer:
        receive(header_only, fresh, newer_than=2)
    assert not_newer.value.version == 2
    assert receive(reply(donor), fresh, newer_than=1).version == 2


def edit_header(edit: Callable[[pb.StateHeader], None]) -> Callable[[list[pb.StateChunk]], None]:
    def apply(messages: list[pb.StateChunk]) -> None:
        edit(messages[0].header)
    return apply


def set_field(name: str, value) -> Callable[[pb.StateHeader], None]:
    return lambda header: setattr(header, name, value)


def tensor_edit(index: int, **fields) -> Callable[[pb.StateHeader], None]:
    def edit(header: pb.StateHeader) -> None:
        for name, value in fields.items():
            if name == "shape":
                del header.tensors[index].shape[:]
                header.tensors[index].shape.extend(value)
            else:
                setattr(header.tensors[index], name, value)
    return edit


def rehash(messages: list[pb.StateChunk]) -> None:
    messages[0].header.sha256 = hashlib.sha256(b"".join(m.data for m in messages[1:])).digest()


def put_nan(messages: list[pb.StateChunk]) -> None:
    data = bytearray(messages[1].data)
    data[0:4] = torch.tensor([float("nan")]).numpy().tobytes()
    messages[1].data = bytes(data)
    rehash(messages)


def flip_a_byte(messages: list[pb.StateChunk]) -> None:
    data = bytearray(messages[-1].data)
    data[-1] ^= 1
    messages[-1].data = bytes(data)


def drop_slot(header: pb.StateHeader) -> None:
    kept = [t for t in header.tensors if t.name != "optimizer.0.exp_avg"]
    del header.tensors[:]
    header.tensors.extend(kept)


HOSTILE = {
    "another uid": (edit_header(set_field("uid", "ffn.1")), "sent for"),
    "another class": (edit_header(set_field("expert_cls", "transformer")), "expert class"),
    "another optimizer": (edit_header(set_field("optimizer", "sgd")), "optimizer 'sgd'"),
    "negative version": (edit_header(set_field("version", -1)), "out of range"),
    "wrong shape": (edit_header(tensor_edit(0, shape=[12, HIDDEN + 1])), "this expert's is"),
    "huge shape": (edit_header(tensor_edit(0, shape=[1 << 30, 1 << 30])), "this expert's is"),
    "wrong dtype": (edit_header(tensor_edit(0, dtype="float64")), "this expert's is"),
    "unknown dtype": (edit_header(tensor_edit(0, dtype="complex128")), "this expert's is"),
    "unknown name": (edit_header(tensor_edit(0, name="module.evil")), "unknown tensor"),
    "duplicate name": (edit_header(tensor_edit(1, name="module.up.weight")), "twice"),
    "a slot missing": (edit_header(drop_slot), "optimizer slots|announces"),
    "more bytes announced": (edit_header(set_field("total_bytes", 1 << 40)), "announces"),
    "no hash": (edit_header(set_field("sha256", b"")), "no sha256"),
    "wrong hash": (flip_a_byte, "sha256"),
    "NaN": (put_nan, "NaN or Inf"),
    "extra bytes": (lambda m: m.append(pb.StateChunk(data=b"x")), "more than"),
    "short": (lambda m: m.pop(), "ended after"),
    "second header": (lambda m: m.insert(2, pb.StateChunk(header=m[0].header)), "second header"),
    "no header": (lambda m: m.pop(0), "does not start with a header"),
    "empty": (lambda m: m.clear(), "does not start with a header"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_or_broken_reply_is_refused_and_changes_nothing(case):
    donor, local = backend(), backend()
    train(donor, 2)
    before = {k: v.clone() for k, v in local.module.state_dict().items()}
    messages = reply(donor)
    tamper, why = HOSTILE[case]
    tamper(messages)
    with pytest.raises(StateRefused, match=why):
        receive(messages, local)
    assert local.version == 0
    for name, value in local.module.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_garbage_bytes_are_refused():
    local = backend()
    with pytest.raises(StateRefused, match="undecodable"):
        receive([b"\xff\xff\xff\xff garbage"], local)
    with pytest.raises(StateRefused, match="undecodable"):
        receive([reply(backend())[0].SerializeToString(), b"\x0a\xff"], local)


def test_find_experts_answers_are_normalised_to_lists():
    record = ExpertRecord(uid="ffn.0", endpoint="127.0.0.1:1", node_id="a")
    assert replicas_of(None) == [] and replicas_of(record) == [record] and replicas_of([record]) == [record]


def test_no_replica_elsewhere_means_no_call_and_a_failed_lookup_means_no_transfer():
    local = backend()
    own = ExpertRecord(uid="ffn.0", endpoint="127.0.0.1:1", node_id="me", version=9)
    other_class = ExpertRecord(uid="ffn.0", endpoint="127.0.0.1:1", node_id="b", expert_cls="transformer")
    policy = TransferPolicy(deadline=5)

    async def only_own(uids):
        return {"ffn.0": [own, other_class]}

    async def broken(uids):
        raise RuntimeError("DHT unreachable")

    async def hangs(uids):
        await asyncio.sleep(60)

    for find in (only_own, broken):
        assert asyncio.run(take_live_states({"ffn.0": local}, find, node_id="me", key=None, local_versions={},
                                            policy=policy)) == {}
    quick = TransferPolicy(lookup_timeout=0.2)
    assert asyncio.run(take_live_states({"ffn.0": local}, hangs, node_id="me", key=None, local_versions={},
                                        policy=quick)) == {}
    assert local.version == 0


def test_transfer_policy_rejects_bad_values():
    with pytest.raises(ConfigError, match="deadline"):
        TransferPolicy(deadline=0)
    with pytest.raises(ConfigError, match="max_concurrent"):
        TransferPolicy(max_concurrent=-1)


def test_random_corruption_is_refused_or_changes_no_tensor():
    """Bytes flipped, cut or inserted anywhere in a reply's messages: the receiver refuses it with
    StateRefused, never another error; whatever it accepts (a flip in the version, say) has exactly
    the donor's tensors, since the header must fit the schema and the bytes their hash."""
    donor, local = backend(), backend()
    train(donor, 1)
    original = [m.SerializeToString() for m in reply(donor, chunk_bytes=512)]
    want, _ = donor.state_tensors()
    rng = torch.Generator().manual_seed(0)
    refused = 0
    for _ in range(300):
        messages = list(original)
        which = int(torch.randint(len(messages), (1,), generator=rng))
        data = bytearray(messages[which])
        at = int(torch.randint(len(data), (1,), generator=rng))
        kind = int(torch.randint(3, (1,), generator=rng))
        if kind == 0:
            data[at] ^= 1 << int(torch.randint(8, (1,), generator=rng))
        elif kind == 1:
            del data[at:]
        else:
            data[at:at] = b"\x00"
        messages[which] = bytes(data)
        try:
            state = receive(messages, local)
        except StateRefused:
            refused += 1
            continue
        for name, tensor in want.items():
            assert torch.equal(state.tensors[name], tensor), name
    assert refused > 250


class BusyDonor:
    """A replica that answers GetState with RESOURCE_EXHAUSTED (busy with other joiners) ``busy`` times,
    then with ``expert``'s state."""

    def __init__(self, expert: ExpertBackend, busy: int):
        self.expert, self.busy, self.calls = expert, busy, 0
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        handler = grpc.unary_stream_rpc_method_handler(self.get_state,
                                                       request_deserializer=pb.GetStateRequest.FromString,
                                                       response_serializer=None)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE,
                                                                                   {"GetState": handler}),))
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def get_state(self, request: pb.GetStateRequest, context):
        self.calls += 1
        if self.calls <= self.busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "2 state transfers in progress already")
        for message in reply(self.expert, chunk_bytes=4096):
            yield message.SerializeToString()


@pytest.mark.parametrize("busy, taken", [(2, True), (8, False)])
def test_a_busy_replica_is_asked_again_before_the_expert_starts_from_its_seed(busy, taken):
    """A replica serving other joiners refuses with RESOURCE_EXHAUSTED; the joiner asks it again after
    a pause (it once took the next, dead, record and started from the seed), up to busy_retries times."""
    trained = backend()
    train(trained, 3)
    donor = BusyDonor(trained, busy)
    local = backend()
    record = ExpertRecord(uid="ffn.0", endpoint=donor.endpoint, node_id="donor", version=3)

    async def find(uids):
        return {"ffn.0": [record]}

    try:
        policy = TransferPolicy(deadline=30, busy_retries=3, busy_pause=0.05)
        got = asyncio.run(take_live_states({"ffn.0": local}, find, node_id="me", key=None, local_versions={},
                                           policy=policy))
    finally:
        donor.server.stop(0)
    assert donor.calls == (busy + 1 if taken else 4)
    assert ("ffn.0" in got) == taken and local.version == (3 if taken else 0)
    if taken:
        assert all(torch.equal(a, b) for a, b in zip(local.module.parameters(), trained.module.parameters()))
