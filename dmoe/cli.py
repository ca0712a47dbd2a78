"""The ``dmoe`` command: one click command per component, its options made from that component's config
dataclass (:mod:`dmoe.config`), so a bad option fails before anything starts.

Logging is set up here; the library only logs. Torch and hivemind are imported inside the commands
that need them, so ``dmoe --help`` starts without either. Event loops belong to the objects that run
them: ``Node.run`` serves on uvloop in the calling thread, and a DHT peer (a ``Swarm``'s, a
``Coordinator``'s) runs its loop on a thread of its own; the commands start and stop those objects.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from dmoe.config import click_options, given_fields, load_config
from dmoe.coordinator.config import CoordinatorConfig
from dmoe.errors import ConfigError, DmoeError
from dmoe.lm.config import InferConfig, TrainConfig
from dmoe.node.config import NodeConfig
from dmoe.view.config import StatusConfig


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
    # With gRPC's fork support on, a process that also relays (dmoe.relay.server) lost relayed connections
    # that nothing closed (gRPC has reports of it closing reused descriptors after forks). gRPC
    # reads this when it starts (the first channel or server), which is after this.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")


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
    given = given_fields(NodeConfig, toml_path=config_path, overrides=values)
    from dmoe.node.node import Node

    def on_ready(n: Node) -> None:
        model = f" of model {n.model.name!r}" if n.model is not None else ""
        click.echo(f"node {n.node_id} serving {len(n.uids)} experts{model} ({', '.join(n.config.experts)}) "
                   f"at {n.endpoint}")
        if not n.reachable:
            click.echo(f"not reachable from the swarm: clients call it through relay {n.relay_endpoint}")
        for address in n.swarm_addresses:
            click.echo(f"swarm address: {address}")
        if not config.swarm:
            click.echo(f"others join with: --swarm {n.join_address}")

    try:
        node = Node(config, given=given)
        node.run(on_ready=on_ready)
    except (DmoeError, ValueError, OSError) as e:
        raise click.ClickException(f"node failed to start: {e}") from None
    if node.shutdown_errors:
        raise click.ClickException(f"node stopped, but these steps failed: {'; '.join(node.shutdown_errors)}")


@main.group()
def coordinator() -> None:
    """Run the swarm's bootstrap peer."""


@coordinator.command("start")
@click_options(CoordinatorConfig)
def coordinator_start(config_path: str | None, **values) -> None:
    """Start a bootstrap DHT peer and print the swarm address to hand out; runs until SIGINT/SIGTERM.
    Without --swarm it starts a new swarm; with it, it joins that one."""
    config = _config(CoordinatorConfig, config_path, values)
    from dmoe.coordinator.bootstrap import Coordinator

    coord = Coordinator(config)
    try:
        coord.start()
    except (ValueError, OSError) as e:
        raise click.ClickException(f"coordinator failed to start: {e}") from None
    for address in coord.swarm_addresses:
        click.echo(f"swarm address: {address}")
    if coord.spec_publisher is not None:
        click.echo(f"nodes join with: dmoe node start --swarm {coord.join_address} "
                   f"--model {coord.spec_publisher.spec.name}")
    else:
        click.echo(f"nodes join with: dmoe node start --swarm {coord.join_address} --experts 'ffn.[0:8]'")
    if coord.relay is not None:
        click.echo(f"relay for nodes behind a NAT: {coord.relay.address}")
    click.echo(f"dashboard: {coord.dashboard_url}  (JSON: {coord.dashboard_url}api/swarm, "
               f"Prometheus: {coord.dashboard_url}metrics)")
    coord.run()


@main.group()
def swarm() -> None:
    """Look at a swarm, or make the key of a private one."""


@swarm.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False))
def swarm_keygen(path: str) -> None:
    """Write a new private swarm key to PATH (mode 600). Hand it, by a safe channel, to every member:
    nodes, trainers and the coordinator then take --swarm-key PATH, and refuse whoever lacks it."""
    from dmoe.core.auth import SwarmKey

    try:
        key = SwarmKey.generate(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"swarm key written to {path} (fingerprint {key.fingerprint})")
    click.echo(f"members start with: --swarm-key {path}")


