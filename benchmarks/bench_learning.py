"""Benchmark: does the MoE language model learn over a swarm as well as locally, better than dense, and
do many small experts learn better than a few large ones?

Trains, for the same number of steps and tokens and the same seed (same data order, same held-out
windows; the client-side weights are initialised alike where the shapes agree), byte-level language
models on the Python standard library's sources (``dmoe.lm.data``, the fixed train / held-out split).
Every row (``--rows``, all by default) is trained for the same ``--steps``:

* **moe-local** — ``dmoe.lm.model.MoELM`` with LocalMoE layers: 8 experts per layer (inner width 256),
  k=2, in this process, trained by the same Adam as everything else.
* **dense** — the same transformer with one dense feed-forward block per layer whose inner width is
  k x the expert's (512), so the active parameters per token are the same as the MoE's.
* **moe-swarm** — the 8-expert model with RemoteMoE layers over a swarm of two nodes on 127.0.0.1
  (``dmoe node start``; each hosts half the experts of every layer and updates them itself with
  Adam after each Backward, asynchronously from the client).
* **moe-swarm-overlap** — moe-swarm with two training steps in flight (``--steps-in-flight 2``: one
  step's forward overlaps the other's backward on the wire, gradients at most one step late; the
  defaults of :class:`dmoe.lm.overlap.StepsInFlight`: the first 40 steps one at a time; a step's
  update divided by the number of updates it missed, one here: unchanged). Goal: held-out loss within
  2% of moe-swarm's.
* **moe-swarm-overlap4** — the same with four steps in flight (gradients three steps late, their
  updates divided by three), as the bandwidth of a long link needs; the same goal.
* **many-swarm-k8** — many small experts: 1,024 experts per layer on a 32x32 grid
  (``LMConfig.grid``: one gate per dimension, the live candidates found by beam search, beam 2k),
  each a quarter of the inner width (64), k=8: the same active parameters per token as the 8-expert
  k=2 model, over a swarm of four nodes (each hosts 8 rows of the grid, 256 experts, of every layer).
* **many-swarm-k2** — the same grid and nodes with k=2, as the seeds' example: a quarter of the
  active parameters per token.
* **many-local-k8** — the many-expert k=8 model with LocalMoE layers (every expert scored, no beam
  search; all are live anyway): the learning of the architecture without the swarm.

The swarm rows start a coordinator and their nodes anew each; nodes run one torch thread each, no
replica averaging, heartbeats every 20 s (records live 300 s), the default limits per peer (a step of
the 32x32 grid sends each node up to 256 parts of batched calls per layer, within the default
``--max-parts-per-peer``); the client waits
up to 60 s for every expert's answer (forward and backward deadlines, and after the first answer of a
token), so that the loaded, shared machine drops no call: the rows measure learning, not failover.

Reports held-out loss (nats per byte) every ``--eval-interval`` steps, the median seconds per step
and the failed expert calls; the goals: moe-swarm within 5% of moe-local at the end, moe-local below
dense, moe-swarm-overlap within 2% of moe-swarm; and each many-expert row against moe-swarm,
moe-local and dense. Writes ``benchmarks/results/bench_learning.json`` (``--out``; ``--merge`` keeps
the rows of an earlier run of the same settings that this one does not run), a plot
``bench_learning.png`` (needs matplotlib: ``pip install -e .[bench]``), and the reason of every failed
expert call in ``bench_learning_client.log`` (next to the results file).

Run::

    python benchmarks/bench_learning.py [--steps 600] [--batch-size 16] [--eval-interval 50]
        [--rows moe-local,dense,moe-swarm,moe-swarm-overlap,moe-swarm-overlap4,many-swarm-k8,many-swarm-k2,
                many-local-k8]
        [--merge]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from common import pyplot, server_process, show_progress

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.lm.config import LMConfig, TrainConfig
from dmoe.lm.model import num_active_params
from dmoe.lm.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
MANY = dict(grid="32x32", expert_inner=64)  # 1,024 experts per layer, each a quarter of today's width
# row -> (model options over LMConfig's defaults, where the experts run: local, dense, or N swarm nodes,
# training options over the common ones)
ROWS: dict[str, tuple[dict, str | int, dict]] = {
    "moe-local": ({}, "local", {}),
    "dense": ({"ffn": "dense"}, "dense", {}),
    "moe-swarm": ({}, 2, {}),
    "moe-swarm-overlap": ({}, 2, {"steps_in_flight": 2}),
    "moe-swarm-overlap4": ({}, 2, {"steps_in_flight": 4}),
    "many-swarm-k8": ({**MANY, "k": 8}, 4, {}),
    "many-swarm-k2": ({**MANY, "k": 2}, 4, {}),
    "many-local-k8": ({**MANY, "k": 8}, "local", {}),
}
# the swarm rows wait for every answer (the machine is loaded and shared; this measures learning, not
# failover): no call is dropped for a deadline that a quiet machine would meet
SWARM_DEADLINES = dict(forward_timeout=60.0, backward_timeout=60.0, timeout_after_k_min=60.0)
# nodes: one torch thread each; no replica averaging (each expert has one replica);
# records that outlive a few missed heartbeats of a loaded machine (512 experts announced per node)
NODE_OPTIONS = ["--num-threads", "1", "--average-interval", "0", "--heartbeat-interval", "20",
                "--record-ttl", "300"]
VISIBLE_TIMEOUT_S = 180.0  # until the client sees every expert of a swarm row


def train(name: str, config: TrainConfig) -> dict:
    curve: list[tuple[int, float]] = []
    with Trainer(config) as trainer:  # train() evaluates at step 0 first
        trainer.train(on_eval=lambda step, loss: curve.append((step, loss)),
                      on_step=lambda r: show_progress(f"{name}: step {r['step']}/{config.steps} "
                                                      f"loss {r['loss']:.3f}", r["step"], config.steps))
        seconds = [r["seconds"] for r in trainer.history if "seconds" in r]
        failed = trainer.num_failed_calls
    return {"curve": curve, "final_heldout": curve[-1][1], "median_step_s": statistics.median(seconds),
            "total_s": sum(seconds), "failed_calls": failed}


def node_experts(model: LMConfig, n: int, num_nodes: int) -> list[str]:
    """--experts options of node ``n`` of ``num_nodes``: its share of the first dimension of every
    layer's grid, whole along the others (``lm0.[8:16].[0:32]``)."""
    shape = model.grid_shape
    first, last = shape[0] * n // num_nodes, shape[0] * (n + 1) // num_nodes
    rest = "".join(f".[0:{size}]" for size in shape[1:])
    return [a for layer in range(model.num_layers)
            for a in ("--experts", f"{model.layer_prefix(layer)}.[{first}:{last}]{rest}")]


