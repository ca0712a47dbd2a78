import dataclasses
from typing import ClassVar

import click
import pytest
from click.testing import CliRunner

from dmoe.cli import main
from dmoe.client.config import SwarmConfig
from dmoe.config import click_options, load_config, nested, option
from dmoe.coordinator.config import CoordinatorConfig
from dmoe.errors import ConfigError
from dmoe.lm.config import InferConfig, TrainConfig
from dmoe.node.config import NodeConfig
from dmoe.view.config import StatusConfig

pytestmark = pytest.mark.timeout(30)

A, B, C = "/ip4/127.0.0.1/tcp/1/p2p/a", "/ip4/127.0.0.1/tcp/2/p2p/b", "/ip4/127.0.0.1/tcp/3/p2p/c"


def test_precedence_defaults_toml_env_cli(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('hidden_dim = 256\nlr = 0.01\nexperts = ["ffn.[0:2]"]\nbatching = false\nport = 5000\n')
    env = {"DMOE_NODE_LR": "0.02", "DMOE_NODE_PORT": "6000",
           "DMOE_NODE_SWARM": "/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2"}
    config = load_config(NodeConfig, toml_path=toml, environ=env,
                         overrides={"port": 7000, "hidden_dim": None})
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


# ---- a nested SwarmConfig ------------------------------------------------------------------------------

def test_toml_env_and_cli_reach_the_nested_swarm_config_in_that_order(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text(f'swarm = ["{A}"]\nswarm_key = "toml.key"\nhost = "10.0.0.1"\nlookup_timeout = 2.0\n'
                    "steps = 7\n")
    env = {"DMOE_TRAIN_HOST": "10.0.0.2", "DMOE_TRAIN_LOOKUP_TIMEOUT": "3", "DMOE_TRAIN_LR": "0.5"}
    overrides = {"lookup_timeout": 4.0, "swarm": (), "swarm_key": None, "lr": None}  # () and None: unset
    config = load_config(TrainConfig, toml_path=toml, environ=env, overrides=overrides)
    assert isinstance(config.swarm, SwarmConfig)
    assert config.swarm.initial_peers == [A]  # TOML (the command line gave none)
    assert config.swarm.swarm_key == "toml.key"  # TOML
    assert config.swarm.host == "10.0.0.2"  # environment over TOML
    assert config.swarm.lookup_timeout == 4.0  # command line over environment over TOML
    assert config.swarm.cache_ttl == SwarmConfig().cache_ttl  # not exposed: the default
    assert config.steps == 7 and config.lr == 0.5  # the outer fields as before

    config = load_config(TrainConfig, environ={"DMOE_TRAIN_SWARM": f"{A},{B}"}, overrides={"swarm": (C,)})
    assert config.swarm.initial_peers == [C]  # a repeated option replaces the environment's list
    config = load_config(TrainConfig, environ={"DMOE_TRAIN_SWARM": f"{A},{B}"})
    assert config.swarm.initial_peers == [A, B]


def test_a_swarm_table_in_toml_sets_any_swarm_config_field(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text(f'[swarm]\ninitial_peers = ["{A}"]\ncache_ttl = 0.5\nban_max = 9.0\n'
                    'event_loop = "asyncio"\n')
    config = load_config(TrainConfig, toml_path=toml, environ={"DMOE_TRAIN_LOOKUP_TIMEOUT": "1.5"})
    assert config.swarm == SwarmConfig(initial_peers=[A], cache_ttl=0.5, ban_max=9.0, event_loop="asyncio",
                                       lookup_timeout=1.5)
    toml.write_text(f'[swarm]\ninitial_peers = ["{A}"]\n')
    config = load_config(InferConfig, toml_path=toml, environ={}, overrides={"checkpoint": "run"})
    assert config.swarm.initial_peers == [A]


def test_unknown_or_unexposed_nested_keys_fail(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text(f'swarm = ["{A}"]\n[swarm_typo]\nx = 1\n')
    with pytest.raises(ConfigError, match="unknown option.*swarm_typo"):
        load_config(TrainConfig, toml_path=toml, environ={})
    toml.write_text(f'[swarm]\ninitial_peers = ["{A}"]\ncache_tl = 1.0\n')
    with pytest.raises(ConfigError, match=r"unknown option\(s\) swarm\.cache_tl"):
        load_config(TrainConfig, toml_path=toml, environ={})
    toml.write_text(f'swarm = ["{A}"]\ncache_ttl = 1.0\n')  # a SwarmConfig field train does not expose
    with pytest.raises(ConfigError, match="unknown option.*cache_ttl"):
        load_config(TrainConfig, toml_path=toml, environ={})
    with pytest.raises(ConfigError, match="unknown option 'initial_peers'"):  # the option is --swarm
        load_config(TrainConfig, environ={}, overrides={"initial_peers": (A,)})
    toml.write_text(f'[swarm]\ninitial_peers = ["{A}"]\ncache_ttl = 1.0\n')  # status takes no table
    with pytest.raises(ConfigError, match="swarm: expected a list"):
        load_config(StatusConfig, toml_path=toml, environ={})
    toml.write_text(f'host = "10.0.0.1"\n[swarm]\ninitial_peers = ["{A}"]\nhost = "10.0.0.2"\n')
    with pytest.raises(ConfigError, match="host and swarm.host set the same option"):
        load_config(TrainConfig, toml_path=toml, environ={})
    with pytest.raises(ConfigError, match="DMOE_TRAIN_LOOKUP_TIMEOUT: expected float"):
        load_config(TrainConfig, environ={"DMOE_TRAIN_LOOKUP_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="lookup_timeout > 0"):  # SwarmConfig's own check
        load_config(TrainConfig, environ={}, overrides={"swarm": (A,), "lookup_timeout": 0.0})


def test_the_command_line_reaches_the_nested_swarm_config(tmp_path):
    seen = []

    @click.command()
    @click_options(TrainConfig)
    def command(config_path, **values):
        seen.append(load_config(TrainConfig, toml_path=config_path, environ={}, overrides=values))

    result = CliRunner().invoke(command, ["--swarm", A, "--swarm", B, "--swarm-key", "f.key",
                                          "--host", "0.0.0.0", "--lookup-timeout", "5", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert seen[0].swarm == SwarmConfig(initial_peers=[A, B], swarm_key="f.key", host="0.0.0.0",
                                        lookup_timeout=5.0)
    assert seen[0].steps == 3
    result = CliRunner().invoke(command, ["--cache-ttl", "1"])  # not exposed by train
    assert result.exit_code == 2 and "No such option '--cache-ttl'" in result.output


def _help(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # click wraps lines: compare the words


def _swarm_help(name: str) -> str:
    (declared,) = [f for f in dataclasses.fields(SwarmConfig) if f.name == name]
    return declared.metadata["help"]


@pytest.mark.parametrize("command, prefix, flags", [
    (("train",), "DMOE_TRAIN_", ("--swarm", "--swarm-key", "--host", "--lookup-timeout")),
    (("infer",), "DMOE_INFER_", ("--swarm", "--swarm-key", "--host")),
    (("swarm", "status"), "DMOE_STATUS_", ("--swarm", "--swarm-key", "--host")),
    (("coordinator", "start"), "DMOE_COORDINATOR_", ("--swarm", "--swarm-key", "--host")),
])
def test_swarm_options_take_their_help_from_swarm_config(command, prefix, flags):
    text = _help(*command)
    fields = {"--swarm": "initial_peers", "--swarm-key": "swarm_key", "--host": "host",
              "--lookup-timeout": "lookup_timeout"}
    for flag in flags:
        help_text = " ".join(_swarm_help(fields[flag]).split())
        env = prefix + flag[2:].replace("-", "_").upper()
        assert f"{flag} TEXT {help_text}" in text or f"{flag} FLOAT {help_text}" in text, flag
        assert env in text
    assert "--initial-peers" not in text and "--cache-ttl" not in text and "--ban-max" not in text


def test_swarm_peers_are_required_only_where_a_swarm_is_joined():
    assert SwarmConfig().initial_peers == []  # a coordinator starts a swarm: no peers is a valid config
    with pytest.raises(ConfigError, match="^no swarm address: give the address a coordinator or node "
                                          "printed$"):
        SwarmConfig().require_peers()
    SwarmConfig(initial_peers=[A]).require_peers()
    assert CoordinatorConfig().swarm.initial_peers == []
    assert TrainConfig(local=True).swarm.initial_peers == []
    assert TrainConfig(ffn="dense").swarm.initial_peers == []
    with pytest.raises(ConfigError, match=r"no swarm address: give --swarm ADDR \(printed by a "
                                          r"coordinator or node\), or --local"):
        TrainConfig()
    with pytest.raises(ConfigError, match="--run-id averages with other trainers over a swarm"):
        TrainConfig(local=True, run_id="r")
    with pytest.raises(ConfigError, match="no swarm address: give --swarm with the address"):
        StatusConfig()
    assert InferConfig(checkpoint="run").swarm.initial_peers == []  # a --local model needs no swarm
    with pytest.raises(ConfigError, match=r"swarm must be a SwarmConfig, got \['/ip4"):
        TrainConfig(swarm=[A])  # the old flat field: refused, not half-used


def test_the_outer_config_declares_which_nested_fields_it_exposes():
    @dataclasses.dataclass(kw_only=True, slots=True)
    class Bad:
        ENV_PREFIX: ClassVar[str] = "DMOE_BAD_"
        swarm: SwarmConfig = nested(SwarmConfig, {"swarm": "initial_peer"})

    with pytest.raises(TypeError, match="SwarmConfig has no option field 'initial_peer'"):
        click_options(Bad)

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Twice:
        ENV_PREFIX: ClassVar[str] = "DMOE_TWICE_"
        host: str = option("h", "a host")
        swarm: SwarmConfig = nested(SwarmConfig, {"host": "host"})

    with pytest.raises(TypeError, match="option 'host' declared twice"):
        load_config(Twice, environ={})


# ---- the commands ---------------------------------------------------------------------------------------

def test_cli_help_lists_every_option():
    result = CliRunner().invoke(main, ["node", "start", "--help"])
    assert result.exit_code == 0
    for flag in ("--swarm", "--experts", "--expert-cls", "--hidden-dim", "--device", "--port",
                 "--checkpoint-dir", "--config", "--no-batching", "--max-queued-tokens",
                 "DMOE_NODE_HIDDEN_DIM"):
        assert flag in result.output


def test_cli_rejects_bad_options_before_starting_anything():
    result = CliRunner().invoke(main, ["node", "start", "--experts", "ffn.[0:0]"])
    assert result.exit_code == 2 and "empty range" in result.output
    result = CliRunner().invoke(main, ["node", "start", "--optimizer", "lbfgs"])
    assert result.exit_code == 2 and "adam or sgd" in result.output
    result = CliRunner().invoke(main, ["swarm", "status"])
    assert result.exit_code == 2 and "no swarm address" in result.output
    result = CliRunner().invoke(main, ["train", "--steps", "1"])
    assert result.exit_code == 2 and "no swarm address: give --swarm ADDR" in result.output
    result = CliRunner().invoke(main, ["train", "--swarm", A, "--lookup-timeout", "0"])
    assert result.exit_code == 2 and "lookup_timeout > 0" in result.output
    result = CliRunner().invoke(main, ["coordinator", "start", "--http-port", "70000"])
    assert result.exit_code == 2 and "http_port must be in 0..65535" in result.output
    result = CliRunner().invoke(main, ["coordinator", "start", "--history", "1"])
    assert result.exit_code == 2 and "history must be at least 2" in result.output
    # checked before the history: --host reached swarm.host, which the relay listens on
    result = CliRunner().invoke(main, ["coordinator", "start", "--host", "0.0.0.0", "--history", "1"])
    assert result.exit_code == 2 and "relay listening on 0.0.0.0 needs --relay-announce-host" in result.output
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
