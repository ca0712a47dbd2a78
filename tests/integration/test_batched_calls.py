"""One call per node per step (ForwardBatch, BackwardBatch, and the packed ForwardPacked, BackwardPacked)
against real nodes on 127.0.0.1.

Two nodes, a (``ffn.0``-``ffn.3``) and b (``ffn.4``-``ffn.7``), both also hosting replicas of
``rep.0``-``rep.3``, learn at a rate of 1e-9, so their experts stay the uid-seeded initial ones that
a local reference builds. A RemoteMoE step over several experts of both, batched (the default),
gives the outputs and gradients of a step with a call per expert
(``SwarmConfig(batch_per_node=False)``), of a step in batched calls of a message per part
(``packed_calls=False``) and of a local MoE, in one call per node touched for the forward and one for
the backward, as the nodes count them (Info): packed ones by default. A part of a batched call that is
malformed or names an unknown uid fails alone, with the status and message its own call gets,
while the other parts are served; parts past the peer's calls in flight (``--max-calls-per-peer``)
are refused alone; a batched request above the node's message limit goes through the batched
stream. A part of a packed call (every part's rows in one tensor) fails alone as its own call would,
and what cannot be told apart part by part refuses the whole call. An old node (a stand-in that
serves Forward and Backward only) gets calls per expert, and
is asked for a batched call once. Bytes sent to the batched methods, random or mutated, end in a
refusal or an answer, never another status. A node killed with a batched call in flight (b, in the
module's last test): its parts fail over to the other replica within the step.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
import uvloop
from counting_server import CountingServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swarm_fixtures import NodeProcess, stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.dispatch import Dispatcher, ExpertCall, ExpertJob
from dmoe.client.health import Disagreement, LocalInputError
from dmoe.client.swarm import Swarm
from dmoe.core.experts import create_expert
from dmoe.core.records import ExpertRecord
from dmoe.core.wire import deserialize, serialize
from dmoe.errors import WireError
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(150)
HIDDEN, NUM_EXPERTS = 16, 8
UIDS = [f"ffn.{i}" for i in range(NUM_EXPERTS)]
REPLICATED = [f"rep.{i}" for i in range(4)]  # hosted by both nodes
COMMON = ["--hidden-dim", str(HIDDEN), "--lr", "1e-9", "--average-interval", "0"]
MAX_PARTS_PER_PEER = 6  # node a's: a batched call of more parts has the rest refused
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
REFUSAL_NUMBERS = {code.value[0] for code in REFUSALS}
INVALID, NOT_FOUND, EXHAUSTED = (code.value[0] for code in (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    workdir = tmp_path_factory.mktemp("batched")
    a = NodeProcess(workdir, ["--experts", "ffn.[0:4]", "--experts", "rep.[0:4]", *COMMON,
                              "--max-parts-per-peer", str(MAX_PARTS_PER_PEER)], "a")
    b = None
    try:
        a.start()
        b = NodeProcess(workdir, ["--experts", "ffn.[4:8]", "--experts", "rep.[0:4]", *COMMON,
                                  "--swarm", a.swarm[0]], "b").start()
        yield a, b
    finally:
        for node in (a, b):
            if node is not None:
                node.cleanup()


@contextlib.contextmanager
def joined(node: NodeProcess, **config) -> Iterator[Swarm]:
    """A client Swarm (no spot checks: the tests count calls) that sees all the pair's experts."""
    with Swarm(SwarmConfig(initial_peers=node.swarm, cache_ttl=60, spot_check_rate=0, **config)) as swarm:
        def all_listed() -> bool:
            found = swarm.live_replicas_under(["ffn.", "rep."], refresh=True)
            return (len(found["ffn."]) == NUM_EXPERTS and len(found["rep."]) == len(REPLICATED)
                    and all(len(r) == 2 for r in found["rep."].values()))

        wait_for(all_listed, 30, "all experts and replicas")
        yield swarm


@pytest.fixture(scope="module")
def swarm(pair) -> Iterator[Swarm]:
    with joined(pair[0]) as swarm:
        yield swarm


def node_calls(node: NodeProcess) -> tuple[int, int, int]:
    """(expert calls, batched calls, parts of batched calls) the node received (its Info)."""
    channel, service = stub(node.endpoint)
    try:
        info = service.Info(pb.InfoRequest(), timeout=10)
        return info.expert_calls, info.batched_calls, info.batched_parts
    finally:
        channel.close()


def packed_calls(node: NodeProcess) -> int:
    """Packed calls the node received (its Info)."""
    channel, service = stub(node.endpoint)
    try:
        return service.Info(pb.InfoRequest(), timeout=10).packed_calls
    finally:
        channel.close()


