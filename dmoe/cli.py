"""The ``dmoe`` command. Entry point: logging set-up and event loops start here, not in the library."""

from __future__ import annotations

import logging
import os
import sys

import click

from dmoe.config import click_options, load_config
from dmoe.coordinator.config import CoordinatorConfig
from dmoe.errors import ConfigError, DmoeError
from dmoe.node.config import NodeConfig


def _setup_logging() -> None:
    level = os.environ.get("DMOE_LOGLEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dmoe")
def main() -> None:
    """dmoe: a decentralized Mixture-of-Experts over volunteer machines."""
    _setup_logging()


@main.group()
def node() -> None:
    """Host experts for a swarm."""


def _config(cls: type, config_path: str | None, values: dict):
    try:
        return load_config(cls, toml_path=config_path, overrides=values)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None




@node.command("start")
@click_options(NodeConfig)
def node_start(config_path: str | None, **values) -> None:
    """Start a node: serve experts over gRPC and announce them in the swarm until SIGINT/SIGTERM."""
    config = _config(NodeConfig, config_path, values)
    from dmoe.node.node import Node

    def on_ready(n: Node) -> None:
        click.echo(f"node {n.node_id} serving {len(n.uids)} experts ({', '.join(config.experts)}) at {n.endpoint}")
        for address in n.swarm_addresses:
            click.echo(f"swarm address: {address}")
        if not config.swarm:
            click.echo(f"others join with: --swarm {n.swarm_addresses[0]}")

    try:
        Node(config).run(on_ready=on_ready)
    except (DmoeError, ValueError, OSError) as e:
        raise click.ClickException(f"node failed to start: {e}") from None


@main.group()
def coordinator() -> None:
    """Run the swarm's bootstrap peer."""


@coordinator.command("start")
@click_options(CoordinatorConfig)
def coordinator_start(config_path: str | None, **values) -> None:
    """Start a bootstrap DHT peer and print the swarm address to hand out; runs until SIGINT/SIGTERM."""
    config = _config(CoordinatorConfig, config_path, values)
    from dmoe.coordinator.bootstrap import Coordinator

    coord = Coordinator(config)
    try:
        coord.start()
    except (ValueError, OSError) as e:
        raise click.ClickException(f"coordinator failed to start: {e}") from None
    for address in coord.swarm_addresses:
        click.echo(f"swarm address: {address}")
    click.echo(f"nodes join with: dmoe node start --swarm {coord.swarm_addresses[0]} --experts 'ffn.[0:8]'")
    coord.run()
