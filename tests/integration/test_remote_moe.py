"""RemoteMoE against real nodes: equal to a local MoE when all answer; survivors only when not."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import pytest
import torch
from swarm_fixtures import NodeProcess, expert_version, stub, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.health import Late
from dmoe.client.swarm import Swarm
from dmoe.core.experts import create_expert
from dmoe.core.wire import deserialize, serialize
from dmoe.moe.remote import RemoteMoE
from dmoe.proto import expert_pb2 as pb
from dmoe.testing.netproxy import TcpProxy

pytestmark = pytest.mark.timeout(180)
HIDDEN, NUM_EXPERTS = 16, 8
UIDS = [f"ffn.{i}" for i in range(NUM_EXPERTS)]


@pytest.fixture
def swarm_of_two(node_factory):
    """Two nodes of this test's own (it may kill them), and a client."""
    first = node_factory("--experts", "ffn.[0:4]", "--hidden-dim", str(HIDDEN), name="a")
    second = node_factory("--experts", "ffn.[4:8]", "--hidden-dim", str(HIDDEN), "--swarm", first.swarm[0],
                          name="b")
    with Swarm(SwarmConfig(initial_peers=first.swarm, cache_ttl=60)) as swarm:
        yield swarm, first, second


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory):
    """Two nodes for the tests of this module that leave them alive. Their experts learn at a rate
    of 1e-9, so that after any test their outputs still equal the initial experts' (local_moe)."""
    workdir = tmp_path_factory.mktemp("pair")
    common = ["--hidden-dim", str(HIDDEN), "--lr", "1e-9"]
    first = NodeProcess(workdir, ["--experts", "ffn.[0:4]", *common], "a")
    second = None
    try:
        first.start()
        argv = ["--experts", "ffn.[4:8]", *common, "--swarm", first.swarm[0]]
        second = NodeProcess(workdir, argv, "b").start()
        yield first, second
    finally:
        for node in (first, second):
            if node is not None:
                node.cleanup()


@pytest.fixture
def live_pair(shared_pair):
    first, second = shared_pair
    with Swarm(SwarmConfig(initial_peers=first.swarm, cache_ttl=60)) as swarm:
        wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == NUM_EXPERTS, 30,
                 "all experts")
        yield swarm, first, second


def local_moe(layer: RemoteMoE, x_TD: torch.Tensor, alive: set[str]) -> torch.Tensor:
    """The same MoE with the experts in this process (initial weights), over the experts in alive."""
    experts = [create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0] for uid in UIDS]
    live_E = torch.tensor([uid in alive for uid in UIDS])
    logits_TE = layer.gates[0](x_TD).masked_fill(~live_E, float("-inf"))
    top_TK, experts_TK = logits_TE.topk(layer.k, dim=-1)
    weights_TK = top_TK.softmax(-1)
    rows = []
    for t in range(x_TD.shape[0]):
        rows.append(sum(weights_TK[t, j] * experts[int(experts_TK[t, j])](x_TD[t : t + 1])[0]
                        for j in range(layer.k)))
    return torch.stack(rows)


class CallLog:
    """What the client's dispatcher sent and got back, call part by call part: the real dispatcher,
    with its request building and reply decoding wrapped to keep a copy of each. Requests that go in
    packed calls (their rows in one tensor, no message each) are listed by uid in ``packed``, those
    that got an answer in ``packed_answers``."""

    def __init__(self, monkeypatch):
        from dmoe.client import dispatch

        self.requests: list[tuple[str, object]] = []  # (uid, request)
        self.exchanges: list[tuple[str, object, pb.Tensor]] = []  # (uid, request, reply tensor)
        self.packed: list[str] = []
        self.packed_answers: list[str] = []
        sent: dict[int, tuple[torch.Tensor, str, object]] = {}
        build, decode = dispatch.Dispatcher._request, dispatch._decoded
        decode_plain = dispatch.deserialize_plain
        send_packed = dispatch.Dispatcher._send_packed

        def request(dispatcher, call, inputs, *args, **kwargs):
            built = build(dispatcher, call, inputs, *args, **kwargs)
            sent[id(inputs)] = (inputs, call.uid, built)  # inputs kept: their id stays theirs
            self.requests.append((call.uid, built))
            return built

        def decoded(tensors, like, *args):  # every reply, of a call of its own or a part of a batched one
            result = decode(tensors, like, *args)
            if id(like) in sent:  # else a packed reply: its parts are counted by packed() below
                _, uid, built = sent[id(like)]
                self.exchanges.append((uid, built, tensors[0]))
            return result

        async def packed(dispatcher, endpoint, tls, backward, group):
            self.packed.extend(q.call.uid for q in group)
            results = await send_packed(dispatcher, endpoint, tls, backward, group)
            if results is not None:
                self.packed_answers.extend(q.call.uid for q, r in zip(group, results)
                                           if isinstance(r, torch.Tensor))
            return results

        def decoded_plain(messages, like):  # a batched reply's plain parts, decoded at once
            results = decode_plain(messages, like)
            for message, want, result in zip(messages, like, results):
                if result is not None:
                    _, uid, built = sent[id(want)]
                    self.exchanges.append((uid, built, message))
            return results

        monkeypatch.setattr(dispatch.Dispatcher, "_request", request)
        monkeypatch.setattr(dispatch, "_decoded", decoded)
        monkeypatch.setattr(dispatch, "deserialize_plain", decoded_plain)
        monkeypatch.setattr(dispatch.Dispatcher, "_send_packed", packed)

    def clear(self) -> None:
        self.requests.clear()
        self.exchanges.clear()
        self.packed.clear()
        self.packed_answers.clear()