@swarm.command("status")
@click_options(StatusConfig)
def swarm_status(config_path: str | None, **values) -> None:
    """Nodes and experts of a swarm, from the nodes' own DHT records: tables, or --json for scripts."""
    config = _config(StatusConfig, config_path, values)
    from hivemind.p2p import P2PDaemonError
    from rich.console import Console

    from dmoe.view.status import read_view, render

    try:
        view = read_view(config)
    except (DmoeError, ValueError, OSError, TimeoutError, RuntimeError, P2PDaemonError) as e:
        raise click.ClickException(f"cannot read the swarm through {' '.join(config.swarm.initial_peers)}: "
                                   f"{e} (is that the address a coordinator or node printed, and is it "
                                   "up?)") from None
    if config.json:
        click.echo(view.model_dump_json(indent=2))
    else:
        console = Console()
        if not console.is_terminal:  # a pipe or a log: no terminal width to fit, keep rows whole
            console = Console(width=200)
        render(view, console, experts=config.experts)


@main.command("train")
@click_options(TrainConfig)
def train(config_path: str | None, **values) -> None:
    """Train the byte-level MoE language model through the swarm (or --local), with a progress bar."""
    config = _config(TrainConfig, config_path, values)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dmoe.lm.train import Trainer

    console = Console(stderr=True, soft_wrap=True)  # lines whole in a log: no cut at 80 columns

    def stop(signum, frame):  # SIGTERM as SIGINT: checkpoint, then shut the DHT and averager down
        raise KeyboardInterrupt

    try:
        trainer = Trainer(config).start()
    except (DmoeError, ValueError, OSError) as e:
        raise click.ClickException(f"cannot start training: {e}") from None
    signal.signal(signal.SIGTERM, stop)  # after start: the averager's forked processes keep the default
    peers = config.swarm.initial_peers
    where = "local experts" if config.local else f"swarm {peers[0]}" if peers else "dense model"
    console.print(f"training on {trainer.corpus.name} ({len(trainer.corpus.train):,} train bytes, "
                  f"{len(trainer.corpus.heldout):,} held out) with {where}; starting at step {trainer.step}")
    columns = [TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}")]
    try:
        # on a terminal a live bar; in a log (CI, a pipe) a line every 10 steps
        with Progress(*columns, console=console, refresh_per_second=4,
                      disable=not console.is_terminal) as progress:
            task = progress.add_task("train", total=config.steps, completed=trainer.step, status="")

            def on_step(r: dict) -> None:
                progress.update(task, completed=r["step"], status=(
                    f"loss {r['loss']:.3f}  {r['tokens_per_s']:,.0f} tok/s  experts {r['live_experts']}  "
                    f"failed calls {trainer.num_failed_calls}"))
                if progress.disable and (r["step"] % 10 == 0 or r["step"] == config.steps):
                    console.print(f"step {r['step']}/{config.steps}  loss {r['loss']:.3f}  "
                                  f"{r['tokens_per_s']:,.0f} tok/s  experts {r['live_experts']}  "
                                  f"failed calls {trainer.num_failed_calls}")

            def on_eval(step: int, loss: float) -> None:
                console.print(f"step {step}: held-out loss {loss:.3f} nats/byte")

            final = trainer.train(on_step=on_step, on_eval=on_eval)
    except KeyboardInterrupt:
        console.print(f"stopped at step {trainer.step}")
        if config.save:
            trainer.save()
        raise SystemExit(130) from None
    finally:
        trainer.shutdown()
    console.print(f"done: {trainer.step} steps, held-out loss {final:.3f} nats/byte"
                  + (f", checkpoint in {config.save}" if config.save else ""))


@main.command("infer")
@click_options(InferConfig)
def infer(config_path: str | None, **values) -> None:
    """Generate text from a checkpoint of dmoe train, with its experts on the swarm (--swarm is not
    needed for a model trained --local or dense)."""
    config = _config(InferConfig, config_path, values)
    from dmoe.client.swarm import Swarm
    from dmoe.lm.infer import generate, load_model, needs_swarm

    swarm = None
    try:
        if needs_swarm(config.checkpoint):
            if not config.swarm.initial_peers:
                raise click.UsageError("this model's experts live on a swarm: give --swarm ADDR")
            swarm = Swarm(config.swarm).start()
        model = load_model(config, swarm)
        text = generate(model, config.prompt, config.max_new_tokens, temperature=config.temperature,
                        top_k=config.top_k, seed=config.seed, cache=config.cache, slide=config.slide or None)
    except (DmoeError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if swarm is not None:
            swarm.shutdown()
    click.echo(config.prompt + text)
