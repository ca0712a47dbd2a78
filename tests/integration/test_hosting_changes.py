"""A node's change of what it hosts stands once made, whatever fails after it: a ready file that cannot be
written (its directory gone, a full disk) or a DHT store that fails is logged, and an expert let go is still
let go and one added still counted, so a move keeps the node within its budget."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from swarm_fixtures import wait_for

from dmoe.node import Node, NodeConfig

pytestmark = pytest.mark.timeout(120)


def test_a_ready_file_that_cannot_be_written_does_not_leave_a_change_half_made(tmp_path, caplog):
    """The ready file was written before the expert's let-go was started, so a failed write left the expert
    served but unannounced for good (never let go, and a free slot to the rebalancer), and an added expert
    hosted while its caller, told it failed, never dropped the one it replaced."""
    ready = tmp_path / "ready"
    ready.mkdir()
    config = NodeConfig(experts=["ffn.[0:2]"], hidden_dim=16, device="cpu",
                        ready_file=str(ready / "node.json"))
    with Node(config) as node:
        shutil.rmtree(ready)

        def run(coroutine):
            return asyncio.run_coroutine_threadsafe(coroutine, node._loop).result(30)

        run(node.remove_expert("ffn.1", grace=0.0))
        wait_for(lambda: "ffn.1" not in node.backends, 10, "ffn.1 to be let go")
        assert node.hosted == ["ffn.0"] and [r.uid for r in node.records()[0]] == ["ffn.0"]
        assert run(node.add_expert("ffn.5")) is True
        assert node.hosted == ["ffn.0", "ffn.5"]
        assert sorted(r.uid for r in node.records()[0]) == ["ffn.0", "ffn.5"]
        assert caplog.text.count("could not write the ready file") == 2