def record_fates(swarm: Swarm, monkeypatch) -> list[tuple[str, str, BaseException | None]]:
    """Every call's fate as the layer reports it to the swarm's endpoint health: (endpoint, uid, None
    for an answer used, else the error), the real report still made."""
    fates: list[tuple[str, str, BaseException | None]] = []
    report = swarm.report

    def recorded(endpoint: str, uid: str, error: BaseException | None) -> None:
        fates.append((endpoint, uid, error))
        report(endpoint, uid, error)

    monkeypatch.setattr(swarm, "report", recorded)
    return fates


def lost_connection(error: BaseException | None) -> bool:
    """A call that failed because its node's connection was refused or torn down (not a deadline)."""
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def test_all_alive_equals_a_local_moe(live_pair):
    swarm, _, _ = live_pair
    torch.manual_seed(0)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2)
    try:
        assert len(swarm.live_under(["ffn."])["ffn."]) == NUM_EXPERTS
        x = torch.randn(2, 12, HIDDEN, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape and layer.last_num_failed == 0
        (y * torch.linspace(-1, 1, HIDDEN)).sum().backward()
        remote_grad_x, remote_grad_gate = x.grad.clone(), layer.gates[0].weight.grad.clone()

        x.grad, layer.gates[0].weight.grad = None, None
        expected = local_moe(layer, x.reshape(-1, HIDDEN), set(UIDS)).reshape(x.shape)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        (expected * torch.linspace(-1, 1, HIDDEN)).sum().backward()
        torch.testing.assert_close(remote_grad_x, x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(remote_grad_gate, layer.gates[0].weight.grad, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(layer.aux_loss) and layer.aux_loss > 0 and torch.isfinite(layer.z_loss)
    finally:
        layer.dispatcher.close()


def test_experts_learn_even_when_the_input_needs_no_gradient(live_pair):
    """A RemoteMoE applied to raw features (no gradient wanted for them): backward still reaches
    the experts, whose optimizers step on their nodes."""
    swarm, first, second = live_pair
    torch.manual_seed(1)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2)
    channels = [stub(node.endpoint) for node in (first, second)]
    try:
        versions = lambda: [expert_version(channels[i // 4][1], uid) for i, uid in enumerate(UIDS)]  # noqa: E731
        before = versions()
        x = torch.randn(64, HIDDEN)
        layer(x).square().sum().backward()
        used = set(layer.last_routing[1].unique().tolist())
        after = versions()
        uids = layer.last_routing[0]
        assert used and all(after[UIDS.index(uids[e])] == before[UIDS.index(uids[e])] + 1 for e in used)
        assert x.grad is None
    finally:
        layer.dispatcher.close()
        for channel, _ in channels:
            channel.close()


def test_a_lookup_that_hangs_leaves_the_last_known_experts_in_use(live_pair, monkeypatch, caplog):
    """A DHT lookup stuck (a frozen peer on its path) costs a step lookup_timeout, not the step: the
    lookups here never end on their own, and each is given up (cancelled) once its time is over."""
    swarm, _, _ = live_pair
    torch.manual_seed(2)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2)
    given_up: list[list[str]] = []
    try:
        expected = layer(torch.ones(4, HIDDEN))

        async def stuck(node, keys, *args):
            try:
                await asyncio.Event().wait()  # never set: a client that waited for it would hang
            except asyncio.CancelledError:
                given_up.append(list(keys))
                raise

        monkeypatch.setattr("dmoe.client.swarm.find_under_prefixes_async", stuck)
        swarm.config.lookup_timeout, swarm.config.cache_ttl = 0.5, 0.0
        assert len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == NUM_EXPERTS
        assert "using the last known experts" in caplog.text
        wait_for(lambda: given_up == [["ffn."]], 10, "the stuck lookup to be cancelled")
        torch.testing.assert_close(layer(torch.ones(4, HIDDEN)), expected)  # its own lookup hangs too
        wait_for(lambda: given_up == [["ffn."]] * 2, 10, "the layer's stuck lookup to be cancelled")
    finally:
        layer.dispatcher.close()


def test_a_dead_node_is_dropped_and_weights_renormalised(swarm_of_two, monkeypatch):
    """b is killed: its calls fail as refused connections, at once, not at their deadline."""
    swarm, _, second = swarm_of_two
    torch.manual_seed(1)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2,
                      forward_timeout=5, backward_timeout=5)
    # b's back-off outlasts this test: the check at its end does not race the slow reference computation
    swarm.health.ban_base = swarm.health.ban_max = 60.0
    try:
        # cached: the client still believes in b
        assert len(swarm.live_under(["ffn."])["ffn."]) == NUM_EXPERTS
        second.kill()
        fates = record_fates(swarm, monkeypatch)
        x = torch.randn(32, HIDDEN, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        on_b = [error for endpoint, _, error in fates if endpoint == second.endpoint]
        assert on_b and all(lost_connection(error) for error in on_b), on_b  # none waited for its deadline
        assert all(error is None for endpoint, _, error in fates if endpoint != second.endpoint)
        assert layer.last_num_failed == len(on_b) and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        # tokens whose two experts were both on b get zero; the rest use a's experts, renormalised
        survivors = {f"ffn.{i}" for i in range(4)}
        with torch.no_grad():
            logits = layer.gates[0](x)
            _, chosen = logits.topk(2, dim=-1)
            on_a = chosen < 4
            expected = local_moe_renormalised(layer, x, chosen, on_a, survivors)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        assert set(swarm.live_under(["ffn."])["ffn."]) == set(range(4))  # b's endpoint is avoided now
    finally:
        layer.dispatcher.close()


def local_moe_renormalised(layer, x_TD, chosen_TK, answered_TK, alive) -> torch.Tensor:
    experts = {uid: create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0] for uid in alive}
    logits_TK = layer.gates[0](x_TD).gather(1, chosen_TK)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        mask = answered_TK[t]
        if not mask.any():
            continue
        weights = logits_TK[t][mask].softmax(-1)
        for w, e in zip(weights, chosen_TK[t][mask]):
            out[t] += w * experts[f"ffn.{int(e)}"](x_TD[t : t + 1])[0]
    return out


def test_all_experts_dead_gives_zero(swarm_of_two, monkeypatch):
    swarm, first, second = swarm_of_two
    calls = CallLog(monkeypatch)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2,
                      forward_timeout=3, backward_timeout=3)
    try:
        assert len(swarm.live_under(["ffn."])["ffn."]) == NUM_EXPERTS
        first.kill()
        second.kill()
        x = torch.randn(5, HIDDEN, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(x.grad).all()
        assert layer.last_num_failed > 0 and (calls.requests or calls.packed)
        assert not calls.exchanges and not calls.packed_answers
        calls.clear()
        # now every endpoint is avoided: no call at all, none failed, no routing
        assert torch.equal(layer(x), torch.zeros_like(x))
        assert calls.requests == calls.packed == [] and layer.last_num_failed == 0
        assert layer.last_routing is None
    finally:
        layer.dispatcher.close()


def test_hostile_and_slow_experts_are_dropped(node_factory, tmp_path, monkeypatch):
    """b's experts answer NaN, c's answer after 60 s (past the 10 s deadline): both are failures of
    those experts, and the output is a's experts alone, renormalised. (The deadline leaves a, which
    runs its experts one after another on a loaded machine, ample time.)"""
    a = node_factory("--experts", "ffn.[0:4]", "--hidden-dim", str(HIDDEN), name="a")
    node_factory("--experts", "ffn.[4:6]", "--hidden-dim", str(HIDDEN), "--swarm", a.swarm[0],
                 "--expert-cls", "experts_for_tests:NaNExpert", name="b")
    monkeypatch.setenv("DMOE_TEST_STARTED", str(tmp_path / "slow-started"))
    monkeypatch.setenv("DMOE_TEST_SLEEP", "60")
    node_factory("--experts", "ffn.[6:8]", "--hidden-dim", str(HIDDEN), "--swarm", a.swarm[0],
                 "--expert-cls", "experts_for_tests:SlowExpert", name="c")
    with Swarm(SwarmConfig(initial_peers=a.swarm, cache_ttl=60)) as swarm:
        torch.manual_seed(2)
        layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2,
                          forward_timeout=10, backward_timeout=5)
        try:
            assert len(swarm.live_under(["ffn."])["ffn."]) == NUM_EXPERTS
            x = torch.randn(32, HIDDEN)
            y = layer(x)
            with torch.no_grad():
                chosen = layer.gates[0](x).topk(2, dim=-1).indices
                expected = local_moe_renormalised(layer, x, chosen, chosen < 4,
                                                  {f"ffn.{i}" for i in range(4)})
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
            assert set(swarm.live_under(["ffn."])["ffn."]) == set(range(4))
        finally:
            layer.dispatcher.close()


def encoded_bytes(numel: int, compression: int) -> int:
    """The size of a float32 tensor's buffer on the wire: 8-bit is a bin count, 256 float32 bucket
    values and a byte per element."""
    return {pb.NONE: 4 * numel, pb.FLOAT16: 2 * numel, pb.UNIFORM_8BIT: 8 + 4 * 256 + numel}[compression]


def assert_within_one_step(decoded: torch.Tensor, exact: torch.Tensor, compression: int) -> None:
    """``decoded`` is ``exact`` sent with this compression: equal (up to the node's float rounding), within
    one float16 step (2^-10 relative), or, for 8-bit, within one bucket (6 std / 256) wherever the
    value lies inside the 256 buckets (the ends are clamped)."""
    if compression == pb.NONE:
        torch.testing.assert_close(decoded, exact, rtol=1e-5, atol=1e-6)
    elif compression == pb.FLOAT16:
        torch.testing.assert_close(decoded, exact, rtol=2 ** -10, atol=1e-6)
    else:
        step = 6 * float(exact.std()) / 256
        inside = (exact - exact.mean()).abs() < 127 * step
        assert bool(inside.any())
        assert float((decoded - exact)[inside].abs().max()) <= step + 1e-6


def test_compressed_activations_and_gradients_stay_close(live_pair, monkeypatch):
    """Each compression, forward and backward: every tensor sent and every reply is in that encoding
    and of its size; the inputs are the client's rows encoded; each reply is the expert's exact result
    on the decoded request, within one step of the encoding; the layer's output mixes the replies. (Each
    expert's rows in a message of their own: in batched calls without packing. Packed, their rows share
    one tensor, encoded elementwise alike: the same step gives the same outputs and input gradients, and
    8-bit, whose codebook would span the experts, is never packed.)"""
    swarm, _, _ = live_pair
    calls = CallLog(monkeypatch)
    experts = {uid: create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0] for uid in UIDS}
    torch.manual_seed(3)
    x = torch.randn(24, HIDDEN)
    gate = torch.nn.Linear(HIDDEN, NUM_EXPERTS).state_dict()
    outputs = {}
    for name, compression in (("none", pb.NONE), ("fp16", pb.FLOAT16), ("8bit", pb.UNIFORM_8BIT)):
        layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2,
                          compression=name)
        try:
            layer.gates[0].load_state_dict(gate)
            calls.clear()
            layer.dispatcher.packed_calls = True
            x_packed = x.clone().requires_grad_(True)
            y_packed = layer(x_packed)
            y_packed.square().sum().backward()
            assert layer.last_num_failed == 0
            assert bool(calls.packed) == (compression != pb.UNIFORM_8BIT), calls.packed
            assert sorted(calls.packed) == sorted(calls.packed_answers)
            calls.clear()
            layer.dispatcher.packed_calls = False
            x_in = x.clone().requires_grad_(True)
            y = layer(x_in)
            forward = {uid: (request, reply) for uid, request, reply in calls.exchanges}
            calls.clear()
            y.square().sum().backward()
            backward = {uid: (request, reply) for uid, request, reply in calls.exchanges}
        finally:
            layer.dispatcher.close()
        assert layer.last_num_failed == 0
        uids, experts_TK = layer.last_routing
        top_TK = layer.gates[0](x).gather(1, experts_TK)
        weights_TK = top_TK.softmax(-1).detach()
        used = {uids[e]: torch.nonzero((experts_TK == e).any(-1)).flatten()
                for e in experts_TK.unique().tolist()}
        assert len(forward) == len(calls.requests) == len(backward) == len(used)
        assert set(forward) == set(backward) == set(used)
        expected = torch.zeros_like(x)
        for uid, rows in used.items():
            request, reply = forward[uid]
            assert request.reply_compression == compression
            assert request.inputs[0] == serialize(x[rows], compression)  # the rows routed there, encoded
            assert reply.compression == compression
            assert len(reply.buffer) == encoded_bytes(rows.numel() * HIDDEN, compression)
            sent = deserialize(request.inputs[0], max_numel=x.numel())
            with torch.no_grad():
                exact = experts[uid](sent)
            got = deserialize(reply, max_numel=x.numel())
            assert_within_one_step(got, exact, compression)
            for j in range(2):  # the layer mixes what the replies hold
                chosen = experts_TK[rows, j] == uids.index(uid)
                expected[rows[chosen]] += weights_TK[rows[chosen], j, None] * got[chosen]

            request, reply = backward[uid]
            assert request.reply_compression == compression
            assert request.inputs[0] == serialize(x[rows], compression)
            assert request.grad_outputs[0].compression == reply.compression == compression
            assert len(reply.buffer) == encoded_bytes(rows.numel() * HIDDEN, compression)
            leaf = sent.clone().requires_grad_(True)
            grad_out = deserialize(request.grad_outputs[0], max_numel=x.numel())
            (exact_grad,) = torch.autograd.grad(experts[uid](leaf), leaf, grad_out)
            assert_within_one_step(deserialize(reply, max_numel=x.numel()), exact_grad, compression)
        torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-6)
        # the same up to the node's rounding (experts run as groups of the parts waiting together)
        torch.testing.assert_close(y_packed.detach(), y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_packed.grad, x_in.grad, rtol=1e-5, atol=1e-6)
        outputs[name] = y.detach()
    torch.testing.assert_close(outputs["none"], local_moe(layer, x, set(UIDS)).detach(), rtol=1e-4, atol=1e-5)


