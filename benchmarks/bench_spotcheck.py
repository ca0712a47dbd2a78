"""Benchmark: spot checks of replicas: how soon a lying replica is caught, and what the checks cost.

Five nodes on this machine host the same experts (``spot.[0:4]``, hidden ``--hidden``, the test
expert ``lying_experts:LyingExpert`` of tests/support, a small MLP): two honest ones and three
liars, each of which adds to every output row of a fraction (``--lie-fractions``: 0.1, 0.5, 1.0) of
its Forward calls a random perturbation of ``--lie-scale`` times the row's norm. Every expert thus
has three replicas in each configuration: the two honest ones and the liar of that configuration
(the client leaves the other liars out).

Detection: a client runs forward steps of a RemoteMoE layer (k=2 of the 4 experts, ``--tokens``
tokens) with spot checks at rate 0, 0.01, 0.05, 0.2 (``--rates``) against each lie fraction,
tolerance ``--tolerance``; a run is up to ``--steps`` steps with a fresh endpoint health and checker,
and ends when the liar is quarantined (for one of its experts at least); the configurations' runs
are interleaved. Reports the share of ``--runs`` runs that caught the liar, the median number of
steps until then, the honest replicas quarantined (false convictions: there should be none), and
the check calls per step.

Cost: ``--overhead-steps`` training steps (forward + backward) on the two honest replicas alone
at each rate, the rates taking turns step by step so that the machine's load hits them alike:
the median step time and its change against rate 0 (checks run beside the step, not in it), check
calls per step, and the checks' bytes (inputs and outputs of their calls) against the step's
(every answered token: inputs and outputs of the forward, inputs, output gradients and input
gradients of the backward, float32).

``--drift`` measures instead how far honest replicas drift apart between averaging rounds, which the
tolerance must exceed: the default language model (``dmoe train``'s LMConfig, local experts, node
optimizer Adam lr 1e-3, clipping 1) trained on the standard library, each expert with two replicas
each of which takes the updates of the steps that the balancer would have sent it (one at random
per step and expert), and both moved to their mean every ``--drift-interval`` steps; before each
blend, the :func:`dmoe.client.spotcheck.distance` between the two replicas' outputs for 4 tokens of
that step. Reports its median, p99 and max over the experts and rounds.

Writes ``benchmarks/results/bench_spotcheck.json`` (or ``bench_spotcheck_drift.json``).

Run::

    python benchmarks/bench_spotcheck.py [--runs 8] [--steps 30] [--rates 0 0.01 0.05 0.2]
    python benchmarks/bench_spotcheck.py --drift [--drift-interval 30] [--drift-steps 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import show_progress, write_report

import dmoe
from dmoe.client.health import EndpointHealth
from dmoe.client.spotcheck import SpotChecker, distance
from dmoe.testing.process import stop_process_group, wait_ready_file

RESULTS = Path(__file__).resolve().parent / "results"
SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support"
NUM_EXPERTS, K = 4, 2
UIDS = [f"spot.{i}" for i in range(NUM_EXPERTS)]
LEFT_OUT = 1e6  # seconds: the other configurations' liars, out of this one's way


def start_node(workdir: Path, name: str, hidden: int, swarm: list[str], lie_fraction: float, lie_scale: float
               ) -> tuple[subprocess.Popen, Path]:
    ready = workdir / f"{name}.json"
    cmd = ["env", f"PYTHONPATH={SUPPORT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           f"DMOE_TEST_LIE_FRACTION={lie_fraction}", f"DMOE_TEST_LIE_SCALE={lie_scale}",
           sys.executable, "-m", "dmoe", "node", "start", "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--num-threads", "1", "--experts", f"spot.[0:{NUM_EXPERTS}]",
           "--expert-cls", "lying_experts:LyingExpert", "--hidden-dim", str(hidden), "--optimizer", "sgd",
           "--lr", "1e-4", "--average-interval", "5", "--heartbeat-interval", "2", "--record-ttl", "10",
           "--ready-file", str(ready), *[a for addr in swarm for a in ("--swarm", addr)]]
    log = open(RESULTS / f"bench_spotcheck_{name}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    return proc, ready


def detection(args) -> dict:
    RESULTS.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            proc, ready = start_node(workdir, "honest0", args.hidden, [], 0.0, args.lie_scale)
            procs.append(proc)
            first = wait_ready_file(ready, proc, 120, "honest0")
            names = ["honest1"] + [f"liar{f:g}" for f in args.lie_fractions]
            fractions = [0.0] + list(args.lie_fractions)
            started = [start_node(workdir, n, args.hidden, first["swarm"], f, args.lie_scale)
                       for n, f in zip(names, fractions)]
            procs += [p for p, _ in started]
            with concurrent.futures.ThreadPoolExecutor(len(started)) as pool:
                infos = list(pool.map(lambda item: wait_ready_file(item[1][1], item[1][0], 120, item[0]),
                                      zip(names, started)))
            endpoints = {"honest0": first["endpoint"]} | {n: i["endpoint"] for n, i in zip(names, infos)}
            return measure(args, first["swarm"], endpoints)
        finally:
            for proc in procs:
                stop_process_group(proc)


def fresh_health(swarm, config, liars: dict[float, str], keep: float | None) -> None:
    """A new endpoint health for ``swarm``, with every liar but ``keep``'s left out."""
    swarm.health = EndpointHealth(ban_base=config.ban_base, ban_max=config.ban_max,
                                  quarantine_time=config.quarantine_time)
    for fraction, endpoint in liars.items():
        if fraction != keep:
            for uid in UIDS:
                swarm.health.quarantine(endpoint, uid, "left out of this configuration", LEFT_OUT)


