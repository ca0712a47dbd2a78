"""Benchmark: does the MoE language model learn over a swarm as well as locally, and better than dense?

Trains, for the same number of tokens and the same seed (same initial client-side weights, same
data order, same held-out windows), three byte-level language models on the Python standard
library's sources (``dmoe.lm.data``, the fixed train / held-out split):

* **moe-local** — ``dmoe.lm.model.MoELM`` with LocalMoE layers: the experts in this process, trained by
  the same Adam as everything else.
* **moe-swarm** — the same model with RemoteMoE layers over a swarm of two nodes on 127.0.0.1
  (``dmoe node start``; each hosts half the experts of every layer and updates them itself with
  Adam after each Backward, asynchronously from the client).
* **dense** — the same transformer with one dense feed-forward block per layer whose inner width is
  k x the expert's, so the active parameters per token are the same as the MoE's.

Reports held-out loss (nats per byte) every ``--eval-interval`` steps, wall time, and the goals:
moe-swarm within 5% of moe-local at the end, moe-local below dense. Writes
``benchmarks/results/bench_learning.json`` and a plot ``bench_learning.png`` (needs matplotlib:
``pip install -e .[bench]``).

Run::

    python benchmarks/bench_learning.py [--steps 600] [--batch-size 16] [--eval-interval 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import pyplot, server_process, show_progress

from dmoe.client.config import SwarmConfig
from dmoe.lm.config import LMConfig, TrainConfig
from dmoe.lm.model import num_active_params
from dmoe.lm.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = LMConfig()
    common = dict(steps=args.steps, batch_size=args.batch_size, eval_interval=args.eval_interval,
                  eval_batches=args.eval_batches, seed=args.seed, data="stdlib")
    results: dict[str, dict] = {}
    results["moe-local"] = train("moe-local", TrainConfig(**common, local=True))
    results["dense"] = train("dense", TrainConfig(**common, ffn="dense"))
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dmoe-bench-") as tmp:
        workdir = Path(tmp)
        with server_process([sys.executable, "-m", "dmoe", "coordinator", "start", "--ready-file",
                             str(workdir / "coordinator.json")], RESULTS / "bench_learning_coordinator.log",
                            workdir / "coordinator.json") as coordinator:
            swarm = coordinator["swarm"]
            half = model.num_experts // 2
            node_cmd = lambda i: [  # noqa: E731
                sys.executable, "-m", "dmoe", "node", "start", "--swarm", swarm[0], "--device", "cpu",
                "--hidden-dim", str(model.d_model), "--inner-dim", str(model.expert_inner), "--lr", str(1e-3),
                "--ready-file", str(workdir / f"node{i}.json"),
                *[a for layer in range(model.num_layers)
                  for a in ("--experts", f"{model.layer_prefix(layer)}.[{i * half}:{(i + 1) * half}]")]]
            with server_process(node_cmd(0), RESULTS / "bench_learning_node0.log", workdir / "node0.json"), \
                    server_process(node_cmd(1), RESULTS / "bench_learning_node1.log", workdir / "node1.json"):
                config = TrainConfig(**common, swarm=SwarmConfig(initial_peers=swarm))
                results["moe-swarm"] = train("moe-swarm", config)

    local, swarm_loss, dense = (results[n]["final_heldout"] for n in ("moe-local", "moe-swarm", "dense"))
    summary = {
        "config": {**common, **model.to_dict(), "active_ffn_params_per_token": num_active_params(model)},
        "results": results,
        "swarm_vs_local": swarm_loss / local - 1,
        "goal_swarm_within_5pct": swarm_loss <= 1.05 * local,
        "goal_moe_below_dense": local < dense,
    }
    print(f"\n{'model':<10} {'held-out loss':>14} {'median s/step':>14} {'total s':>9} {'failed calls':>13}")
    for name, r in results.items():
        print(f"{name:<10} {r['final_heldout']:>14.4f} {r['median_step_s']:>14.3f} {r['total_s']:>9.1f} "
              f"{r['failed_calls']:>13}")
    print(f"moe-swarm vs moe-local: {100 * summary['swarm_vs_local']:+.2f}% (goal: within +5%)")
    print(f"moe-local vs dense: {local:.4f} vs {dense:.4f} (goal: moe below dense)")
    (RESULTS / "bench_learning.json").write_text(json.dumps(summary, indent=2))
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        axes.plot([s * args.batch_size * model.seq_len for s in steps], losses, marker="o", label=name)
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