def test_beam_search_on_a_16x16_grid_over_2_nodes_finds_the_true_top_k(node_factory):
    first = node_factory("--experts", "grid.[0:8].[0:16]", "--hidden-dim", "8", name="n0")
    node_factory("--experts", "grid.[8:16].[0:16]", "--hidden-dim", "8", "--swarm", first.swarm[0], name="n1")
    with Swarm(SwarmConfig(initial_peers=first.swarm)) as swarm:
        torch.manual_seed(4)
        layer = RemoteMoE(swarm, prefix="grid", grid=(16, 16), in_features=8, k=4, k_min=4, beam_size=4)
        try:
            wait_for(lambda: len(swarm.live_under(["grid."], refresh=True)["grid."]) == 16, 30, "all 16 rows")
            x = torch.randn(40, 8)
            with torch.no_grad():
                y = layer(x)
                s1, s2 = layer.gates[0](x), layer.gates[1](x)
            assert layer.last_num_failed == 0 and torch.isfinite(y).all()
            uids, experts_TK = layer.last_routing
            full_T256 = (s1[:, :, None] + s2[:, None, :]).reshape(40, 256)
            true_TK = full_T256.topk(4, dim=-1).indices
            for t in range(40):
                chosen = {uids[int(e)] for e in experts_TK[t]}
                assert chosen == {f"grid.{int(i) // 16}.{int(i) % 16}" for i in true_TK[t]}
            assert len(uids) < 256  # the beam did not list the whole grid
        finally:
            layer.dispatcher.close()


