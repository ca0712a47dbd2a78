"""A node's shutdown runs every step even when one fails (README, "SIGINT/SIGTERM"): a last checkpoint that
cannot be written is logged and reported (the CLI exits 1 saying which step failed), and the DHT peer and
its daemon are still stopped; the experts whose checkpoints can be written are."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmoe.core.checkpoint import CheckpointStore
from dmoe.node import Node, NodeConfig

pytestmark = pytest.mark.timeout(120)
HIDDEN = 16
FAILED = "last checkpoint: could not checkpoint 1 of 2 experts (ffn.0)"


def checkpoint_dir(tmp_path: Path) -> Path:
    """A checkpoint directory where ffn.0's place is taken by a file: its checkpoints cannot be written."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "ffn.0").write_text("a file where ffn.0's checkpoints go")
    return directory


def written(directory: Path, uid: str) -> bool:
    return CheckpointStore(directory, keep=1, writer=False).load_latest(uid) is not None


def test_a_failed_last_checkpoint_still_stops_the_dht_and_writes_the_other_experts(tmp_path):
    """Without each step guarded, the checkpoint's error ended the shutdown before the DHT peer was stopped:
    its libp2p daemon outlived ``shutdown()``."""
    directory = checkpoint_dir(tmp_path)
    config = NodeConfig(experts=["ffn.[0:2]"], hidden_dim=HIDDEN, device="cpu", checkpoint_dir=str(directory))
    node = Node(config)
    node.start()
    dht = node._dht
    try:
        assert dht is not None and dht.daemon_alive
    finally:
        node.shutdown()
    try:
        assert node._thread is not None and not node._thread.is_alive()
        assert node._dht is None and not dht.daemon_alive
        assert node.shutdown_errors == [FAILED]
        assert written(directory, "ffn.1") and not written(directory, "ffn.0")
    finally:
        if node._dht is not None:  # left running by a shutdown that stopped half-way
            node._dht.shutdown()


def test_the_cli_exits_1_naming_the_shutdown_step_that_failed(node_factory, tmp_path):
    directory = checkpoint_dir(tmp_path)
    node = node_factory("--experts", "ffn.[0:2]", "--hidden-dim", str(HIDDEN),
                        "--checkpoint-dir", str(directory))
    assert node.terminate() == 1
    log = node.log()
    assert f"node stopped, but these steps failed: {FAILED}" in log and "could not checkpoint ffn.0" in log
    assert "DHT shutdown" not in log
    assert written(directory, "ffn.1")