def local_experts(uids: list[str] = UIDS) -> dict[str, torch.nn.Module]:
    return {uid: create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0] for uid in uids}


def reference(layer: RemoteMoE, x_TD: torch.Tensor, uids: list[str] = UIDS) -> torch.Tensor:
    """The same MoE computed here from the uid-seeded experts."""
    experts = local_experts(uids)
    top_TK, experts_TK = layer.gates[0](x_TD).topk(layer.k, dim=-1)
    weights_TK = top_TK.softmax(-1)
    return torch.stack([sum(weights_TK[t, j] * experts[uids[int(experts_TK[t, j])]](x_TD[t:t + 1])[0]
                            for j in range(layer.k)) for t in range(x_TD.shape[0])])


def record(uid: str, endpoint: str, **fields) -> ExpertRecord:
    return ExpertRecord(uid=uid, endpoint=endpoint, node_id="test", **fields)


def test_a_step_makes_one_call_per_node_and_equals_calls_per_expert_and_a_local_moe(pair, swarm):
    a, b = pair
    torch.manual_seed(0)
    with joined(a, batch_per_node=False) as per_expert_swarm, joined(a, packed_calls=False) as unpacked_swarm:
        layers = {"batched": RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2),
                  "unpacked": RemoteMoE(unpacked_swarm, prefix="ffn", grid=(NUM_EXPERTS,),
                                        in_features=HIDDEN, k=2),
                  "per expert": RemoteMoE(per_expert_swarm, prefix="ffn", grid=(NUM_EXPERTS,),
                                          in_features=HIDDEN, k=2)}
        for other in ("unpacked", "per expert"):
            layers[other].load_state_dict(layers["batched"].state_dict())
        assert layers["batched"].dispatcher.batch_per_node and layers["batched"].dispatcher.packed_calls
        assert not layers["unpacked"].dispatcher.packed_calls
        assert not layers["per expert"].dispatcher.batch_per_node
        x = torch.randn(48, HIDDEN)
        weights = torch.linspace(-1, 1, HIDDEN)  # no zero: every expert used gets a gradient
        got = {}
        try:
            for name, layer in layers.items():
                before, packed_before = [node_calls(n) for n in pair], [packed_calls(n) for n in pair]
                x_TD = x.clone().requires_grad_()
                y = layer(x_TD)
                (y * weights).sum().backward()
                after = [node_calls(n) for n in pair]
                packed = [packed_calls(n) - m for n, m in zip(pair, packed_before)]
                assert packed == ([2, 2] if name == "batched" else [0, 0]), (name, packed)
                assert layer.last_num_failed == 0 and bool(layer.last_answered_TK.all())
                used = [layer.last_routing[0][e] for e in layer.last_routing[1].unique().tolist()]
                on = [sum(uid in UIDS[:4] for uid in used), sum(uid in UIDS[4:] for uid in used)]
                assert min(on) >= 2, on  # several experts on each node: the step has something to batch
                calls = [tuple(n - m for n, m in zip(later, earlier))
                         for earlier, later in zip(before, after)]
                if name != "per expert":  # forward and backward: one call each per node, every expert a part
                    assert calls == [(2, 2, 2 * on[0]), (2, 2, 2 * on[1])], calls
                else:
                    assert calls == [(2 * on[0], 0, 0), (2 * on[1], 0, 0)], calls
                got[name] = (y.detach(), x_TD.grad, layer.gates[0].weight.grad.clone())
        finally:
            for layer in layers.values():
                layer.dispatcher.close()
    for other in ("unpacked", "batched"):
        for want, have in zip(got["per expert"], got[other]):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
    layer = layers["batched"]
    x_TD = x.clone().requires_grad_()
    expected = reference(layer, x_TD)
    torch.testing.assert_close(got["batched"][0], expected, rtol=1e-4, atol=1e-5)
    layer.gates[0].weight.grad = None
    (expected * weights).sum().backward()
    torch.testing.assert_close(got["batched"][1], x_TD.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["batched"][2], layer.gates[0].weight.grad, rtol=1e-4, atol=1e-5)


def own_call(method, request) -> tuple[int, str]:
    """(status code number, message) of a per-expert call, which must fail."""
    with pytest.raises(grpc.RpcError) as refused:
        method(request, timeout=30)
    return refused.value.code().value[0], refused.value.details()