def test_a_node_killed_mid_forward_and_mid_backward(node_factory, tmp_path, monkeypatch):
    """b's experts take a second per call; b is killed while a forward, then a backward, is in
    flight there. Both finish without waiting for their deadlines (b's calls fail as the connection
    goes, none is cut by its deadline), using a's experts only."""
    marker = tmp_path / "started"
    monkeypatch.setenv("DMOE_TEST_STARTED", str(marker))
    a = node_factory("--experts", "ffn.[0:4]", "--hidden-dim", str(HIDDEN), name="a")
    b_args = ["--experts", "ffn.[4:8]", "--hidden-dim", str(HIDDEN), "--swarm", a.swarm[0],
              "--expert-cls", "experts_for_tests:SlowExpert"]
    with Swarm(SwarmConfig(initial_peers=a.swarm, cache_ttl=60)) as swarm:
        torch.manual_seed(5)
        # b serves its 4 slow experts one after another: wait for all of them once the quorum is met
        layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2,
                          forward_timeout=20, timeout_after_k_min=20, backward_timeout=20)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            b = node_factory(*b_args, name="b")
            wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == 8, 30, "all experts")
            x = torch.randn(32, HIDDEN, requires_grad=True)
            fates = record_fates(swarm, monkeypatch)
            forward = pool.submit(layer, x)
            wait_for(marker.exists, 20, "a forward call in flight on b")
            b.kill()
            y = forward.result(30)
            on_b = [error for endpoint, _, error in fates if endpoint == b.endpoint]
            assert on_b and all(lost_connection(error) for error in on_b), on_b
            assert layer.last_num_failed == len(on_b)
            with torch.no_grad():
                chosen = layer.gates[0](x).topk(2, dim=-1).indices
                expected = local_moe_renormalised(layer, x, chosen, chosen < 4,
                                                  {f"ffn.{i}" for i in range(4)})
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)

            # mid-backward: forward with b alive (restarted), then kill it while backward runs there
            marker.unlink()
            b = node_factory(*b_args, name="b2")
            # the killed b's records have not expired yet: wait until the DHT hands out b2's
            wait_for(lambda: {r.endpoint for c, r in swarm.live_under(["ffn."], refresh=True)["ffn."].items()
                              if c >= 4} == {b.endpoint}, 30, "b2's records")
            x.grad = None
            y = layer(x)
            assert layer.last_num_failed == 0
            marker.unlink()
            fates.clear()
            backward = pool.submit(lambda: y.square().sum().backward())
            wait_for(marker.exists, 20, "a backward call in flight on b")
            b.kill()
            backward.result(30)
            on_b = [error for endpoint, _, error in fates if endpoint == b.endpoint]
            assert on_b and all(lost_connection(error) for error in on_b), on_b
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        finally:
            pool.shutdown()
            layer.dispatcher.close()


