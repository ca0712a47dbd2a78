"""Every command reads its swarm key from ``DMOE_<COMMAND>_SWARM_KEY`` as from --swarm-key (the
documented sources: option, TOML file, environment), and a key file others can read is warned about."""

from __future__ import annotations

import logging

import pytest

from coordinator.config import CoordinatorConfig
from dmoe.config import load_config
from dmoe.core.auth import SwarmKey
from dmoe.lm.config import InferConfig, TrainConfig
from dmoe.node.config import NodeConfig
from dmoe.view.config import StatusConfig

pytestmark = pytest.mark.timeout(30)
PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQA8q1xgwxW5p2q2aKpPj2oWCzUNrYNwAAAAAAAAAAAAA"


def swarm_key_of(config) -> str | None:
    return config.swarm_key if hasattr(config, "swarm_key") else config.swarm.swarm_key


@pytest.mark.parametrize("cls,command,needed", [
    (NodeConfig, "NODE", {}),
    (CoordinatorConfig, "COORDINATOR", {}),
    (TrainConfig, "TRAIN", {"DMOE_TRAIN_SWARM": PEER}),
    (InferConfig, "INFER", {"DMOE_INFER_CHECKPOINT": "run"}),
    (StatusConfig, "STATUS", {"DMOE_STATUS_SWARM": PEER}),
])
def test_each_command_takes_its_swarm_key_from_its_environment_variable(cls, command, needed, tmp_path):
    path = str(tmp_path / "swarm.key")
    assert swarm_key_of(load_config(cls, environ=needed)) is None  # an open swarm unless told
    assert swarm_key_of(load_config(cls, environ={**needed, f"DMOE_{command}_SWARM_KEY": path})) == path
    # another command's variable is not this one's
    other = "NODE" if command != "NODE" else "TRAIN"
    assert swarm_key_of(load_config(cls, environ={**needed, f"DMOE_{other}_SWARM_KEY": path})) is None
    # the option given on the command line wins over the environment
    given = str(tmp_path / "given.key")
    config = load_config(cls, environ={**needed, f"DMOE_{command}_SWARM_KEY": path},
                         overrides={"swarm_key": given})
    assert swarm_key_of(config) == given


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "swarm.key"
    key = SwarmKey.generate(path)
    with caplog.at_level(logging.WARNING, logger="dmoe.core.auth"):
        assert SwarmKey.load(path).fingerprint == key.fingerprint
    assert not caplog.records  # written 600 by keygen: nothing to say
    for mode in (0o640, 0o604):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dmoe.core.auth"):
            SwarmKey.load(path)
        assert [r.getMessage() for r in caplog.records] == [
            f"swarm key {path} is readable by other users of this machine: chmod 600 it"]


def test_a_node_whose_swarm_key_cannot_be_read_fails_to_start_with_one_line(tmp_path):
    """The key is read as the node is built, before it starts: a missing file is the same one-line error
    as any other start-up failure, not a traceback."""
    from click.testing import CliRunner

    from dmoe.cli import main

    missing = tmp_path / "none.key"
    result = CliRunner().invoke(main, ["node", "start", "--experts", "ffn.[0:1]", "--device", "cpu",
                                       "--swarm-key", str(missing)])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: node failed to start: cannot read the swarm key")
    assert "Traceback" not in result.output