def test_a_bad_part_fails_alone_with_the_status_of_its_own_call(pair):
    a, _ = pair
    generator = torch.Generator().manual_seed(1)
    x = lambda rows, width=HIDDEN: serialize(torch.randn(rows, width, generator=generator))  # noqa: E731
    nan = serialize(torch.full((2, HIDDEN), float("nan")))
    forward = [pb.ForwardRequest(uid="ffn.0", inputs=[x(3)]),
               pb.ForwardRequest(uid="ffn.1", inputs=[x(3, HIDDEN + 1)]),  # bad shape
               pb.ForwardRequest(uid="ffn.99", inputs=[x(3)]),  # not hosted
               pb.ForwardRequest(uid="ffn.3", inputs=[nan]),  # not finite
               pb.ForwardRequest(uid="ffn.2", inputs=[x(5)])]
    backward = [pb.BackwardRequest(uid="ffn.0", inputs=[x(4)], grad_outputs=[x(4)]),
                pb.BackwardRequest(uid="ffn.1", inputs=[x(4)], grad_outputs=[x(3)]),  # grad of a bad shape
                pb.BackwardRequest(uid="ffn.2", inputs=[x(2)], grad_outputs=[nan]),  # grad not finite
                pb.BackwardRequest(uid="ffn.3", inputs=[x(2)], grad_outputs=[x(2)])]
    channel, service = stub(a.endpoint)
    try:
        before = node_calls(a)
        replies = [service.ForwardBatch(pb.ForwardBatchRequest(parts=forward), timeout=30).parts,
                   service.BackwardBatch(pb.BackwardBatchRequest(parts=backward), timeout=30).parts]
        assert node_calls(a) == (before[0] + 2, before[1] + 2, before[2] + len(forward) + len(backward))
        assert [p.code for p in replies[0]] == [0, INVALID, NOT_FOUND, INVALID, 0]
        assert [p.code for p in replies[1]] == [0, INVALID, INVALID, 0]
        for method, requests, parts in ((service.Forward, forward, replies[0]),
                                        (service.Backward, backward, replies[1])):
            for request, part in zip(requests, parts):
                if part.code:
                    assert not part.tensors and part.message
                    assert own_call(method, request) == (part.code, part.message)
                else:
                    own = method(request, timeout=30)
                    want = own.grad_inputs if method is service.Backward else own.outputs
                    torch.testing.assert_close(deserialize(part.tensors[0], max_numel=1 << 16),
                                               deserialize(want[0], max_numel=1 << 16), rtol=1e-5, atol=1e-6)
    finally:
        channel.close()


def packed(uids: list[str], inputs: list[torch.Tensor], grads: list[torch.Tensor] | None = None
           ) -> pb.PackedRequest:
    request = pb.PackedRequest(uids=uids, rows=[x.shape[0] for x in inputs],
                               inputs=serialize(torch.cat(inputs)))
    if grads is not None:
        request.grad_outputs.CopyFrom(serialize(torch.cat(grads)))
    return request


def test_a_bad_part_of_a_packed_call_fails_alone_with_the_status_of_its_own_call(pair):
    a, _ = pair
    generator = torch.Generator().manual_seed(3)
    x = lambda rows: torch.randn(rows, HIDDEN, generator=generator)  # noqa: E731
    nan = torch.full((2, HIDDEN), float("nan"))
    large = torch.full((1, HIDDEN), 1e4)  # above the node's max_grad_abs (1e3)
    forward = (["ffn.0", "ffn.99", "ffn.3", "ffn.2"], [x(3), x(3), nan, x(5)])  # not hosted; not finite
    backward = (["ffn.0", "ffn.2", "ffn.1", "ffn.3"], [x(4), x(2), x(1), x(2)],
                [x(4), nan, large, x(2)])  # gradients not finite; out of the node's bounds
    channel, service = stub(a.endpoint)
    try:
        before, packed_before = node_calls(a), packed_calls(a)
        replies = [service.ForwardPacked(packed(*forward), timeout=30),
                   service.BackwardPacked(packed(*backward), timeout=30)]
        assert node_calls(a) == (before[0] + 2, before[1] + 2, before[2] + 8)
        assert packed_calls(a) == packed_before + 2
        assert list(replies[0].codes) == [0, NOT_FOUND, INVALID, 0]
        assert list(replies[1].codes) == [0, INVALID, grpc.StatusCode.OUT_OF_RANGE.value[0], 0]
        for method, request_cls, (uids, *tensors), reply in (
                (service.Forward, pb.ForwardRequest, forward, replies[0]),
                (service.Backward, pb.BackwardRequest, backward, replies[1])):
            outputs = iter(deserialize(reply.outputs, max_numel=1 << 16).split(
                [t.shape[0] for t, code in zip(tensors[0], reply.codes) if code == 0]))
            for i, (uid, code, message) in enumerate(zip(uids, reply.codes, reply.messages)):
                request = request_cls(uid=uid, inputs=[serialize(tensors[0][i])])
                if len(tensors) > 1:
                    request.grad_outputs.append(serialize(tensors[1][i]))
                if code:
                    assert message and own_call(method, request) == (code, message)
                else:
                    own = method(request, timeout=30)
                    want = own.grad_inputs if method is service.Backward else own.outputs
                    torch.testing.assert_close(next(outputs), deserialize(want[0], max_numel=1 << 16),
                                               rtol=1e-5, atol=1e-6)
    finally:
        channel.close()


