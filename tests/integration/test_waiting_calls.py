"""What a peer's waiting calls may hold of a node. It serves at most ``max_state_exports`` state exports
(GetState) at once, each a copy of an expert's state: a caller that gives up on its call (its deadline) leaves
the export it started running, so its slot comes back only when that export ends, and a peer cancelling its
calls cannot run more at once. Info calls that wait for an optimizer step hold none of the worker threads
that decode the node's expert calls."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from swarm_fixtures import stub, wait_for

import dmoe.node.service as service
from dmoe.core.wire import serialize
from dmoe.node import Node, NodeConfig
from dmoe.proto import expert_pb2 as pb

pytestmark = pytest.mark.timeout(120)


class HeldExports:
    """The node's real export_state, held at its start until released; counts those running."""

    def __init__(self, export, failure: Exception | None = None):
        self.export, self.release, self.lock = export, threading.Event(), threading.Lock()
        self.running = self.most = 0
        self.failure = failure  # raised instead of exporting, once released (None: the real export)

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(60)
            if self.failure is not None:
                raise self.failure
            return self.export(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def get_state(service_stub, timeout: float) -> list[pb.StateChunk]:
    return list(service_stub.GetState(pb.GetStateRequest(uid="ffn.0"), timeout=timeout))


def test_calls_that_give_up_keep_their_export_slots_until_their_exports_end(monkeypatch):
    held = HeldExports(service.export_state)
    monkeypatch.setattr(service, "export_state", held)
    with Node(NodeConfig(experts=["ffn.0"], hidden_dim=16, device="cpu")) as node:
        channel, service_stub = stub(node.endpoint)
        try:
            for _ in range(2):  # the limit's worth of calls, each giving up while its export runs
                with pytest.raises(grpc.RpcError) as gave_up:
                    get_state(service_stub, timeout=0.5)
                assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: held.running == 2, 10, "both exports running")
            for _ in range(3):  # their exports still run: no slot is free
                with pytest.raises(grpc.RpcError) as refused:
                    get_state(service_stub, timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "2 state transfers in progress already" in refused.value.details()
            assert held.running == 2 and held.most == 2
            held.release.set()
            wait_for(lambda: held.running == 0, 10, "the exports' end")

            def served() -> list[pb.StateChunk] | None:  # the slots come back on the node's event loop
                try:
                    return get_state(service_stub, timeout=10)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return None

            chunks = wait_for(served, 10, "a GetState served once the exports ended")
            assert chunks[0].WhichOneof("part") == "header" and chunks[0].header.uid == "ffn.0"
            assert held.most == 2
        finally:
            held.release.set()  # (set already when the test got that far: a failure must not hold the node)
            channel.close()


def test_an_export_that_fails_after_its_caller_gave_up_is_logged_and_gives_its_slot_back(monkeypatch, caplog):
    held = HeldExports(service.export_state, failure=RuntimeError("the state could not be read"))
    monkeypatch.setattr(service, "export_state", held)
    with Node(NodeConfig(experts=["ffn.0"], hidden_dim=16, device="cpu")) as node:
        channel, service_stub = stub(node.endpoint)
        try:
            with pytest.raises(grpc.RpcError) as gave_up:
                get_state(service_stub, timeout=0.5)
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            held.release.set()
            wait_for(lambda: "the export of ffn.0's state for a call that ended failed: the state could not "
                     "be read" in caplog.text, 10, "the export's failure in the log")
            held.failure = None
            assert get_state(service_stub, timeout=10)[0].header.uid == "ffn.0"  # its slot is free again
        finally:
            held.release.set()
            channel.close()


def test_info_calls_waiting_for_a_step_leave_the_nodes_threads_to_its_expert_calls():
    """An Info waits (up to 10 s) for an answered Backward's optimizer step, so that the versions it reports
    count it. It waited on a worker thread of the pool that also decodes Forward and Backward calls, so a
    dozen Info calls during a step held every worker and a Forward waited for them (about 10 s)."""
    with Node(NodeConfig(experts=["ffn.0"], hidden_dim=16, device="cpu")) as node:
        channel, service_stub = stub(node.endpoint)
        backend = node.backends["ffn.0"]
        forward = pb.ForwardRequest(uid="ffn.0", inputs=[serialize(torch.randn(4, 16))])
        try:
            service_stub.Forward(forward, timeout=10)
            backend.settled.clear()  # as the runtime does from a Backward's answer to its step's end
            try:
                request = pb.InfoRequest(uids=["ffn.0"])
                waiting = [service_stub.Info.future(request, timeout=30) for _ in range(12)]
                wait_for(lambda: node.guard.calls_in_flight == 12, 10, "the Info calls to arrive and wait")
                assert not any(call.done() for call in waiting)
                started = time.monotonic()
                service_stub.Forward(forward, timeout=30)
                took = time.monotonic() - started
            finally:
                backend.settled.set()
            assert took < 2.0, f"a Forward took {took:.1f}s behind the Info calls"
            assert [call.result().experts[0].version for call in waiting] == [0] * 12
        finally:
            channel.close()