def visible_experts(swarm: Swarm, model: LMConfig) -> int:
    """Experts of every layer of ``model`` the client sees in the DHT (1-D and 2-D grids)."""
    shape, count = model.grid_shape, 0
    for layer in range(model.num_layers):
        prefix = model.layer_prefix(layer)
        keys = [f"{prefix}."] if len(shape) == 1 else [f"{prefix}.{i}." for i in range(shape[0])]
        found = swarm.live_under(keys, refresh=True)
        count += sum(1 for key in keys for c in found[key] if c < shape[-1])
    return count


@contextmanager
def local_swarm(model: LMConfig, num_nodes: int, workdir: Path, name: str) -> Iterator[list[str]]:
    """A coordinator and ``num_nodes`` nodes sharing the model's experts, all visible; yields the swarm."""
    with ExitStack() as stack:
        ready = workdir / f"{name}-coordinator.json"
        coordinator = stack.enter_context(server_process(
            [sys.executable, "-m", "dmoe", "coordinator", "start", "--host", "127.0.0.1", "--ready-file",
             str(ready)], RESULTS / "bench_learning_coordinator.log", ready))
        swarm = coordinator["swarm"]
        for n in range(num_nodes):
            ready = workdir / f"{name}-node{n}.json"
            stack.enter_context(server_process(
                [sys.executable, "-m", "dmoe", "node", "start", "--swarm", swarm[0], "--device", "cpu",
                 "--host", "127.0.0.1", *NODE_OPTIONS, "--hidden-dim", str(model.d_model),
                 "--inner-dim", str(model.expert_inner), "--lr", str(1e-3), "--ready-file", str(ready),
                 *node_experts(model, n, num_nodes)], RESULTS / f"bench_learning_node{n}.log", ready))
        client = Swarm(SwarmConfig(initial_peers=swarm)).start()
        try:
            total, started = model.num_layers * model.num_experts, time.monotonic()
            while (seen := visible_experts(client, model)) < total:
                if time.monotonic() - started > VISIBLE_TIMEOUT_S:
                    raise TimeoutError(f"{name}: only {seen}/{total} experts visible; see "
                                       f"{RESULTS}/bench_learning_node*.log")
                time.sleep(1.0)
        finally:
            client.shutdown()
        yield swarm