@pytest.mark.parametrize("case", ["rows do not add up", "a row count missing", "an empty part", "no parts",
                                  "too many parts", "grads missing", "not decodable"])
def test_a_packed_call_whose_parts_cannot_be_told_apart_is_refused_whole(pair, case):
    a, _ = pair
    request = packed(["ffn.0", "ffn.1"], [torch.randn(2, HIDDEN), torch.randn(3, HIDDEN)],
                     [torch.randn(2, HIDDEN), torch.randn(3, HIDDEN)])
    if case == "rows do not add up":
        request.rows[1] = 4
    elif case == "a row count missing":
        del request.rows[1]
    elif case == "an empty part":
        request.rows[:] = [0, 5]
    elif case == "no parts":
        del request.uids[:], request.rows[:]
    elif case == "too many parts":
        request = packed([UIDS[i % 4] for i in range(1025)], [torch.randn(1, HIDDEN)] * 1025)
    elif case == "grads missing":
        request.ClearField("grad_outputs")
    elif case == "not decodable":
        request.inputs.buffer = request.inputs.buffer[:-4]
    channel, service = stub(a.endpoint)
    try:
        before = [p.stats.backward_calls for p in service.Info(pb.InfoRequest(), timeout=10).experts]
        with pytest.raises(grpc.RpcError) as refused:
            service.BackwardPacked(request, timeout=30)
        after = [p.stats.backward_calls for p in service.Info(pb.InfoRequest(), timeout=10).experts]
    finally:
        channel.close()
    want = "RESOURCE_EXHAUSTED" if case == "too many parts" else "INVALID_ARGUMENT"
    assert refused.value.code().name == want and refused.value.details()
    assert after == before  # no expert served any part


def test_a_reply_out_of_bounds_or_inputs_not_finite_fail_their_own_call_alone(pair, swarm):
    """The client checks a batched reply's values all at once, and a step's inputs all at once: when
    a check fails, it finds the call at fault, and only that call fails (the reply above
    max_reply_abs; the inputs, or gradients, not finite: not sent), the others answered."""
    a, _ = pair
    experts = local_experts(UIDS[:2])
    generator = torch.Generator().manual_seed(2)
    x = [torch.randn(3, HIDDEN, generator=generator), 100 * torch.randn(4, HIDDEN, generator=generator),
         torch.full((2, HIDDEN), float("nan"))]
    with torch.no_grad():
        small, large = (float(experts[uid](inputs).abs().max()) for uid, inputs in zip(UIDS[:2], x))
    assert small < large / 2, (small, large)
    found = swarm.live_replicas_under(["ffn."], refresh=True)["ffn."]
    jobs = [ExpertJob(UIDS[i], found[i], x[i], torch.arange(3 * i, 3 * i + x[i].shape[0])) for i in range(3)]
    dispatcher = swarm.dispatcher(pb.NONE)
    dispatcher.max_reply_abs = (small + large) / 2
    fates: dict[str, BaseException | None] = {}
    try:
        before = node_calls(a)
        answers = dispatcher.forward(jobs, num_tokens=8, k_min=1, forward_timeout=30, timeout_after_k_min=30,
                                     on_result=lambda call, error: fates.__setitem__(call.uid, error))
        assert node_calls(a) == (before[0] + 1, before[1] + 1, before[2] + 2)  # the NaN inputs unsent
        assert [job for job, *_ in answers.parts] == [0] and answers.num_failed == 2
        torch.testing.assert_close(answers.parts[0][3], experts[UIDS[0]](x[0]).detach(), rtol=1e-5, atol=1e-6)
        assert fates[UIDS[0]] is None
        assert isinstance(fates[UIDS[1]], ValueError) and "above max_reply_abs" in str(fates[UIDS[1]])
        assert isinstance(fates[UIDS[2]], LocalInputError)
        call = answers.parts[0][2]
        grads = [torch.ones_like(x[0]), torch.full_like(x[0], float("inf"))]
        calls = [dataclasses.replace(call, grad_outputs=g) for g in grads]
        fates.clear()
        assert list(dispatcher.backward(calls, backward_timeout=30, on_result=lambda c, e: fates.setdefault(
            "ok" if e is None else type(e).__name__, c))) == [0]
        assert set(fates) == {"ok", "LocalInputError"}
    finally:
        dispatcher.close()


