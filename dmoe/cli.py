"""The ``dmoe`` command. Entry point: logging set-up and event loops start here, not in the library."""

from __future__ import annotations

import logging
import os
import sys

import click

from dmoe.config import click_options, load_config
from dmoe.errors import ConfigError, DmoeError


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


from dmoe.node.config import NodeConfig  # noqa: E402  (kept next to the command that uses it)


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