def run_row(name: str, common: dict, workdir: Path) -> tuple[dict, dict]:
    """(the row's result, its model config as a dict)."""
    options, where, training = ROWS[name]
    model = LMConfig(**options)
    if where == "local":
        result = train(name, TrainConfig(**common, **options, **training, local=True))
    elif where == "dense":
        result = train(name, TrainConfig(**common, **options, **training))
    else:
        with local_swarm(model, where, workdir, name) as swarm:
            result = train(name, TrainConfig(**common, **options, **training, **SWARM_DEADLINES,
                                             swarm=SwarmConfig(initial_peers=swarm)))
    described = {**model.to_dict(), "experts_per_layer": model.num_experts, "grid": list(model.grid_shape),
                 "nodes": where if isinstance(where, int) else 0,
                 "active_ffn_params_per_token": num_active_params(model),
                 "steps_in_flight": training.get("steps_in_flight", 1)}
    return {**result, "model": described}, described


def vs(results: dict, a: str, b: str) -> float | None:
    """Held-out loss of row ``a`` relative to row ``b`` (-0.05: 5% lower), if both ran."""
    if a in results and b in results:
        return results[a]["final_heldout"] / results[b]["final_heldout"] - 1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to run, of: {', '.join(ROWS)}")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other rows of the results file if it was run with the same settings")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_learning.json", help="results file")
    args = parser.parse_args()
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        parser.error(f"unknown rows {unknown}: choose among {', '.join(ROWS)}")
    common = dict(steps=args.steps, batch_size=args.batch_size, eval_interval=args.eval_interval,
                  eval_batches=args.eval_batches, seed=args.seed, data="stdlib")
    RESULTS.mkdir(exist_ok=True)
    out = args.out
    # why expert calls failed (the client logs each at DEBUG): one line each, in a file
    failures = logging.FileHandler(out.with_name(f"{out.stem}_client.log"), mode="w")
    failures.setLevel(logging.DEBUG)
    failures.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    client_log = logging.getLogger("dmoe.client.dispatch")
    client_log.setLevel(logging.DEBUG)
    client_log.addHandler(failures)
    results: dict[str, dict] = {}
    if args.merge and out.exists():
        earlier = json.loads(out.read_text())
        if earlier.get("config", {}).get("training") == common:
            results = {name: r for name, r in earlier.get("results", {}).items() if name not in rows}
        else:
            settings = earlier.get("config", {}).get("training")
            print(f"--merge: {out} was run with other settings ({settings}); not merged")
    with tempfile.TemporaryDirectory(prefix="dmoe-bench-") as tmp:
        for row in rows:
            results[row], _ = run_row(row, common, Path(tmp))
    results = {name: results[name] for name in ROWS if name in results}  # the table's order

    summary: dict = {"config": {"training": common, "node_threads": 1}, "results": results}
    comparisons = {f"{a}_vs_{b}": vs(results, a, b)
                   for a, b in [("moe-swarm", "moe-local"), ("moe-local", "dense"),
                                ("moe-swarm-overlap", "moe-swarm"), ("moe-swarm-overlap4", "moe-swarm"),
                                *[(m, b) for m in ("many-swarm-k8", "many-swarm-k2", "many-local-k8")
                                  for b in ("moe-swarm", "moe-local", "dense")]]}
    summary["comparisons"] = {key: value for key, value in comparisons.items() if value is not None}
    loss = {name: r["final_heldout"] for name, r in results.items()}
    if "moe-swarm" in loss and "moe-local" in loss:
        summary["goal_swarm_within_5pct"] = loss["moe-swarm"] <= 1.05 * loss["moe-local"]
    if "moe-local" in loss and "dense" in loss:
        summary["goal_moe_below_dense"] = loss["moe-local"] < loss["dense"]
    if "moe-swarm-overlap" in loss and "moe-swarm" in loss:
        summary["goal_overlap_within_2pct"] = loss["moe-swarm-overlap"] <= 1.02 * loss["moe-swarm"]
    if "moe-swarm-overlap4" in loss and "moe-swarm" in loss:
        summary["goal_overlap4_within_2pct"] = loss["moe-swarm-overlap4"] <= 1.02 * loss["moe-swarm"]

    print(f"\n{args.steps} steps of {args.batch_size} x {LMConfig().seq_len} bytes for every row")
    print(f"{'row':<17} {'experts/layer':>13} {'k':>2} {'inner':>5} {'active':>8} {'nodes':>5} {'flight':>6} "
          f"{'held-out loss':>13} {'median s/step':>13} {'total s':>8} {'failed calls':>12}")
    for name, r in results.items():
        m = r["model"]
        experts = "dense" if m["ffn"] == "dense" else "x".join(map(str, m["grid"]))
        print(f"{name:<17} {experts:>13} {m['k']:>2} {m['expert_inner']:>5} "
              f"{m['active_ffn_params_per_token']:>8,} {m['nodes'] or '-':>5} {m['steps_in_flight']:>6} "
              f"{r['final_heldout']:>13.4f} "
              f"{r['median_step_s']:>13.3f} {r['total_s']:>8.1f} {r['failed_calls']:>12}")
    for key, value in summary["comparisons"].items():
        print(f"{key.replace('_vs_', ' vs ')}: held-out loss {100 * value:+.2f}%")
    if "goal_swarm_within_5pct" in summary:
        print(f"goal moe-swarm within +5% of moe-local: {summary['goal_swarm_within_5pct']}")
    if "goal_moe_below_dense" in summary:
        print(f"goal moe-local below dense: {summary['goal_moe_below_dense']}")
    if "goal_overlap_within_2pct" in summary:
        print(f"goal moe-swarm-overlap within +2% of moe-swarm: {summary['goal_overlap_within_2pct']}")
    if "goal_overlap4_within_2pct" in summary:
        print(f"goal moe-swarm-overlap4 within +2% of moe-swarm: {summary['goal_overlap4_within_2pct']}")
    out.write_text(json.dumps(summary, indent=2))
    print(f"results: {out}")
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        axes.plot([s * args.batch_size * LMConfig().seq_len for s in steps], losses, marker="o", label=name)
    axes.set_xlabel("training tokens (bytes)")
    axes.set_ylabel("held-out loss (nats/byte)")
    axes.set_title("byte-level LM on Python stdlib sources")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "bench_learning.png", dpi=120)
    print(f"plot: {RESULTS / 'bench_learning.png'}")


if __name__ == "__main__":
    main()