def wait_checks(checker: SpotChecker, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while checker.running and time.monotonic() < end:
        time.sleep(0.01)


def measure(args, swarm_addr: list[str], endpoints: dict[str, str]) -> dict:
    liars = {f: endpoints[f"liar{f:g}"] for f in args.lie_fractions}
    honest = [endpoints["honest0"], endpoints["honest1"]]
    config = dmoe.SwarmConfig(initial_peers=swarm_addr, cache_ttl=3600, spot_check_rate=0.0)
    with dmoe.Swarm(config) as swarm:
        deadline = time.monotonic() + 60
        while True:
            found = swarm.live_replicas_under(["spot."], refresh=True)["spot."]
            if len(found) == NUM_EXPERTS and all(len(r) == 2 + len(liars) for r in found.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the client does not see every replica")
            time.sleep(0.5)
        torch.manual_seed(0)
        layer = dmoe.RemoteMoE(swarm, prefix="spot", grid=(NUM_EXPERTS,), in_features=args.hidden, k=K,
                               forward_timeout=10.0, backward_timeout=10.0)
        try:
            detected = detect(args, swarm, config, layer, liars, honest)
            overhead = cost(args, swarm, config, layer, liars)
        finally:
            layer.dispatcher.close()
    return report(args, detected, overhead)


def detect(args, swarm, config, layer, liars: dict[float, str], honest: list[str]) -> dict:
    """Runs of forward steps until the liar is quarantined (or ``--steps``), for each configuration."""
    configs = [(rate, f) for f in args.lie_fractions for rate in args.rates]
    results = {c: {"detected_at": [], "false": 0, "checks": 0, "steps": 0, "check_bytes": 0} for c in configs}
    total, done = args.runs * len(configs), 0
    for run in range(args.runs):
        for rate, fraction in configs:
            row = results[rate, fraction]
            fresh_health(swarm, config, liars, fraction)
            checker = SpotChecker(rate=rate, tolerance=args.tolerance, tokens=config.spot_check_tokens,
                                  quarantine=swarm.quarantine, seed=1000 * run + len(row["detected_at"]))
            layer.spot_checker = checker
            caught = None
            for step in range(1, args.steps + 1):
                with torch.no_grad():
                    layer(torch.randn(args.tokens, args.hidden))
                row["steps"] += 1
                if any(swarm.quarantined(liars[fraction], uid) for uid in UIDS):
                    caught = step
                    break
            wait_checks(checker)  # its verdicts belong to this run
            if caught is None and any(swarm.quarantined(liars[fraction], uid) for uid in UIDS):
                caught = args.steps
            row["detected_at"].append(caught)
            row["false"] += sum(swarm.quarantined(e, uid) for e in honest for uid in UIDS)
            row["checks"] += checker.stats.checks + checker.stats.failed
            row["check_bytes"] += checker.stats.bytes
            done += 1
            show_progress(f"detection: run {run + 1}/{args.runs}, {done}/{total}", done, total, every=12)
    return results


def cost(args, swarm, config, layer, liars: dict[float, str]) -> dict:
    """Training steps (forward + backward) on the two honest replicas at each rate, the rates taking
    turns step by step (in a rotating order), so that the machine's noise hits them alike."""
    fresh_health(swarm, config, liars, None)
    checkers = {rate: SpotChecker(rate=rate, tolerance=args.tolerance, tokens=config.spot_check_tokens,
                                  quarantine=swarm.quarantine, seed=7) for rate in args.rates}
    seconds: dict[float, list[float]] = {rate: [] for rate in args.rates}
    for step in range(args.overhead_steps):
        x = torch.randn(args.tokens, args.hidden)
        order = list(checkers)
        shift = step % len(order)  # each rate goes first in turn: no rate pays for the step's first call
        for rate in order[shift:] + order[:shift]:
            layer.spot_checker = checkers[rate]
            begun = time.perf_counter()
            layer(x.clone().requires_grad_(True)).square().mean().backward()
            seconds[rate].append(time.perf_counter() - begun)
        show_progress(f"overhead: step {step + 1}/{args.overhead_steps}", step + 1, args.overhead_steps)
    for checker in checkers.values():
        wait_checks(checker)
    return {rate: {"seconds": seconds[rate], "checks": c.stats.checks + c.stats.failed,
                   "check_bytes": c.stats.bytes, "disagreed": c.stats.disagreed}
            for rate, c in checkers.items()}


def report(args, detected: dict, overhead: dict) -> dict:
    step_bytes = args.tokens * K * args.hidden * 4 * 5  # forward in + out, backward in + grad out + grad in
    rows = []
    for (rate, fraction), r in detected.items():
        caught = [s for s in r["detected_at"] if s is not None]
        rows.append({"rate": rate, "lie_fraction": fraction, "detected": len(caught) / len(r["detected_at"]),
                     "steps_to_detection_median": statistics.median(caught) if caught else None,
                     "steps_to_detection": r["detected_at"], "honest_quarantined": r["false"],
                     "checks_per_step": r["checks"] / r["steps"], "steps": r["steps"]})
    base = statistics.median(overhead[min(args.rates)]["seconds"])
    costs = []
    for rate, r in overhead.items():
        median_s = statistics.median(r["seconds"])
        costs.append({"rate": rate, "step_ms_median": 1e3 * median_s, "step_time_change": median_s / base - 1,
                      "checks_per_step": r["checks"] / len(r["seconds"]),
                      "check_bytes_share": r["check_bytes"] / (step_bytes * len(r["seconds"])),
                      "disagreements": r["disagreed"], "seconds": r["seconds"]})
    print(f"\nspot checks: a liar among 3 replicas of {NUM_EXPERTS} experts (k={K}, {args.tokens} tokens, "
          f"hidden {args.hidden}); lies of {args.lie_scale:g}x the output's norm; tolerance "
          f"{args.tolerance:g}; {args.runs} runs of at most {args.steps} forward steps")
    print(f"{'rate':>6} {'lies':>5} {'caught':>7} {'steps (median)':>15} {'honest quarantined':>19} "
          f"{'checks/step':>12}")
    for r in rows:
        steps = "-" if r["steps_to_detection_median"] is None else f"{r['steps_to_detection_median']:.1f}"
        print(f"{r['rate']:>6g} {r['lie_fraction']:>5g} {r['detected']:>7.2f} {steps:>15} "
              f"{r['honest_quarantined']:>19d} {r['checks_per_step']:>12.3f}")
    print(f"\ncost: {args.overhead_steps} training steps (forward + backward) on two honest replicas, "
          f"the rates taking turns")
    print(f"{'rate':>6} {'step ms (median)':>17} {'change':>8} {'checks/step':>12} {'check bytes':>12} "
          f"{'disagreements':>14}")
    for c in costs:
        print(f"{c['rate']:>6g} {c['step_ms_median']:>17.1f} {100 * c['step_time_change']:>+7.1f}% "
              f"{c['checks_per_step']:>12.3f} {100 * c['check_bytes_share']:>11.2f}% "
              f"{c['disagreements']:>14d}")
    return {"config": {k: v for k, v in vars(args).items() if k != "drift"}, "detection": rows, "cost": costs}


def drift(args) -> dict:
    """Honest replicas' drift between averaging rounds (see the module docstring)."""
    import copy
    import random

    from dmoe.lm.config import LMConfig
    from dmoe.lm.data import ByteCorpus
    from dmoe.lm.model import MoELM, local_moe_factory

    torch.manual_seed(0)
    config = LMConfig()
    model = MoELM(config, local_moe_factory())
    layers = model.moe_layers()
    replicas = [[list(layer.experts), [copy.deepcopy(e) for e in layer.experts]] for layer in layers]
    optimizers = {id(e): torch.optim.Adam(e.parameters(), lr=1e-3)
                  for pair in replicas for rs in pair for e in rs}
    expert_params = {id(p) for pair in replicas for rs in pair for e in rs for p in e.parameters()}
    client = [p for p in model.parameters() if id(p) not in expert_params]
    client_optimizer = torch.optim.Adam(client, lr=1e-3)
    corpus = ByteCorpus.load("stdlib")
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)
    inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(
            lambda m, inp, out, i=i: inputs.__setitem__(i, inp[0].detach().flatten(0, -2)))
    gaps: list[float] = []
    for step in range(1, args.drift_steps + 1):
        chosen = {}
        for i, layer in enumerate(layers):
            for j in range(config.num_experts):
                chosen[i, j] = rng.randrange(2)
                layer.experts[j] = replicas[i][chosen[i, j]][j]
        x, y = corpus.batch(args.drift_batch, config.seq_len, generator)
        loss, _ = model.loss(x, y)
        model.zero_grad(set_to_none=True)
        for pair in replicas:
            for rs in pair:
                for e in rs:
                    e.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(client, 1.0)
        client_optimizer.step()
        for (i, j), r in chosen.items():
            expert = replicas[i][r][j]
            if any(p.grad is not None for p in expert.parameters()):
                torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
                optimizers[id(expert)].step()
        if step % args.drift_interval == 0:
            with torch.no_grad():
                for i in range(len(layers)):
                    for j in range(config.num_experts):
                        rows = inputs[i][torch.randperm(inputs[i].shape[0], generator=generator)[:4]]
                        a, b = replicas[i][0][j], replicas[i][1][j]
                        gaps.append(distance(a(rows), b(rows)))
                        for pa, pb in zip(a.parameters(), b.parameters()):
                            mean = (pa + pb) / 2
                            pa.copy_(mean)
                            pb.copy_(mean)
        show_progress(f"drift: step {step}/{args.drift_steps}", step, args.drift_steps)
    ordered = sorted(gaps)
    result = {"median": statistics.median(gaps), "p99": ordered[int(0.99 * (len(ordered) - 1))],
              "max": ordered[-1], "samples": len(gaps)}
    print(f"\nhonest drift, LM defaults (d_model {config.d_model}, expert inner {config.expert_inner}, "
          f"Adam lr 1e-3 on the nodes), averaged every {args.drift_interval} steps, batch "
          f"{args.drift_batch}: distance median {result['median']:.3f}, p99 {result['p99']:.3f}, "
          f"max {result['max']:.3f} ({len(gaps)} samples)")
    return {"config": {k: getattr(args, k) for k in ("drift_interval", "drift_steps", "drift_batch")},
            "results": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps a run has to catch the liar")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.2])
    parser.add_argument("--lie-fractions", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--lie-scale", type=float, default=1.0, help="a lie's norm, times the output's")
    parser.add_argument("--tolerance", type=float, default=0.3)
    parser.add_argument("--overhead-steps", type=int, default=40, help="training steps per rate for the cost")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--drift", action="store_true", help="measure honest replicas' drift instead")
    parser.add_argument("--drift-interval", type=int, default=30, help="steps between averaging rounds")
    parser.add_argument("--drift-steps", type=int, default=300)
    parser.add_argument("--drift-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # each quarantine is a warning; the tables count them
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.drift:
        write_report(RESULTS / "bench_spotcheck_drift.json", drift(args))
    else:
        write_report(RESULTS / "bench_spotcheck.json", detection(args))


if __name__ == "__main__":
    main()
