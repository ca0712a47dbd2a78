"""Node lifecycle: DHT records, SIGTERM and kill -9, checkpoints, restart, concurrent learning."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
from swarm_fixtures import dht_get, expert_version, stub, wait_for

from dmoe.core.experts import create_expert
from dmoe.core.records import find_experts, find_nodes, find_under_prefixes
from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb

HIDDEN = 16
pytestmark = pytest.mark.timeout(180)
PROBE = torch.linspace(-2, 2, 5 * HIDDEN).reshape(5, HIDDEN)


def probe_output(service, uid: str) -> torch.Tensor:
    reply = service.Forward(pb.ForwardRequest(uid=uid, inputs=[serialize(PROBE)]), timeout=30)
    return deserialize(reply.outputs[0], max_numel=1 << 20)


def train_steps(service, uid: str, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(step))
        service.Backward(pb.BackwardRequest(uid=uid, inputs=[serialize(x)], grad_outputs=[serialize(x)]),
                         timeout=30)


def test_records_appear_and_go_away_after_sigterm(node_factory, dht_factory, tmp_path):
    node = node_factory("--experts", "ffn.[0:2].[0:2]", "--hidden-dim", str(HIDDEN),
                        "--checkpoint-dir", str(tmp_path / "ckpt"))
    dht = dht_factory(node.swarm)
    uids = ["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.1.1"]
    records = wait_for(lambda: len(r := find_experts(dht, uids)) == 4 and r, 30, "expert records")
    assert {r.endpoint for replicas in records.values() for r in replicas} == {node.endpoint}
    assert {r.node_id for replicas in records.values() for r in replicas} == {node.ready["node_id"]}
    assert set(find_under_prefixes(dht, ["ffn.1."])["ffn.1."]) == {0, 1}
    nodes = find_nodes(dht)
    assert set(nodes) == {node.ready["node_id"]}
    record = nodes[node.ready["node_id"]]
    assert sorted(record.experts) == uids and record.hardware.device == "cpu"
    assert record.hardware.num_cpus >= 1 and set(record.load) == set(uids)

    _, service = stub(node.endpoint)
    train_steps(service, "ffn.0.0", 2)
    trained = probe_output(service, "ffn.0.0")

    assert node.terminate() == 0
    assert "checkpoint written" in node.log() and "could not withdraw" not in node.log()
    # withdrawn, well before the records' 30 s TTL (a read may still meet a replica for a moment)
    wait_for(lambda: find_experts(dht, uids) == {} and find_nodes(dht) == {}, 10, "the records withdrawn")
    saved = sorted((tmp_path / "ckpt" / "ffn.0.0").glob("*.safetensors"))
    assert [p.name for p in saved] == ["000000000002.safetensors"]

    swarm = dht.visible_maddrs
    restarted = node_factory("--experts", "ffn.[0:2].[0:2]", "--hidden-dim", str(HIDDEN),
                             "--checkpoint-dir", str(tmp_path / "ckpt"), "--swarm", swarm[0],
                             name="restarted")
    _, service = stub(restarted.endpoint)
    assert expert_version(service, "ffn.0.0") == 2
    torch.testing.assert_close(probe_output(service, "ffn.0.0"), trained, rtol=0, atol=0)
    assert wait_for(lambda: len(find_experts(dht, uids)) == 4, 30, "records of the restarted node")


def test_kill_9_resumes_from_last_checkpoint_and_records_expire(node_factory, dht_factory, tmp_path):
    args = ["--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--checkpoint-interval", "0.3", "--keep-checkpoints", "2", "--heartbeat-interval", "1",
            "--record-ttl", "3"]
    node = node_factory(*args)
    dht = dht_factory(node.swarm)
    _, service = stub(node.endpoint)
    train_steps(service, "ffn.0", 4)
    trained = probe_output(service, "ffn.0")
    ckpt_dir = tmp_path / "ckpt" / "ffn.0"
    wait_for(lambda: (ckpt_dir / "000000000004.safetensors").exists(), 30, "the periodic checkpoint")
    assert wait_for(lambda: find_experts(dht, ["ffn.0"]), 10, "the record")

    node.kill()
    # the killed node cannot withdraw its records: they lapse after their TTL
    wait_for(lambda: not find_experts(dht, ["ffn.0"]), 20, "the record to expire", interval=0.5)
    files = sorted(p.name for p in ckpt_dir.iterdir())
    assert files[-1] == "000000000004.safetensors" and len(files) <= 2  # old ones pruned, no temp files

    restarted = node_factory(*args, name="restarted")
    _, service = stub(restarted.endpoint)
    assert expert_version(service, "ffn.0") == 4
    torch.testing.assert_close(probe_output(service, "ffn.0"), trained, rtol=0, atol=0)
    train_steps(service, "ffn.0", 1)  # the optimizer state came back too: training goes on
    assert expert_version(service, "ffn.0") == 5


def test_concurrent_backward_calls_all_count(node_factory):
    """16 concurrent backward calls into a linear expert with SGD: the update equals the sum of all
    16 gradients, however the node batched them."""
    lr = 0.01
    node = node_factory("--experts", "lin.[0:1]", "--expert-cls", "experts_for_tests:LinearExpert",
                        "--hidden-dim", str(HIDDEN), "--optimizer", "sgd", "--lr", str(lr),
                        "--max-grad-norm", "0")
    _, service = stub(node.endpoint)
    from experts_for_tests import LinearExpert

    local, _ = create_expert("experts_for_tests:LinearExpert", uid="lin.0", hidden_dim=HIDDEN)
    assert isinstance(local, LinearExpert)
    inputs = [torch.randn(4, HIDDEN) for _ in range(16)]
    grads = [torch.randn(4, HIDDEN) for _ in range(16)]

    def call(i: int):
        return service.Backward(pb.BackwardRequest(uid="lin.0", inputs=[serialize(inputs[i])],
                                                   grad_outputs=[serialize(grads[i])]), timeout=60)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(16)))

    x, g = torch.cat(inputs), torch.cat(grads)
    with torch.no_grad():
        local.linear.weight -= lr * g.T @ x
        local.linear.bias -= lr * g.sum(0)
        expected = local(PROBE)
    torch.testing.assert_close(probe_output(service, "lin.0"), expected, rtol=1e-4, atol=1e-5)
    stats = service.Info(pb.InfoRequest(), timeout=10).experts[0].stats
    assert stats.backward_calls == 16 and stats.backward_tokens == 64
    assert stats.optimizer_steps in range(1, 17)  # one step per merged batch


def test_sigterm_finishes_in_flight_calls(node_factory, tmp_path, monkeypatch):
    marker = tmp_path / "started"
    monkeypatch.setenv("DMOE_TEST_STARTED", str(marker))
    node = node_factory("--experts", "slow.[0:1]", "--expert-cls", "experts_for_tests:SlowExpert",
                        "--hidden-dim", str(HIDDEN))
    _, service = stub(node.endpoint)
    x = torch.randn(3, HIDDEN)
    call = service.Forward.future(pb.ForwardRequest(uid="slow.0", inputs=[serialize(x)]), timeout=30)
    wait_for(marker.exists, 20, "the call to reach the expert")
    assert node.terminate() == 0
    torch.testing.assert_close(deserialize(call.result().outputs[0], max_numel=1 << 20), x)


def test_sigterm_to_the_whole_process_group_still_stops_cleanly(node_factory, tmp_path):
    """systemd (KillMode=control-group) signals every process of the service, the libp2p daemon
    included: the node cannot withdraw its records then, but still exits 0 with its checkpoint written."""
    node = node_factory("--experts", "ffn.[0:1]", "--hidden-dim", str(HIDDEN),
                        "--checkpoint-dir", str(tmp_path / "c"))
    _, service = stub(node.endpoint)
    train_steps(service, "ffn.0", 1)
    started = time.monotonic()
    assert node.terminate_group(timeout=30) == 0
    assert time.monotonic() - started < 25  # no wait on the dead daemon (its DHT stop would take 30 s)
    assert (tmp_path / "c" / "ffn.0" / "000000000001.safetensors").exists()


def test_a_node_of_1024_experts_keeps_beating_and_withdraws(node_factory, dht_factory):
    """A heartbeat of 1,024 experts (~3,000 DHT entries, far over 16 KiB) is stored again and again,
    the grid prefixes list every expert, and a graceful stop withdraws them all."""
    node = node_factory("--experts", "ffn.[0:32].[0:32]", "--hidden-dim", "4", "--inner-dim", "4",
                        "--heartbeat-interval", "1", "--record-ttl", "20")
    dht = dht_factory(node.swarm)
    sample = ["ffn.0.0", "ffn.17.5", "ffn.31.31"]

    def expiration() -> float | None:
        entry = dht_get(dht, "ffn.17.5")
        return None if entry is None else entry.expiration_time

    first = wait_for(expiration, 30, "the first beat")
    second = wait_for(lambda: (e := expiration()) is not None and e > first and e, 30, "a second beat")
    wait_for(lambda: (e := expiration()) is not None and e > second, 30, "a third beat")
    assert node.proc.poll() is None
    found = find_under_prefixes(dht, ["ffn.", "ffn.0.", "ffn.13.", "ffn.31."])
    assert all(set(by_coordinate) == set(range(32)) for by_coordinate in found.values())
    assert set(find_experts(dht, sample)) == set(sample)
    assert node.terminate() == 0
    assert "could not withdraw" not in node.log()
    wait_for(lambda: find_experts(dht, sample) == {}, 10, "the records withdrawn")  # before their 20 s TTL
