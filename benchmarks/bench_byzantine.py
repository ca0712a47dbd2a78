"""Benchmark: robust averaging against BTARD's attacks. Four trainers of the byte-level LM average their
parameters (real averagers: hivemind's all-reduce over libp2p, through dmoe.lm.averaging, with its guard);
one of them is hostile. Held-out loss of the honest trainers after N rounds, with the plain mean and with
centered-clip, side by side.

Each trainer holds a small dense LM (the client-side part of dmoe train's model, same init) and trains on
its own batches of the stdlib corpus; every round, each takes ``--local-steps`` Adam steps, then all
four average at once (:class:`dmoe.testing.byzantine.AveragingPeers`), in lockstep. Trainer 0 offers,
instead of its parameters (:func:`dmoe.testing.byzantine.poison`): nothing hostile (``none``), its update
times -1000 (``sign-flip``), a random direction of 1000 times its update's norm (``random``), its first
offer again every round (``stale``), or the opposite of its update as far as the guard lets through
(``in-bound``). ``alone``: no averaging at all (each trainer on its own), for reference. Reported per
cell: the median over ``--repeats`` runs of the honest trainers' mean held-out loss, and the rounds their
guard refused. Each aggregate runs in a process of its own (the averagers fork), both at once.

Run::

    python benchmarks/bench_byzantine.py [--rounds N] [--local-steps S] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import write_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"
AGGREGATES = ("mean", "centered-clip")
SCENARIOS = ("none", "sign-flip", "random", "stale", "in-bound", "alone")
MODEL = dict(d_model=32, num_layers=2, num_heads=2, seq_len=32, expert_inner=64, ffn="dense")
NUM_PEERS = 4


def worker(aggregate: str, rounds: int, local_steps: int, repeats: int, lr: float, batch: int) -> None:
    """In a fresh process: every scenario, ``repeats`` times; one JSON line per run on stdout."""
    from dmoe.lm.config import LMConfig
    from dmoe.lm.data import ByteCorpus
    from dmoe.lm.model import MoELM
    from dmoe.testing.byzantine import AveragingPeers, poison

    torch.set_num_threads(1)
    config = LMConfig(**MODEL)
    corpus = ByteCorpus.load("stdlib")
    heldout = corpus.heldout_batches(16, config.seq_len, 4)
    torch.manual_seed(0)
    init = [p.detach().clone() for p in MoELM(config).parameters()]
    models = [MoELM(config) for _ in range(NUM_PEERS)]
    shapes = [p.shape for p in init]
    with AveragingPeers(shapes, num_peers=NUM_PEERS, run_id=f"bench-{aggregate}", aggregate=aggregate,
                        matchmaking_time=1.0) as peers:
        peers.round()  # a first round, not measured: the DHT and the averagers warm up
        for repeat in range(repeats):
            for scenario in SCENARIOS:
                started = time.perf_counter()
                generators = [torch.Generator().manual_seed(1000 * repeat + i) for i in range(NUM_PEERS)]
                attack_rng = torch.Generator().manual_seed(repeat)
                optimizers = []
                for model in models:
                    with torch.no_grad():
                        for p, value in zip(model.parameters(), init):
                            p.copy_(value)
                    optimizers.append(torch.optim.Adam(model.parameters(), lr=lr))
                first_offer = None
                refused = failed = full_groups = 0
                for _ in range(rounds):
                    offers = []
                    for i, (model, optimizer) in enumerate(zip(models, optimizers)):
                        reference = [p.detach().clone() for p in model.parameters()]
                        model.train()
                        for _ in range(local_steps):
                            x, y = corpus.batch(batch, config.seq_len, generators[i])
                            loss, _ = model.loss(x, y)
                            optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                            optimizer.step()
                        own = [p.detach().clone() for p in model.parameters()]
                        if i == 0 and scenario not in ("none", "alone"):
                            offer = poison(scenario, own, reference, first_offer or own, attack_rng)
                            first_offer = first_offer or offer
                            own = offer
                        offers.append(own)
                    if scenario == "alone":
                        continue
                    for i, offer in enumerate(offers):
                        peers.set(i, offer)
                    outcomes = peers.round()
                    refused += sum(o == "refused" for o in outcomes[1:])
                    failed += sum(o == "failed" for o in outcomes[1:])
                    full_groups += all(size == NUM_PEERS for size in peers.group_sizes())
                    for model, tensors in zip(models, peers.tensors):  # refused or failed: what it offered
                        with torch.no_grad():
                            for p, value in zip(model.parameters(), tensors):
                                p.copy_(value)
                losses = []
                for model in models[1:]:  # the honest ones
                    model.eval()
                    with torch.no_grad():
                        losses.append(sum(float(model.loss(x, y)[1]) for x, y in heldout) / len(heldout))
                print(json.dumps({"aggregate": aggregate, "scenario": scenario, "repeat": repeat,
                                  "heldout_loss": sum(losses) / len(losses), "losses": losses,
                                  "refused": refused, "failed": failed, "full_groups": full_groups,
                                  "rounds": rounds, "seconds": time.perf_counter() - started}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="averaging rounds (N)")
    parser.add_argument("--local-steps", type=int, default=3, help="Adam steps of each trainer per round")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (other batches)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", choices=AGGREGATES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_byzantine.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rounds, args.local_steps, args.repeats, args.lr, args.batch)
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    common = ["--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--repeats",
              str(args.repeats), "--lr", str(args.lr), "--batch", str(args.batch)]
    started = time.perf_counter()
    processes = {a: subprocess.Popen([sys.executable, __file__, "--worker", a, *common],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for a in AGGREGATES}
    runs = []
    for aggregate, proc in processes.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"the {aggregate} worker failed (exit {proc.returncode})")
        runs += [json.loads(line) for line in out.splitlines()]
    cells = {}
    for scenario in SCENARIOS:
        for aggregate in AGGREGATES:
            mine = [r for r in runs if r["scenario"] == scenario and r["aggregate"] == aggregate]
            cells[scenario, aggregate] = {
                "heldout_loss": statistics.median(r["heldout_loss"] for r in mine),
                "refused": statistics.median(r["refused"] for r in mine),
                "full_groups": statistics.median(r["full_groups"] for r in mine),
                "seconds": statistics.median(r["seconds"] for r in mine)}
    steps = args.rounds * args.local_steps
    print(f"\nheld-out loss (nats/byte) of the 3 honest trainers after {args.rounds} rounds x "
          f"{args.local_steps} steps ({steps} steps; at init ~5.5), median of {args.repeats} runs; "
          "refused: rounds the honest trainers' guard refused (of 3 x rounds)")
    print(f"{'attack (trainer 0 of 4)':<24} | {'mean':>8} {'refused':>8} | "
          f"{'centered-clip':>14} {'refused':>8}")
    print("-" * 72)
    for scenario in SCENARIOS:
        m, c = cells[scenario, "mean"], cells[scenario, "centered-clip"]
        print(f"{scenario:<24} | {m['heldout_loss']:8.3f} {m['refused']:8g} | "
              f"{c['heldout_loss']:14.3f} {c['refused']:8g}")
    print(f"({time.perf_counter() - started:.0f} s)")
    write_report(args.out, {"config": {**vars(args), "out": str(args.out), "model": MODEL},
                            "cells": {f"{s}/{a}": v for (s, a), v in cells.items()}, "runs": runs})


if __name__ == "__main__":
    main()