def test_parts_past_the_parts_a_peer_may_have_in_flight_are_refused_alone(pair):
    a, _ = pair
    parts = [pb.ForwardRequest(uid=UIDS[i % 4], inputs=[serialize(torch.randn(2, HIDDEN))])
             for i in range(MAX_PARTS_PER_PEER + 2)]
    channel, service = stub(a.endpoint)
    try:
        replies = service.ForwardBatch(pb.ForwardBatchRequest(parts=parts), timeout=30).parts
    finally:
        channel.close()
    # the first part is the call itself; the next MAX_PARTS_PER_PEER are the parts in flight
    assert [p.code for p in replies] == [0] * (MAX_PARTS_PER_PEER + 1) + [EXHAUSTED]
    assert f"max_parts_per_peer={MAX_PARTS_PER_PEER}" in replies[-1].message
    # the same for a packed call's parts; the parts released, a later call is served whole
    channel, service = stub(a.endpoint)
    try:
        uids, inputs = [UIDS[i % 4] for i in range(MAX_PARTS_PER_PEER + 2)], [torch.randn(2, HIDDEN)] * 8
        reply = service.ForwardPacked(packed(uids, inputs), timeout=30)
        assert list(reply.codes) == [0] * (MAX_PARTS_PER_PEER + 1) + [EXHAUSTED]
        assert f"max_parts_per_peer={MAX_PARTS_PER_PEER}" in reply.messages[-1]
        again = service.ForwardPacked(packed(uids[:MAX_PARTS_PER_PEER + 1], inputs[:-1]), timeout=30)
        assert list(again.codes) == [0] * (MAX_PARTS_PER_PEER + 1)
    finally:
        channel.close()


def test_a_default_node_serves_every_part_of_a_step_through_hundreds_of_its_experts(pair):
    """A many-expert model routes one step to hundreds of one node's experts, in one batched call: with
    the default limits none of its parts is refused (the parts' own limit per peer is far above the
    calls' one; node b runs with the defaults)."""
    _, b = pair
    parts = [pb.ForwardRequest(uid=UIDS[4 + i % 4], inputs=[serialize(torch.randn(1, HIDDEN))])
             for i in range(300)]
    channel, service = stub(b.endpoint)
    try:
        replies = service.ForwardBatch(pb.ForwardBatchRequest(parts=parts), timeout=60).parts
    finally:
        channel.close()
    assert [(p.code, p.message) for p in replies] == [(0, "")] * 300
    assert all(len(p.tensors) == 1 for p in replies)


def test_a_batched_request_above_the_message_limit_goes_through_the_batched_stream(pair, swarm):
    """Records that announce a message limit of 1 KiB: the four parts for node a (2 KiB) are streamed
    in chunks, in one call, and so are their gradients. Before its first batched stream to a node, a
    client asks with an empty batched call whether the node has them (a stream to a node without
    them may end in INTERNAL rather than UNIMPLEMENTED)."""
    a, _ = pair
    dispatcher = swarm.dispatcher(pb.NONE)
    experts = local_experts()
    x = torch.randn(8, HIDDEN)
    jobs = [ExpertJob(uid, [record(uid, a.endpoint, max_message_bytes=1024)], x, torch.arange(8))
            for uid in UIDS[:4]]
    results: list[BaseException | None] = []
    before = node_calls(a)
    answers = dispatcher.forward(jobs, num_tokens=8, k_min=4, forward_timeout=30, timeout_after_k_min=30,
                                 on_result=lambda _, error: results.append(error))
    assert node_calls(a) == (before[0] + 2, before[1] + 2, before[2] + 4)  # the empty call, the stream
    assert results == [None] * 4 and answers.num_failed == 0 and len(answers.parts) == 4
    calls = []
    for job, _, call, output in sorted(answers.parts, key=lambda p: p[0]):
        torch.testing.assert_close(output, experts[jobs[job].uid](x), rtol=1e-4, atol=1e-5)
        calls.append(ExpertCall(call.uid, call.endpoint, call.inputs, call.token_ids,
                                grad_outputs=torch.ones_like(x), max_unary_bytes=1024))
    grads = dispatcher.backward(calls, backward_timeout=30, on_result=lambda _, error: results.append(error))
    assert node_calls(a) == (before[0] + 3, before[1] + 3, before[2] + 8)
    assert results == [None] * 8 and sorted(grads) == [0, 1, 2, 3]
    for index, call in enumerate(calls):
        inputs = x.clone().requires_grad_()
        experts[call.uid](inputs).sum().backward()
        torch.testing.assert_close(grads[index], inputs.grad, rtol=1e-4, atol=1e-5)