def test_switch_routing_respects_capacity(live_pair):
    swarm, _, _ = live_pair
    torch.manual_seed(6)
    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=1, routing="switch",
                      capacity_factor=1.0)
    try:
        x = torch.randn(64, HIDDEN)
        with torch.no_grad():
            layer.gates[0].bias[0] = 5.0  # most tokens prefer ffn.0: the capacity must bite
            y = layer(x)
            probs = layer.gates[0](x).softmax(-1)
        uids, experts_T1 = layer.last_routing
        counts = torch.bincount(experts_T1[experts_T1 >= 0], minlength=NUM_EXPERTS)
        assert counts.max() <= 8  # ceil(1.0 x 64 tokens / 8 experts)
        dropped = experts_T1[:, 0] < 0
        assert dropped.any() and torch.equal(y[dropped], torch.zeros_like(y[dropped]))
        experts = {uid: create_expert("ffn", uid=uid, hidden_dim=HIDDEN)[0] for uid in UIDS}
        with torch.no_grad():
            for t in torch.nonzero(~dropped).flatten().tolist():
                e = int(experts_T1[t, 0])
                expected = probs[t, UIDS.index(uids[e])] * experts[uids[e]](x[t : t + 1])[0]
                torch.testing.assert_close(y[t], expected, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(layer.aux_loss)
    finally:
        layer.dispatcher.close()


def test_big_sub_batches_are_cut_to_the_node_limits_and_streamed(node_factory):
    """The node takes at most 48 tokens per request and 1 KiB unary messages (it says so in its
    records): 512 tokens are cut into parts of at most 48 rows, sent through the streams, and the
    result still equals the local MoE, forward and backward. (Each part's Backward is an Adam step on
    the node, and the next part's gradient is taken at the stepped weights: a learning rate of 1e-9
    keeps those steps too small to see.)"""
    node = node_factory("--experts", "ffn.[0:8]", "--hidden-dim", str(HIDDEN), "--max-batch-tokens", "48",
                        "--max-message-bytes", "1024", "--lr", "1e-9", name="small")
    with Swarm(SwarmConfig(initial_peers=node.swarm, cache_ttl=60)) as swarm:
        torch.manual_seed(7)
        layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2)
        try:
            records = swarm.live_under(["ffn."])["ffn."]
            assert {r.max_batch_tokens for r in records.values()} == {48}
            x = torch.randn(512, HIDDEN, requires_grad=True)
            y = layer(x)
            (y * torch.linspace(-1, 1, HIDDEN)).sum().backward()
            assert layer.last_num_failed == 0
            remote_grad_x = x.grad.clone()
            x.grad = None
            expected = local_moe(layer, x, set(UIDS))
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
            (expected * torch.linspace(-1, 1, HIDDEN)).sum().backward()
            torch.testing.assert_close(remote_grad_x, x.grad, rtol=1e-4, atol=1e-5)
        finally:
            layer.dispatcher.close()
        channel, service = stub(node.endpoint)
        with channel:
            stats = {e.uid: e.stats for e in service.Info(pb.InfoRequest(), timeout=10).experts}
        _, experts_TK = layer.last_routing
        for e, uid in enumerate(layer.last_routing[0]):
            rows = int((experts_TK == e).sum())
            assert stats[uid].forward_tokens == rows
            assert stats[uid].forward_calls == -(-rows // 48)  # ceil: one request per part of <= 48 rows


def test_a_node_behind_a_slow_link_is_dropped_then_used_again(node_factory, monkeypatch):
    """c is reached through a proxy (it announces the proxy's port). With an hour of delay on that
    link (c's answers cannot come back while the test runs) and a 4 s deadline, the step ends, cut by
    its deadline, without c's experts; once the link is fast again and c's back-off has passed, c's
    experts are used again. Then the link turns flaky (lost segments, resets): no step fails, and
    each call that fails is c's, ended by its deadline or by the connection's loss."""
    a = node_factory("--experts", "ffn.[0:6]", "--hidden-dim", str(HIDDEN), name="a")
    with TcpProxy() as proxy:
        c = node_factory("--experts", "ffn.[6:8]", "--hidden-dim", str(HIDDEN), "--swarm", a.swarm[0],
                         "--announce-port", str(proxy.port), name="c")
        proxy.target = ("127.0.0.1", c.ready["port"])
        assert c.endpoint == f"127.0.0.1:{proxy.port}"
        with Swarm(SwarmConfig(initial_peers=a.swarm, cache_ttl=60, ban_base=1.0)) as swarm:
            torch.manual_seed(8)
            layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2,
                              forward_timeout=4.0, timeout_after_k_min=4.0, backward_timeout=4.0)
            try:
                wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == 8, 30,
                         "all experts")
                x = torch.randn(64, HIDDEN)
                with torch.no_grad():
                    chosen = layer.gates[0](x).topk(2, dim=-1).indices
                    assert bool((chosen >= 6).any()), "the test needs tokens routed to c"
                    torch.testing.assert_close(layer(x), local_moe(layer, x, set(UIDS)), rtol=1e-4, atol=1e-5)
                    assert proxy.num_connections >= 1

                    proxy.delay = 3600.0
                    fates = record_fates(swarm, monkeypatch)
                    y = layer(x)  # returns: it did not wait for c, whose answers are an hour away
                    assert layer.last_num_failed == int((chosen >= 6).any(0).sum()) == 2
                    on_c = [error for endpoint, _, error in fates if endpoint == c.endpoint]
                    assert len(on_c) == 2, on_c  # each cut by the forward's deadline
                    assert all(isinstance(e, Late) and "deadline" in str(e) for e in on_c), on_c
                    assert all(error is None for endpoint, _, error in fates if endpoint != c.endpoint)
                    expected = local_moe_renormalised(layer, x, chosen, chosen < 6,
                                                      {f"ffn.{i}" for i in range(6)})
                    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)

                    proxy.delay = 0.0
                    proxy.cut_connections()  # the delayed bytes still queued on the old connection go with it
                    wait_for(lambda: len(swarm.live_under(["ffn."])["ffn."]) == 8, 10, "c's back-off to end")
                    torch.testing.assert_close(layer(x), local_moe(layer, x, set(UIDS)), rtol=1e-4, atol=1e-5)
                    assert layer.last_num_failed == 0

                # a flaky link: lost segments (0.2 s stalls) and connection resets; no step raises,
                # each ends within its deadlines, and c still answers some of the time
                proxy.loss, proxy.reset = 0.2, 0.1
                # retry c at once, to meet the faults often
                swarm.health.ban_base = swarm.health.ban_max = 0.01
                failed = 0
                fates.clear()
                for _ in range(12):
                    x = torch.randn(64, HIDDEN, requires_grad=True)
                    y = layer(x)
                    y.square().sum().backward()
                    assert bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all())
                    failed += layer.last_num_failed
                errors = [(endpoint, error) for endpoint, _, error in fates if error is not None]
                assert all(endpoint == c.endpoint and (isinstance(error, Late) or lost_connection(error))
                           for endpoint, error in errors), errors
                assert proxy.num_resets > 0 and proxy.num_losses > 0
                assert failed > 0 and proxy.num_connections > 2  # resets were felt, and c was dialled again
            finally:
                layer.dispatcher.close()


