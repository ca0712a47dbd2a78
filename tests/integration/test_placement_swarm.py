"""Placement by demand, end to end on 127.0.0.1: a coordinator publishes a model of 16 experts, and
three nodes started together with only ``--swarm`` (and a budget) pick what to host.

- every expert ends up hosted, no node hosts more than its budget, replicas within one of even;
- kill -9 of a node: the experts it held regain a replica on the survivors within a stated bound;
- skewed demand (a trainer's records saying two experts get most tokens): a small node that joins
  then picks the hot experts, with their trained state; they have more replicas than any cold one.
  (Moves for demand among running nodes: tests/unit/core/test_placement.py's swarms of planners, and
  benchmarks/bench_placement.py --real-swarm on processes.)

The tests run in order on one swarm (each says what it leaves for the next).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from swarm_fixtures import CoordinatorProcess, NodeProcess, expert_version, stub, wait_for

from dmoe.core.demand import DemandPublisher
from dmoe.core.dht import DHTPeer
from dmoe.core.records import find_experts, find_nodes
from dmoe.core.wire import serialize
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(240)

SPEC_TOML = """
name = "placed"
experts = ["p.[0:16]"]
hidden_dim = 8
inner_dim = 16
optimizer = "sgd"
lr = 0.01
"""
UIDS = [f"p.{i}" for i in range(16)]
BUDGET = 8
HEARTBEAT, RECORD_TTL, REBALANCE = 1.0, 4.0, 2.0
# after a kill -9, the dead node's records live up to RECORD_TTL; then a survivor's next check (every
# HEARTBEAT +-50%) covers what no node hosts, one state transfer per expert: the bound we hold it to
RECOVERY_BOUND = RECORD_TTL + 1.5 * HEARTBEAT + 15.0
HOT = {"p.3": 50_000.0, "p.12": 50_000.0}  # tokens/s; every other expert gets COLD
COLD = 20.0


def node_args() -> list[str]:
    return ["--max-experts", str(BUDGET), "--heartbeat-interval", str(HEARTBEAT),
            "--record-ttl", str(RECORD_TTL), "--rebalance-interval", str(REBALANCE),
            "--average-interval", "0",
            # equal throughputs: measured at the same moment on this busy machine, they differ up to 100x
            "--throughput", "20000"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("placement")
    (workdir / "spec.toml").write_text(SPEC_TOML)
    coordinator = CoordinatorProcess(workdir, ["--model", str(workdir / "spec.toml"), "--no-offer-relay"])
    nodes = [NodeProcess(workdir, ["--swarm", "PLACEHOLDER", *node_args()], name=f"node{i}")
             for i in range(3)]
    reader: DHTPeer | None = None
    try:
        coordinator.start()
        for node in nodes:
            node.args[1] = coordinator.swarm[0]
        reader = DHTPeer(initial_peers=coordinator.swarm, client_mode=True).start()
        wait_for(lambda: _spec_found(reader), 30, "the coordinator's spec")
        # started together: none sees the others' choices when it picks
        errors: list[BaseException] = []

        def start(node: NodeProcess) -> None:
            try:
                node.start()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        yield {"coordinator": coordinator, "nodes": nodes, "reader": reader, "workdir": workdir}
    finally:
        for node in nodes:
            node.cleanup()
        coordinator.cleanup()
        if reader is not None:
            reader.shutdown()


def _spec_found(reader: DHTPeer) -> bool:
    from dmoe.core.modelspec import find_specs

    return "placed" in find_specs(reader)


def hosting(reader: DHTPeer) -> dict[str, list[str]]:
    """node id -> the experts its live record lists."""
    return {node_id: list(record.experts) for node_id, record in find_nodes(reader).items()}


def counts(placement: dict[str, list[str]]) -> dict[str, int]:
    found = dict.fromkeys(UIDS, 0)
    for uids in placement.values():
        for uid in uids:
            found[uid] += 1
    return found


def settled(reader: DHTPeer, num_nodes: int, check) -> dict[str, list[str]] | None:
    placement = hosting(reader)
    return placement if len(placement) == num_nodes and check(placement) else None


def even(placement: dict[str, list[str]]) -> bool:
    """Every expert hosted, within one of even, and no move half-made (a move adds, announces, then
    withdraws the old expert: for a moment the node lists one more)."""
    found = counts(placement)
    return (min(found.values()) >= 1 and max(found.values()) - min(found.values()) <= 1
            and all(len(uids) == BUDGET for uids in placement.values()))


def test_nodes_started_with_only_the_swarm_cover_every_expert_evenly_within_budget(swarm):
    reader = swarm["reader"]
    for node in swarm["nodes"]:
        assert len(node.ready["experts"]) == BUDGET and set(node.ready["experts"]) <= set(UIDS)
    placement = wait_for(lambda: settled(reader, 3, even), 60, "every expert hosted, within one of even")
    assert all(len(uids) == len(set(uids)) <= BUDGET for uids in placement.values()), placement
    assert sum(map(len, placement.values())) == 3 * BUDGET
    # each node published the throughput it was given (one expert's share: that / 8)
    assert all(record.throughput == 20000.0 for record in find_nodes(reader).values())


def test_after_a_kill_9_the_survivors_cover_what_the_dead_node_held(swarm):
    reader = swarm["reader"]
    victim = swarm["nodes"][0]
    held = set(victim.ready["experts"]) | set(hosting(reader).get(victim.ready["node_id"], []))
    victim.kill()
    killed_at = time.monotonic()

    def covered_by_survivors(placement: dict[str, list[str]]) -> bool:
        """Every expert on a survivor, and no move half-made (a move adds, announces, then drops)."""
        return (victim.ready["node_id"] not in placement and min(counts(placement).values()) >= 1
                and all(len(uids) <= BUDGET for uids in placement.values()))

    placement = wait_for(lambda: settled(reader, 2, covered_by_survivors), RECOVERY_BOUND,
                         f"the survivors to cover the {len(held)} experts the dead node held")
    recovered = time.monotonic() - killed_at
    # 16 slots for 16 experts: exactly one replica each, no survivor over budget
    assert counts(placement) == dict.fromkeys(UIDS, 1), placement
    assert all(len(uids) == BUDGET for uids in placement.values())
    print(f"recovered {len(held)} experts in {recovered:.1f}s (bound {RECOVERY_BOUND:.1f}s)")


def train_everywhere(reader: DHTPeer, uid: str, steps: int) -> None:
    """``steps`` optimizer steps on every live replica of ``uid`` (Backward calls)."""
    for record in find_experts(reader, [uid])[uid]:
        channel, service = stub(record.endpoint)
        with channel:
            for _ in range(steps):
                x = torch.randn(4, 8)
                service.Backward(pb.BackwardRequest(uid=uid, inputs=[serialize(x)],
                                                    grad_outputs=[serialize(x)]), timeout=30)


def versions(reader: DHTPeer, uid: str) -> list[int]:
    """The version (optimizer steps) of each live replica of ``uid``, asked of its node."""
    found = []
    for record in find_experts(reader, [uid])[uid]:
        channel, service = stub(record.endpoint)
        with channel:
            found.append(expert_version(service, uid))
    return found


def test_a_node_joining_under_skewed_demand_takes_the_hot_experts(swarm):
    reader = swarm["reader"]
    for uid in HOT:  # trained: a replica added by a move must take this state, not start afresh
        train_everywhere(reader, uid, steps=3)
    started = time.monotonic()
    rates = np.array([HOT.get(uid, COLD) for uid in UIDS])
    publisher = DemandPublisher(reader, interval=1.0, time_constant=5.0)
    publisher.add("p", (16,), lambda: (rates * (time.monotonic() - started)).astype(np.int64))
    publisher.start()
    try:
        # a small volunteer (room for two experts): it must pick the two hot ones. (With room for eight,
        # a newcomer can copy the cold experts of the one survivor that already hosts both hot ones; the
        # other survivor, all its experts sole replicas, then has nothing it may drop for a hot one, and
        # no single move fixes that: the planner's known limit.)
        newcomer = NodeProcess(swarm["workdir"], ["--swarm", swarm["coordinator"].swarm[0], *node_args(),
                                                  "--max-experts", "2"], name="newcomer")
        swarm["nodes"].append(newcomer)
        # the newcomer reads the demand when it picks: it takes both hot experts
        wait_for(lambda: publisher.num_published >= 2, 30, "the demand to be published")
        newcomer.start()
        assert sorted(newcomer.ready["experts"]) == sorted(HOT), newcomer.ready["experts"]

        def hot_favoured(placement: dict[str, list[str]]) -> bool:
            found = counts(placement)
            return (min(found.values()) >= 1
                    and min(found[uid] for uid in HOT) > max(found[uid] for uid in UIDS if uid not in HOT))

        placement = wait_for(lambda: settled(reader, 3, hot_favoured), 60, "the hot experts to gain replicas")
        found = counts(placement)
        # 18 slots: the survivors' 16 (one replica each) and the newcomer's two hot ones
        assert [found[uid] for uid in HOT] == [2, 2], found
        assert all(found[uid] == 1 for uid in UIDS if uid not in HOT), found
        # every replica of a hot expert, the newcomer's too, holds trained state (taken, not started afresh)
        trained = {uid: versions(reader, uid) for uid in HOT}
        assert all(len(found) == 2 and min(found) >= 3 for found in trained.values()), trained
    finally:
        publisher.stop()