@pytest.fixture
def old_node() -> Iterator[CountingServer]:
    server = CountingServer().start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("max_message_bytes", [0, 1024])
def test_an_old_node_gets_calls_per_expert_and_is_asked_for_a_batched_call_once(old_node, caplog,
                                                                                max_message_bytes):
    """The stand-in answers Forward and Backward of any uid with zeros, and UNIMPLEMENTED to the
    batched calls, as a node from before them does. With a message limit of 1 KiB the requests of a
    step are above it together: the client asks with an empty batched call before it would stream
    them, then sends each alone."""
    caplog.set_level(logging.INFO, logger="dmoe.client.dispatch")
    loop = uvloop.new_event_loop()  # the client's default loop
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop)
    uids = [f"old.{i}" for i in range(3)]
    x = torch.randn(6, HIDDEN)  # 384 bytes per request: each fits in 1 KiB, the three of a step do not
    results: list[BaseException | None] = []
    try:
        for step in (1, 2):
            jobs = [ExpertJob(uid, [record(uid, old_node.endpoint, max_message_bytes=max_message_bytes)], x,
                              torch.arange(6)) for uid in uids]
            answers = dispatcher.forward(jobs, num_tokens=6, k_min=3, forward_timeout=30,
                                         timeout_after_k_min=30,
                                         on_result=lambda _, error: results.append(error))
            assert answers.num_failed == 0 and all(bool((o == 0).all()) for *_, o in answers.parts)
            assert results == [None] * 3 * step and old_node.calls == {uid: step for uid in uids}
        calls = [with_grads(call) for _, _, call, _ in answers.parts]
        grads = dispatcher.backward(calls, backward_timeout=30,
                                    on_result=lambda _, error: results.append(error))
        assert sorted(grads) == [0, 1, 2] and results == [None] * 9
        assert old_node.calls == {uid: 3 for uid in uids}
        asked = [r for r in caplog.records if "has no batched calls" in r.getMessage()]
        assert len(asked) == 1 and old_node.endpoint in asked[0].getMessage()
    finally:
        dispatcher.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextlib.contextmanager
def client_dispatcher() -> Iterator[Dispatcher]:
    """A Dispatcher on a uvloop of its own (the client's default loop), in a thread."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dispatcher = Dispatcher(loop)
    try:
        yield dispatcher
    finally:
        dispatcher.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def forward_through(dispatcher: Dispatcher, endpoint: str, uids: list[str], x: torch.Tensor
                    ) -> tuple[dict, dict[str, BaseException | None]]:
    """One forward of ``x`` through these experts of one node: the answers by uid and each call's fate."""
    fates: dict[str, BaseException | None] = {}
    jobs = [ExpertJob(uid, [record(uid, endpoint)], x, torch.arange(x.shape[0])) for uid in uids]
    answers = dispatcher.forward(jobs, num_tokens=x.shape[0], k_min=1, forward_timeout=30,
                                 timeout_after_k_min=30, on_result=lambda c, e: fates.__setitem__(c.uid, e))
    return {call.uid: output for _, _, call, output in answers.parts}, fates


def test_a_node_without_packed_calls_gets_batched_calls_and_is_asked_for_a_packed_call_once(caplog):
    """The stand-in serves the batched calls and answers UNIMPLEMENTED to the packed ones, as a node from
    before them does: each step's requests reach it in one batched call, and the client asks it for a
    packed call once."""
    caplog.set_level(logging.INFO, logger="dmoe.client.dispatch")
    server = CountingServer(batched=True).start()
    uids = [f"old.{i}" for i in range(3)]
    x = torch.randn(4, HIDDEN)
    try:
        with client_dispatcher() as dispatcher:
            for _ in range(2):
                outputs, fates = forward_through(dispatcher, server.endpoint, uids, x)
                assert fates == dict.fromkeys(uids) and all(bool((outputs[uid] == 0).all()) for uid in uids)
        assert server.methods == {"ForwardBatch": 2} and server.calls == {uid: 2 for uid in uids}
        asked = [r for r in caplog.records if "has no packed calls" in r.getMessage()]
        assert len(asked) == 1 and server.endpoint in asked[0].getMessage()
    finally:
        server.shutdown()


