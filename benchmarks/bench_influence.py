"""Benchmark: how far one peer moves an expert with legal Backward calls, without and with the bound
on one peer's influence (``--peer-steps-per-minute``, ``--max-peer-step-share``).

A real node (``dmoe.node.Node``, in a process of its own, started with ``spawn``) hosts one FFN
expert (hidden ``--hidden``, on CPU). An attacking peer (127.0.0.1) sends Backward calls as fast
as the node and the per-peer limits let it (``--concurrency`` calls in flight on one channel) for
``--duration`` seconds, each with the same tiny gradient (``--grad`` per element, far below the
clipping norm and ``--max-grad-abs``) of one sign: minus a fixed unit direction d of the output
space, i.e. "make the output larger along d". Every call is legal and every one is answered.

Configurations, each on a fresh node with the same seed (the same initial weights), in one run:

* ``off``: ``--peer-steps-per-minute 0 --max-peer-step-share 1`` (the node before the defence:
  every Backward is an optimizer step);
* ``default``: the node's default options;

each with the attacker alone, and with ``--honest`` honest trainers beside it (from 127.0.0.2,
127.0.0.3, ..., through a forwarding proxy each, so that the node sees separate peers), each at
``--honest-rate`` steps a second (Forward, then Backward of the MSE gradient towards a fixed
teacher, 16 rows), a realistic trainer's rate across a network.

Measured per configuration, on a fixed probe batch of 64 rows taken before and after the attack:
the relative change of the expert's output ``|Y1 - Y0| / |Y0|``, the mean movement along d
relative to the mean output row norm, and the relative parameter distance ``|p1 - p0| / |p0|``;
the attacker's calls and the optimizer steps they caused (the node's own account, shares of
batches by tokens), the honest peers' steps and skipped updates, and the attacker's share of the
expert's steps. Per-minute figures are the measured ones scaled by 60 / ``--duration`` (stated in
the table); the movement is reported as measured over ``--duration``.

Writes ``benchmarks/results/bench_influence.json``. Run::

    python benchmarks/bench_influence.py [--duration 20] [--honest 3] [--honest-rate 2] [--hidden 256]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import multiprocessing
import time
from pathlib import Path

import grpc
import torch
from common import write_report

from dmoe.core.wire import deserialize, serialize
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.testing.netproxy import TcpProxy

UID = "ffn.0"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROBE_ROWS, ATTACK_ROWS, HONEST_ROWS = 64, 4, 16
OFF = {"peer_steps_per_minute": 0.0, "max_peer_step_share": 1.0}


# ---- the node, in a process of its own ----------------------------------------------------------
def serve_node(hidden: int, overrides: dict, conn) -> None:
    """Run a node until told to stop; answer requests for its parameters and its step accounts."""
    from dmoe.node import Node, NodeConfig

    config = NodeConfig(experts=[UID], hidden_dim=hidden, device="cpu", num_threads=1, **overrides)
    with Node(config) as node:
        conn.send(node.endpoint)
        backend = node.backends[UID]
        while True:
            command = conn.recv()
            if command == "params":
                tensors, _ = backend.state_tensors(optimizer=False)
                conn.send(torch.cat([t.flatten().float() for t in tensors.values()]).numpy())
            elif command == "stats":
                accounts = node.influence.stats(UID)
                conn.send({"version": backend.version,
                           "peers": {peer: (a.steps, a.skipped) for peer, a in accounts.items()}})
            else:
                break


class NodeHandle:
    def __init__(self, hidden: int, overrides: dict):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=serve_node, args=(hidden, overrides, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise TimeoutError("the node did not start within 120 s")
        self.endpoint: str = self.conn.recv()

    def ask(self, command: str):
        self.conn.send(command)
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


# ---- the peers ----------------------------------------------------------------------------------
async def attack(endpoint: str, x: torch.Tensor, grad: torch.Tensor, duration: float,
                 concurrency: int) -> dict:
    request = pb.BackwardRequest(uid=UID, inputs=[serialize(x)], grad_outputs=[serialize(grad)])
    calls, errors = 0, collections.Counter()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pbg.ExpertServiceStub(channel)
        deadline = time.monotonic() + duration

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < deadline:
                try:
                    await stub.Backward(request, timeout=30)
                    calls += 1
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"calls": calls, "errors": dict(errors)}


async def train_honestly(endpoint: str, seed: int, teacher: torch.Tensor, duration: float,
                         rate: float) -> dict:
    generator = torch.Generator().manual_seed(seed)
    steps, errors = 0, collections.Counter()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pbg.ExpertServiceStub(channel)
        started = time.monotonic()
        while time.monotonic() - started < duration:
            x = torch.randn(HONEST_ROWS, teacher.shape[0], generator=generator)
            try:
                reply = await stub.Forward(pb.ForwardRequest(uid=UID, inputs=[serialize(x)]), timeout=30)
                y = deserialize(reply.outputs[0], max_numel=x.numel())
                grad = 2 * (y - x @ teacher) / y.numel()
                await stub.Backward(pb.BackwardRequest(uid=UID, inputs=[serialize(x)],
                                                       grad_outputs=[serialize(grad)]), timeout=30)
                steps += 1
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] += 1
            await asyncio.sleep(max(0.0, started + (steps + sum(errors.values())) / rate - time.monotonic()))
    return {"steps": steps, "errors": dict(errors)}


async def watch(endpoint: str, x: torch.Tensor, y0: torch.Tensor, duration: float,
                interval: float = 0.2) -> list[tuple[float, float]]:
    """(seconds since the start, |Y - Y0| / |Y0|) on the probe batch every ``interval`` during the attack."""
    request = pb.ForwardRequest(uid=UID, inputs=[serialize(x)])
    seen = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pbg.ExpertServiceStub(channel)
        started = time.monotonic()
        while time.monotonic() - started < duration:
            try:
                reply = await stub.Forward(request, timeout=30)
                y = deserialize(reply.outputs[0], max_numel=x.numel())
                seen.append((time.monotonic() - started, float((y - y0).norm() / y0.norm())))
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(interval)
    return seen


def first_time_above(seen: list[tuple[float, float]], level: float) -> float | None:
    return next((t for t, change in seen if change >= level), None)


def probe(endpoint: str, x: torch.Tensor) -> torch.Tensor:
    with grpc.insecure_channel(endpoint) as channel:
        reply = pbg.ExpertServiceStub(channel).Forward(pb.ForwardRequest(uid=UID, inputs=[serialize(x)]),
                                                       timeout=30)
    return deserialize(reply.outputs[0], max_numel=x.numel())


# ---- one configuration --------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class Row:
    defence: str
    honest_peers: int
    attacker_calls: int
    attacker_steps: float
    expert_steps: int
    attacker_share: float
    honest_steps: float
    honest_skipped: int
    output_change: float  # |Y1 - Y0| / |Y0| on the probe batch
    change_after_1s: float  # the same, one second into the attack
    seconds_to_10pct: float | None  # until the output first moved by 10% (None: never)
    along_direction: float  # mean movement along d / mean output row norm
    param_change: float  # |p1 - p0| / |p0|
    errors: dict


def run_config(args, defence: str, honest: int) -> Row:
    hidden = args.hidden
    generator = torch.Generator().manual_seed(1)
    x_probe = torch.randn(PROBE_ROWS, hidden, generator=generator)
    x_attack = torch.randn(ATTACK_ROWS, hidden, generator=generator)
    direction = torch.randn(hidden, generator=generator)
    direction /= direction.norm()
    grad = (-args.grad * direction).expand(ATTACK_ROWS, hidden).contiguous()
    teacher = torch.randn(hidden, hidden, generator=generator) / hidden ** 0.5

    node = NodeHandle(hidden, OFF if defence == "off" else {})
    proxies = []
    try:
        y0, p0 = probe(node.endpoint, x_probe), torch.from_numpy(node.ask("params"))
        host, port = node.endpoint.rsplit(":", 1)
        proxies = [TcpProxy((host, int(port)), source=f"127.0.0.{2 + i}").start() for i in range(honest)]

        async def everyone():
            return await asyncio.gather(
                watch(node.endpoint, x_probe, y0, args.duration),
                attack(node.endpoint, x_attack, grad, args.duration, args.concurrency),
                *(train_honestly(f"127.0.0.1:{proxy.port}", 100 + i, teacher, args.duration, args.honest_rate)
                  for i, proxy in enumerate(proxies)))

        seen, attacker, *trainers = asyncio.run(everyone())
        y1, p1 = probe(node.endpoint, x_probe), torch.from_numpy(node.ask("params"))
        stats = node.ask("stats")
    finally:
        for proxy in proxies:
            proxy.shutdown()
        node.stop()
    peers = stats["peers"]
    attacker_steps, _ = peers.get("127.0.0.1", (0.0, 0))
    honest_accounts = [peers.get(f"127.0.0.{2 + i}", (0.0, 0)) for i in range(honest)]
    errors = collections.Counter(attacker["errors"])
    for trainer in trainers:
        errors.update(trainer["errors"])
    return Row(
        defence=defence, honest_peers=honest, attacker_calls=attacker["calls"],
        attacker_steps=attacker_steps, expert_steps=stats["version"],
        attacker_share=attacker_steps / max(1, stats["version"]),
        honest_steps=sum(s for s, _ in honest_accounts), honest_skipped=sum(k for _, k in honest_accounts),
        output_change=float((y1 - y0).norm() / y0.norm()),
        change_after_1s=next((change for t, change in seen if t >= 1.0), float("nan")),
        seconds_to_10pct=first_time_above(seen, 0.1),
        along_direction=float(((y1 - y0) @ direction).mean() / y0.norm(dim=1).mean()),
        param_change=float((p1 - p0).norm() / p0.norm()), errors=dict(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of attack per configuration")
    parser.add_argument("--honest", type=int, default=3, help="honest trainers beside the attacker")
    parser.add_argument("--honest-rate", type=float, default=2.0,
                        help="steps per second of each honest trainer")
    parser.add_argument("--hidden", type=int, default=256, help="the expert's hidden dimension")
    parser.add_argument("--grad", type=float, default=1e-3, help="the attacker's gradient, per element")
    parser.add_argument("--concurrency", type=int, default=8, help="the attacker's calls in flight")
    parser.add_argument("--only", choices=("alone", "honest"), help="run only these configurations")
    args = parser.parse_args()

    rows = []
    honest_counts = {"alone": (0,), "honest": (args.honest,)}.get(args.only, (0, args.honest))
    for honest in honest_counts:
        for defence in ("off", "default"):
            print(f"defence {defence}, {honest} honest peers: {args.duration:g} s ...", flush=True)
            rows.append(run_config(args, defence, honest))

    scale = 60.0 / args.duration
    print(f"\none attacker, {args.duration:g} s of Backward calls (per-minute columns: x{scale:g}); "
          f"expert ffn hidden {args.hidden}, Adam lr 1e-3; honest peers at {args.honest_rate:g} steps/s\n")
    header = (f"{'defence':8} {'honest':>6} {'calls/min':>10} {'att.steps/min':>13} {'share':>6} "
              f"{'honest steps':>12} {'skipped':>7} {'output':>8} {'along d':>8} {'params':>8} {'out@1s':>8} "
              f"{'s->10%':>7}")
    print(header)
    for r in rows:
        print(f"{r.defence:8} {r.honest_peers:6d} {r.attacker_calls * scale:10.0f} "
              f"{r.attacker_steps * scale:13.0f} {r.attacker_share:6.2f} {r.honest_steps:12.0f} "
              f"{r.honest_skipped:7d} {r.output_change:8.3f} "
              f"{r.along_direction:8.3f} {r.param_change:8.4f} {r.change_after_1s:8.3f} "
              f"{r.seconds_to_10pct if r.seconds_to_10pct is not None else float('nan'):7.2f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    write_report(RESULTS_DIR / "bench_influence.json", {
        "args": vars(args), "per_minute_scale": scale, "rows": [dataclasses.asdict(r) for r in rows]})


if __name__ == "__main__":
    main()
