import pytest
from click.testing import CliRunner

from dmoe.cli import main
from dmoe.config import load_config
from dmoe.errors import ConfigError
from dmoe.node.config import NodeConfig

pytestmark = pytest.mark.timeout(30)


def test_precedence_defaults_toml_env_cli(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('hidden_dim = 256\nlr = 0.01\nexperts = ["ffn.[0:2]"]\nbatching = false\nport = 5000\n')
    env = {"DMOE_NODE_LR": "0.02", "DMOE_NODE_PORT": "6000", "DMOE_NODE_SWARM": "/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2"}
    config = load_config(NodeConfig, toml_path=toml, environ=env, overrides={"port": 7000, "hidden_dim": None})
    assert config.hidden_dim == 256  # TOML over default
    assert config.lr == 0.02  # environment over TOML
    assert config.port == 7000  # command line over environment
    assert config.batching is False and config.uids == ["ffn.0", "ffn.1"]
    assert config.swarm == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    assert config.max_batch_tokens == 4096  # default


def test_mistakes_fail_loudly(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text("hiden_dim = 3\n")
    with pytest.raises(ConfigError, match="unknown option.*hiden_dim"):
        load_config(NodeConfig, toml_path=toml, environ={})
    with pytest.raises(ConfigError, match="DMOE_NODE_PORT"):
        load_config(NodeConfig, environ={"DMOE_NODE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="hidden_dim must be > 0"):
        NodeConfig(hidden_dim=0)
    with pytest.raises(ConfigError, match="record_ttl"):
        NodeConfig(heartbeat_interval=30, record_ttl=10)
    with pytest.raises(ConfigError, match="pattern"):
        NodeConfig(experts=["ffn.[2:1]"])
    with pytest.raises(TypeError):
        NodeConfig(hiden_dim=3)  # a misspelled keyword is an error, not ignored


def test_cli_help_lists_every_option():
    result = CliRunner().invoke(main, ["node", "start", "--help"])
    assert result.exit_code == 0
    for flag in ("--swarm", "--experts", "--expert-cls", "--hidden-dim", "--device", "--port", "--checkpoint-dir",
                 "--config", "--no-batching", "--max-queued-tokens", "DMOE_NODE_HIDDEN_DIM"):
        assert flag in result.output


def test_cli_rejects_bad_options_before_starting_anything():
    result = CliRunner().invoke(main, ["node", "start", "--experts", "ffn.[0:0]"])
    assert result.exit_code == 2 and "empty range" in result.output
    result = CliRunner().invoke(main, ["node", "start", "--optimizer", "lbfgs"])
    assert result.exit_code == 2 and "adam or sgd" in result.output
    result = CliRunner().invoke(main, ["swarm", "status"])
    assert result.exit_code == 2 and "no swarm address" in result.output
    result = CliRunner().invoke(main, ["coordinator", "start", "--http-port", "70000"])
    assert result.exit_code == 2 and "http_port must be in 0..65535" in result.output
    result = CliRunner().invoke(main, ["node", "start", "--dht-announce", "/ip4/203.0.113.7/tcp/0"])
    assert result.exit_code == 2 and "not an address to announce" in result.output
    result = CliRunner().invoke(main, ["coordinator", "start", "--poll-interval", "0"])
    assert result.exit_code == 2 and "poll_interval must be > 0" in result.output


def test_coordinator_and_status_help_list_their_options():
    result = CliRunner().invoke(main, ["coordinator", "start", "--help"])
    assert result.exit_code == 0
    for flag in ("--identity", "--dht-port", "--http-host", "--http-port", "--poll-interval", "--history",
                 "DMOE_COORDINATOR_HTTP_PORT"):
        assert flag in result.output
    result = CliRunner().invoke(main, ["swarm", "status", "--help"])
    assert result.exit_code == 0
    for flag in ("--swarm", "--json", "--experts", "--wait-nodes", "--timeout", "DMOE_STATUS_SWARM"):
        assert flag in result.output