def packed_reply(request: pb.PackedRequest, case: str) -> bytes:
    """What a node that misbehaves in this way answers a forward PackedRequest of three parts."""
    inputs = deserialize(request.inputs, max_numel=1 << 16)
    codes, messages, outputs = [0, 0, 0], ["", "", ""], torch.zeros_like(inputs)
    if case == "undecodable":
        return b"\xff\xff\xff"
    if case == "parts missing":
        codes, messages = codes[:2], messages[:2]
    elif case == "outputs of another shape":
        outputs = outputs[1:]
    elif case == "one part refused":
        codes[1], messages[1] = INVALID, "refused here"
        outputs = torch.cat([outputs[:request.rows[0]], outputs[request.rows[0] + request.rows[1]:]])
    elif case == "one part out of bounds":
        outputs[:request.rows[0]] = 1e9
    return pb.PackedReply(codes=codes, messages=messages, outputs=serialize(outputs)).SerializeToString()


@pytest.mark.parametrize("case", ["undecodable", "parts missing", "outputs of another shape",
                                  "one part refused", "one part out of bounds"])
def test_a_malformed_packed_reply_fails_the_parts_it_spoils_and_no_others(case):
    """A reply that cannot be read part by part fails every part (WireError); outputs that do not decode to
    the answered parts' rows fail each answered part (ValueError); a part refused fails alone with the
    node's status and message (judged a disagreement: the other parts were accepted); a part out of
    max_reply_abs fails alone; the others are answered."""
    server = CountingServer(batched=True, packed=lambda request: packed_reply(request, case)).start()
    uids = [f"bad.{i}" for i in range(3)]
    try:
        with client_dispatcher() as dispatcher:
            dispatcher.max_reply_abs = 1e6
            outputs, fates = forward_through(dispatcher, server.endpoint, uids, torch.randn(2, HIDDEN))
        assert server.methods == {"ForwardPacked": 1}  # no other call was made for these parts
    finally:
        server.shutdown()
    if case in ("undecodable", "parts missing"):
        assert all(isinstance(fates[uid], WireError) for uid in uids) and outputs == {}
    elif case == "outputs of another shape":
        assert all(isinstance(fates[uid], ValueError) and "reply of shape" in str(fates[uid]) for uid in uids)
        assert outputs == {}
    elif case == "one part refused":
        # a refusal of inputs the other experts accepted is a disagreement (health.judge_refusals)
        assert isinstance(fates[uids[1]], Disagreement)
        assert str(fates[uids[1]]) == "refused what other nodes accepted: INVALID_ARGUMENT: refused here"
        assert fates[uids[0]] is fates[uids[2]] is None and set(outputs) == {uids[0], uids[2]}
    else:
        assert isinstance(fates[uids[0]], ValueError) and "above max_reply_abs" in str(fates[uids[0]])
        assert fates[uids[1]] is fates[uids[2]] is None and set(outputs) == {uids[1], uids[2]}
    assert all(bool((output == 0).all()) for output in outputs.values())


def with_grads(call: ExpertCall) -> ExpertCall:
    return ExpertCall(call.uid, call.endpoint, call.inputs, call.token_ids,
                      grad_outputs=torch.ones_like(call.inputs))


def framed_batch(backward: bool, uids: list[str], rows: list[int]) -> bytes:
    cls, part = ((pb.BackwardBatchRequest, pb.BackwardRequest) if backward
                 else (pb.ForwardBatchRequest, pb.ForwardRequest))
    parts = []
    for uid, n in zip(uids, rows):
        request = part(uid=uid, inputs=[serialize(torch.randn(n, HIDDEN))])
        if backward:
            request.grad_outputs.append(serialize(torch.randn(n, HIDDEN)))
        parts.append(request)
    return cls(parts=parts).SerializeToString()


def mutated_calls(examples: int, least_rows: int) -> Callable:
    """Hypothesis over mutated calls: the direction, the parts' uids (hosted, not hosted, empty) and rows
    (at least ``least_rows`` each), and how the call's bytes are mutated (see :func:`mutated`)."""
    return lambda test: settings(
        max_examples=examples, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )(given(backward=st.booleans(),
            uids=st.lists(st.sampled_from(UIDS[:4] + ["ffn.4", ""]), min_size=1, max_size=5),
            rows=st.lists(st.integers(least_rows, 6), min_size=5, max_size=5), cut=st.integers(0, 1 << 16),
            noise=st.binary(max_size=48), mode=st.sampled_from(["valid", "cut", "insert", "flip", "random"]),
            )(test))