def test_hedging_ends_the_step_without_waiting_for_a_slow_node(node_factory):
    """ffn.7 lives on c, behind a 3 s link. Without hedging (k_min = k = 2), every step waits for
    c. With hedge=1, each token also asks its third-best expert; all of a token's k answers but c's
    come from a, so the step ends without c, exactly as if ffn.7 did not exist, and c is not blamed:
    with an hour of delay on c's link, it ends before its deadline of 20 s."""
    a = node_factory("--experts", "ffn.[0:7]", "--hidden-dim", str(HIDDEN), name="a")
    with TcpProxy() as proxy:
        c = node_factory("--experts", "ffn.[7:8]", "--hidden-dim", str(HIDDEN), "--swarm", a.swarm[0],
                         "--announce-port", str(proxy.port), name="c")
        proxy.target = ("127.0.0.1", c.ready["port"])
        with Swarm(SwarmConfig(initial_peers=a.swarm, cache_ttl=60)) as swarm:
            torch.manual_seed(9)
            common = dict(prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2, k_min=2,
                          forward_timeout=20.0, timeout_after_k_min=20.0)
            plain = RemoteMoE(swarm, **common)
            hedged = RemoteMoE(swarm, **common, hedge=1)
            hedged.load_state_dict(plain.state_dict())
            try:
                wait_for(lambda: len(swarm.live_under(["ffn."], refresh=True)["ffn."]) == 8, 30,
                         "all experts")
                x = torch.randn(64, HIDDEN)
                with torch.no_grad():
                    assert bool((plain.gates[0](x).topk(2, dim=-1).indices == 7).any()), "needs tokens for c"
                    plain(x), hedged(x)  # warm: channels open
                    proxy.delay = 3.0
                    started = time.monotonic()
                    y_plain = plain(x)
                    waited = time.monotonic() - started
                    proxy.delay = 3600.0  # c's answer cannot come back while the test runs
                    started = time.monotonic()
                    y_hedged = hedged(x)
                    hedged_s = time.monotonic() - started
                assert waited >= 3.0 * 2 and plain.last_num_failed == 0  # request and reply both delayed
                torch.testing.assert_close(y_plain, local_moe(plain, x, set(UIDS)), rtol=1e-4, atol=1e-5)
                # a's answers only, not a failure of c's past the deadline: c's call was not needed, and
                # the step did not wait for it until its deadline (nor for c's answer, an hour away)
                assert hedged.last_num_failed == 0 and hedged_s < hedged.forward_timeout, hedged_s
                torch.testing.assert_close(y_hedged, local_moe(plain, x, set(UIDS) - {"ffn.7"}),
                                           rtol=1e-4, atol=1e-5)
                assert len(swarm.live_under(["ffn."])["ffn."]) == 8  # c was not banned for being unneeded
            finally:
                plain.dispatcher.close()
                hedged.dispatcher.close()


def test_a_forward_within_the_cache_lifetime_does_not_touch_the_dht(live_pair, monkeypatch):
    """The beam search's reads are cached for cache_ttl: a second forward reads nothing from the DHT,
    and once the records are stale the next forward reads its prefix once."""
    from dmoe.client import swarm as swarm_module

    swarm, _, _ = live_pair
    reads: list[list[str]] = []
    find = swarm_module.find_under_prefixes_async

    async def counted(node, keys, *args):
        reads.append(list(keys))
        return await find(node, keys, *args)

    layer = RemoteMoE(swarm, prefix="ffn", grid=(NUM_EXPERTS,), in_features=HIDDEN, k=2)
    try:
        x = torch.randn(6, HIDDEN)
        with torch.no_grad():
            layer(x)  # the fixture's lookup is fresh (cache_ttl 60 s): nothing to read
            monkeypatch.setattr(swarm_module, "find_under_prefixes_async", counted)
            first = layer(x)
            assert reads == [] and layer.last_num_failed == 0
            monkeypatch.setattr(swarm.config, "cache_ttl", 0.0)  # now every record is stale
            torch.testing.assert_close(layer(x), first)
            assert reads == [["ffn."]]
    finally:
        layer.dispatcher.close()