@mutated_calls(examples=60, least_rows=0)
def test_bytes_to_the_batched_calls_end_in_an_answer_or_a_refusal(pair, backward, uids, rows, cut, noise,
                                                                  mode):
    a, _ = pair
    reply = sent_raw(a, "BackwardBatch" if backward else "ForwardBatch",
                     mutated(framed_batch(backward, uids, rows), cut, noise, mode))
    if reply is not None:
        reply_cls = pb.BackwardBatchResponse if backward else pb.ForwardBatchResponse
        for part in reply_cls.FromString(reply).parts:
            assert part.code == 0 or (part.code in REFUSAL_NUMBERS and part.message), part
    assert node_calls(a)[0] > 0  # and the node still serves


def mutated(data: bytes, cut: int, noise: bytes, mode: str) -> bytes:
    at = cut % (len(data) + 1)
    return {"valid": data, "cut": data[:at], "insert": data[:at] + noise + data[at:],
            "flip": data[:at] + bytes(x ^ 0xA5 for x in data[at:at + 4]) + data[at + 4:],
            "random": noise}[mode]


def sent_raw(node: NodeProcess, method_name: str, data: bytes) -> bytes | None:
    """The node's reply to these bytes as a call of ``method_name``; None if it refused them, as it must
    (a refusal status and a message)."""
    channel, _ = stub(node.endpoint)
    method = channel.unary_unary(f"/dmoe.ExpertService/{method_name}", request_serializer=None,
                                 response_deserializer=None)
    try:
        return method(data, timeout=30)
    except grpc.RpcError as e:
        assert e.code() in REFUSALS and e.details(), (e.code(), e.details())
        return None
    finally:
        channel.close()


@mutated_calls(examples=40, least_rows=1)
def test_bytes_to_the_packed_calls_end_in_an_answer_or_a_refusal(pair, backward, uids, rows, cut, noise,
                                                                 mode):
    a, _ = pair
    inputs = [torch.randn(n, HIDDEN) for n in rows[:len(uids)]]
    grads = [torch.randn_like(x) for x in inputs] if backward else None
    data = packed(uids, inputs, grads).SerializeToString()
    reply = sent_raw(a, "BackwardPacked" if backward else "ForwardPacked", mutated(data, cut, noise, mode))
    if reply is not None:
        parsed = pb.PackedReply.FromString(reply)
        assert len(parsed.codes) == len(parsed.messages) >= 1
        assert all(code == 0 or (code in REFUSAL_NUMBERS and message)
                   for code, message in zip(parsed.codes, parsed.messages)), parsed
    assert node_calls(a)[0] > 0  # and the node still serves


def test_a_node_killed_with_a_batched_call_in_flight_fails_over_to_the_replicas(pair, swarm):
    """The module's last test: it kills b. b is measured the faster replica of rep.0-rep.3, so a
    step's calls go to b, in one batched call; b is frozen (SIGSTOP), then killed while the call is in
    flight. Every part fails over to a within the step: no token loses an expert, and outputs and
    gradients are the local MoE's."""
    a, b = pair
    pool = concurrent.futures.ThreadPoolExecutor(1)
    torch.manual_seed(3)
    layer = RemoteMoE(swarm, prefix="rep", grid=(len(REPLICATED),), in_features=HIDDEN, k=2, k_min=2,
                      forward_timeout=30, timeout_after_k_min=30, backward_timeout=30)
    try:
        x = torch.randn(32, HIDDEN, requires_grad=True)
        layer(x)  # both channels open
        for _ in range(30):  # b measured 100 times faster than a: every call of the step goes to b
            for uid in REPLICATED:
                swarm.balancer.observe(b.endpoint, uid, 1000, 0.001)
                swarm.balancer.observe(a.endpoint, uid, 1000, 0.1)
        os.killpg(b.proc.pid, signal.SIGSTOP)
        forward = pool.submit(layer, x)
        wait_for(lambda: swarm.balancer.in_flight(b.endpoint) > 0, 10, "the step's call in flight on b")
        b.kill()
        y = forward.result(30)
        assert layer.last_num_failed == 0 and bool(layer.last_answered_TK.all())
        assert layer.last_num_retried == layer.last_routing[1].unique().numel()  # every part, once
        expected = reference(layer, x.detach(), REPLICATED)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        weights = torch.linspace(-1, 1, HIDDEN)
        (y * weights).sum().backward()
        remote_grad, x.grad = x.grad.clone(), None
        (reference(layer, x, REPLICATED) * weights).sum().backward()
        torch.testing.assert_close(remote_grad, x.grad, rtol=1e-4, atol=1e-5)
    finally:
        pool.shutdown()
        layer.dispatcher.close()
