"""ChaosRun: a swarm on this machine that trains while its nodes are killed, frozen and cut off.

A coordinator, ``nodes`` nodes and ``trainers`` trainers (``dmoe train`` with averaging) run as
separate processes, each in a process group of its own. One node lives in a network namespace
(:class:`dmoe.testing.netlab.NetLab`) so that it can be cut off the network; everything else listens on
the lab's host-side address, which that node can reach. While the trainers train, a controller
picks, every ``fault_interval`` seconds on average (exponential gaps, seeded), a healthy node and
either kills its process group with SIGKILL (the node is restarted ``down_time`` seconds later, from
its checkpoints) or freezes it with SIGSTOP (SIGCONT ``stop_time`` later), in turns; ``cuts`` times,
it takes the namespace's link down for ``cut_for`` seconds. At most ``max_faulty`` nodes are out at
once (a cut that is due goes ahead regardless), and no node is killed in the last ``no_kills_for``
seconds, so that the last restart is seen serving again.
After ``duration`` seconds every node is brought back and the trainers run ``calm`` seconds more.

The controller records what it did and checks what must hold: after each kill every checkpoint
file of the node still parses and its newest versions are what the restarted node reports it
restored (its ready file); a node restarted is asked (Info) whether it served calls again.
:meth:`ChaosRun.run` returns a report (a dict, JSON-ready); the chaos test and
``benchmarks/bench_chaos.py`` read it. Needs root (network namespaces).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from dmoe.core.checkpoint import scan_checkpoints
from dmoe.proto import expert_pb2 as pb
from dmoe.proto import expert_pb2_grpc as pbg
from dmoe.testing.netlab import NetLab
from dmoe.testing.process import stop_process_group

logger = logging.getLogger(__name__)

START_TIMEOUT = 90.0
# what an exception that escaped leaves in a trainer's log: a thread's, or the CLI's error line
UNHANDLED = re.compile(r"^(Exception in thread|Error: )", re.MULTILINE)


@dataclasses.dataclass(kw_only=True, slots=True)
class ChaosConfig:
    nodes: int = 4  # nodes; the last one lives in the network namespace
    trainers: int = 2  # trainers of one run, averaging their client-side parameters
    duration: float = 40.0  # seconds of faults, counted from the trainers' first steps
    calm: float = 15.0  # seconds of training with every node back, after the faults
    fault_interval: float = 3.0  # mean seconds between two faults
    max_faulty: int = 2  # nodes killed, frozen or cut off at one time, at most
    down_time: tuple[float, float] = (1.0, 4.0)  # a killed node restarts after this many seconds (uniform)
    stop_time: tuple[float, float] = (1.0, 5.0)  # a frozen node is resumed after this many seconds
    cuts: int = 1  # times the namespace is cut off, spread evenly over ``duration``
    cut_at: float = 0.4  # when in its share of ``duration`` each cut begins (a fraction)
    cut_for: float = 8.0  # seconds it stays cut off
    no_kills_for: float = 10.0  # no kill in the last seconds of ``duration``: the last restart gets used
    seed: int = 0
    # the model and its experts: num_experts per layer, spread evenly over the nodes
    num_layers: int = 2
    num_experts: int = 8
    d_model: int = 32
    expert_inner: int = 64
    seq_len: int = 32
    batch_size: int = 8
    lr: float = 3e-3
    eval_interval: int = 20
    # the client's deadlines, which bound a step
    forward_timeout: float = 2.0
    timeout_after_k_min: float = 0.5
    backward_timeout: float = 2.0
    lookup_timeout: float = 2.0
    # the nodes' DHT records and checkpoints
    heartbeat_interval: float = 1.0
    record_ttl: float = 4.0
    checkpoint_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.nodes < 2 or self.trainers < 1:
            raise ValueError("need at least 2 nodes and 1 trainer")
        if self.num_experts % self.nodes:
            raise ValueError(f"num_experts ({self.num_experts}) must be a multiple of nodes ({self.nodes})")
        if self.cuts < 0:
            raise ValueError("cuts must be >= 0")
        if not 1 <= self.max_faulty < self.nodes:
            raise ValueError("max_faulty must be in 1 .. nodes - 1")
        if (min(self.duration, self.fault_interval, self.cut_for) <= 0
                or min(self.calm, self.no_kills_for) < 0):
            raise ValueError("need duration, fault_interval, cut_for > 0 and calm, no_kills_for >= 0")
        if not 0 <= self.cut_at < 1:
            raise ValueError("cut_at is a fraction of duration, in [0, 1)")
        for low, high in (self.down_time, self.stop_time):
            if not 0 <= low <= high:
                raise ValueError("down_time and stop_time are (low, high) with 0 <= low <= high")

    @property
    def step_bound_s(self) -> float:
        """The longest a training step may take by the client's deadlines: per MoE layer, one expert
        lookup, one forward and one backward, each cut at its timeout (the compute on top is not
        in it: callers add an allowance for their machine)."""
        per_layer = (self.lookup_timeout + self.forward_timeout + self.timeout_after_k_min
                     + self.backward_timeout)
        return self.num_layers * per_layer


@dataclasses.dataclass(slots=True)
class _Member:
    """One process of the swarm, restartable."""

    name: str
    argv: list[str]
    log_path: Path
    ready_path: Path | None = None
    in_lab: bool = False
    proc: subprocess.Popen | None = None
    ready: dict = dataclasses.field(default_factory=dict)
    state: str = "down"  # starting, up, killed, stopped, cut
    until: float = 0.0  # when the current fault ends
    incarnations: int = 0
    on_disk: dict[str, int] = dataclasses.field(default_factory=dict)  # newest checkpoint versions
                                                                       # at the kill


class ChaosRun:
    def __init__(self, config: ChaosConfig, workdir: str | os.PathLike, *, verbose: bool = True):
        self.config, self.workdir, self.verbose = config, Path(workdir), verbose
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.random = random.Random(config.seed)
        self.lab: NetLab | None = None
        self.coordinator: _Member | None = None
        self.nodes: list[_Member] = []
        self.trainers: list[_Member] = []
        self.events: list[dict] = []
        self.restarts: list[dict] = []
        self.corrupt: list[str] = []
        self.started = time.monotonic()
        self.wall_started = time.time()  # events' "t" are seconds after this
        self.trainers_done: float | None = None
        self._next_check = 0.0
        self._env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    # ---- the run -------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self._start_swarm()
            self._chaos()
            self._calm()
            return self._report()
        finally:
            self._stop_all()

    def say(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        logger.info(line)
        if self.verbose:
            print(line, flush=True)

    def _event(self, kind: str, member: _Member, **fields) -> None:
        self.events.append({"t": round(time.monotonic() - self.started, 2), "kind": kind, "node": member.name,
                            **fields})
        self.say(f"{kind} {member.name} " + " ".join(f"{k}={v}" for k, v in fields.items()))

    # ---- start-up ------------------------------------------------------------------------------------
    def _start_swarm(self) -> None:
        c = self.config
        self.lab = NetLab().start()
        host = self.lab.outer_ip
        self.coordinator = _Member("coordinator", [sys.executable, "-m", "dmoe", "coordinator", "start",
                                                   "--host", host, "--http-port", "0"],
                                   self.workdir / "coordinator.log", self.workdir / "coordinator.json")
        self.coordinator.argv += ["--ready-file", str(self.coordinator.ready_path)]
        self._spawn(self.coordinator)
        self._wait_ready([self.coordinator])
        swarm = self.coordinator.ready["swarm"][0]
        per_node = c.num_experts // c.nodes
        for i in range(c.nodes):
            in_lab = i == c.nodes - 1
            name = f"node{i}"
            argv = [sys.executable, "-m", "dmoe", "node", "start",
                    "--host", self.lab.inner_ip if in_lab else host,
                    "--port", "0", "--device", "cpu", "--swarm", swarm, "--num-threads", "1",
                    "--hidden-dim", str(c.d_model), "--inner-dim", str(c.expert_inner), "--lr", str(c.lr),
                    "--checkpoint-dir", str(self.workdir / name / "checkpoints"),
                    "--checkpoint-interval", str(c.checkpoint_interval),
                    "--identity-path", str(self.workdir / name / "identity.key"),
                    "--heartbeat-interval", str(c.heartbeat_interval), "--record-ttl", str(c.record_ttl),
                    "--ready-file", str(self.workdir / name / "ready.json")]
            for layer in range(c.num_layers):
                argv += ["--experts", f"lm{layer}.[{i * per_node}:{(i + 1) * per_node}]"]
            (self.workdir / name).mkdir(exist_ok=True)
            self.nodes.append(_Member(name, argv, self.workdir / name / "node.log",
                                      self.workdir / name / "ready.json", in_lab=in_lab))
        for node in self.nodes:
            self._spawn(node)
        for t in range(c.trainers):
            name = f"trainer{t}"
            (self.workdir / name).mkdir(exist_ok=True)
            argv = [sys.executable, "-m", "dmoe", "train", "--swarm", swarm, "--host", host,
                    "--run-id", "chaos", "--seed", str(t), "--save", str(self.workdir / name / "checkpoints"),
                    "--save-interval", "50",
                    "--metrics-file", str(self.workdir / name / "metrics.jsonl"), "--steps", "1000000",
                    "--max-time", str(c.duration + c.calm), "--average-interval", "5",
                    "--batch-size", str(c.batch_size), "--lr", str(c.lr),
                    "--eval-interval", str(c.eval_interval), "--eval-batches", "2",
                    "--num-layers", str(c.num_layers), "--num-experts", str(c.num_experts),
                    "--d-model", str(c.d_model), "--num-heads", "2", "--expert-inner", str(c.expert_inner),
                    "--seq-len", str(c.seq_len), "--forward-timeout", str(c.forward_timeout),
                    "--timeout-after-k-min", str(c.timeout_after_k_min),
                    "--backward-timeout", str(c.backward_timeout),
                    "--lookup-timeout", str(c.lookup_timeout)]
            self.trainers.append(_Member(name, argv, self.workdir / name / "train.log"))
        for trainer in self.trainers:  # they start (import, join, averager) while the nodes do
            self._spawn(trainer)
        self._wait_ready(self.nodes)
        self.say(f"swarm up: coordinator and {len(self.nodes)} nodes ({self.nodes[-1].name} in namespace "
                 f"{self.lab.name} at {self.lab.inner_ip})")
        deadline = time.monotonic() + START_TIMEOUT
        while not all(self._metrics(t) for t in self.trainers):
            for trainer in self.trainers:
                if trainer.proc.poll() is not None:
                    raise RuntimeError(f"{trainer.name} exited with {trainer.proc.returncode} "
                                       f"before its first step (log: {trainer.log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the trainers made no step in {START_TIMEOUT:.0f}s")
            time.sleep(0.2)
        self.say("trainers are training: faults begin")

    def _spawn(self, member: _Member) -> None:
        if member.ready_path is not None:
            member.ready_path.unlink(missing_ok=True)
        with open(member.log_path, "ab") as log:
            kwargs = dict(stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env)
            if member.in_lab:
                assert self.lab is not None
                member.proc = self.lab.popen(member.argv, **kwargs)
            else:
                member.proc = subprocess.Popen(member.argv, start_new_session=True, **kwargs)
        member.state, member.ready = "starting", {}
        member.incarnations += 1

    def _poll_ready(self, member: _Member) -> bool:
        assert member.proc is not None and member.ready_path is not None
        if member.proc.poll() is not None:
            raise RuntimeError(f"{member.name} exited with {member.proc.returncode} (log: {member.log_path})")
        if not member.ready_path.exists():
            return False
        member.ready, member.state = json.loads(member.ready_path.read_text()), "up"
        return True

    def _wait_ready(self, members: list[_Member]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(m.state == "up" or self._poll_ready(m) for m in members):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {START_TIMEOUT:.0f}s: "
                                   + ", ".join(m.name for m in members if m.state != "up"))
            time.sleep(0.1)

    # ---- faults --------------------------------------------------------------------------------------
    def _chaos(self) -> None:
        c = self.config
        begin = time.monotonic()
        end = begin + c.duration
        next_fault = begin + self.random.expovariate(1 / c.fault_interval)
        cuts = [begin + (i + c.cut_at) * c.duration / c.cuts for i in range(c.cuts)]
        num_faults = 0
        lab_node = self.nodes[-1]
        while time.monotonic() < end and self._trainers_running():
            now = time.monotonic()
            self._heal(now)
            self._check_used()
            if cuts and now >= cuts[0] and lab_node.state == "up":  # a cut is due: not held back
                                                                    # by max_faulty
                self._cut(lab_node, now + c.cut_for)
                cuts.pop(0)
            elif now >= next_fault:
                next_fault = now + self.random.expovariate(1 / c.fault_interval)
                kill = num_faults % 2 == 0  # kills and freezes take turns; the node is drawn at random
                healthy = [n for n in self.nodes if n.state == "up"
                           and not (n is lab_node and cuts and now > cuts[0] - c.fault_interval)]
                if kill and now > end - c.no_kills_for:
                    continue
                if sum(n.state != "up" for n in self.nodes) >= c.max_faulty or not healthy:
                    continue
                node = self.random.choice(healthy)
                if kill:
                    self._kill(node, now + self.random.uniform(*c.down_time))
                else:
                    self._freeze(node, now + self.random.uniform(*c.stop_time))
                num_faults += 1
            time.sleep(0.05)

    def _kill(self, node: _Member, until: float) -> None:
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        node.state, node.until = "killed", until
        node.on_disk, corrupt = scan_checkpoints(self.workdir / node.name / "checkpoints")
        self.corrupt += corrupt
        self._event("kill -9", node, checkpoints=sum(1 for _ in node.on_disk), corrupt=len(corrupt))

    def _freeze(self, node: _Member, until: float) -> None:
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGSTOP)
        node.state, node.until = "stopped", until
        self._event("SIGSTOP", node, seconds=round(until - time.monotonic(), 1))

    def _cut(self, node: _Member, until: float) -> None:
        assert self.lab is not None
        self.lab.set_link(False)
        node.state, node.until = "cut", until
        self._event("cut off", node, seconds=round(until - time.monotonic(), 1))

    def _heal(self, now: float, force: bool = False) -> None:
        """End the faults that are due (all of them with force); notice restarted nodes that are ready."""
        for node in self.nodes:
            if node.state == "starting":
                if self._poll_ready(node):
                    self._restarted(node)
            elif node.state in ("killed", "stopped", "cut") and (force or now >= node.until):
                if node.state == "killed":
                    self._spawn(node)
                    self._event("restart", node)
                elif node.state == "stopped":
                    assert node.proc is not None
                    os.killpg(node.proc.pid, signal.SIGCONT)
                    node.state = "up"
                    self._event("SIGCONT", node)
                else:
                    assert self.lab is not None
                    self.lab.set_link(True)
                    node.state = "up"
                    self._event("reconnected", node)

    def _restarted(self, node: _Member) -> None:
        restored = {uid: int(v) for uid, v in node.ready.get("restored", {}).items()}
        ok = restored == node.on_disk
        self.restarts.append({"t": round(time.monotonic() - self.started, 2), "node": node.name,
                              "restored": restored, "on_disk": node.on_disk, "ok": ok, "served": None,
                              "incarnation": node.incarnations})
        self._event("ready again", node, restored_experts=len(restored), matches_disk=ok)

    def _check_used(self) -> None:
        """Once a second, ask restarted nodes (Info) whether they have served forward calls since."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        for restart in self.restarts:
            node = next(n for n in self.nodes if n.name == restart["node"])
            if not restart["served"] and node.state == "up" and node.incarnations == restart["incarnation"]:
                restart["served"] = node_forward_calls(node.ready.get("endpoint"), timeout=0.5)
                if restart["served"]:
                    restart["served_after_s"] = round(now - self.started - restart["t"], 1)

    def _calm(self) -> None:
        self._heal(time.monotonic(), force=True)
        deadline = time.monotonic() + START_TIMEOUT
        while any(n.state == "starting" for n in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"restarted nodes not ready after {START_TIMEOUT:.0f}s")
            self._heal(time.monotonic())
            time.sleep(0.1)
        self.say("faults over: every node is back; the trainers finish")
        deadline = time.monotonic() + self.config.calm + 120
        while self._trainers_running():
            if time.monotonic() > deadline:
                raise TimeoutError("the trainers did not finish")
            self._check_used()
            time.sleep(0.2)
        self.trainers_done = time.monotonic() - self.started

    def _trainers_running(self) -> bool:
        return any(t.proc is not None and t.proc.poll() is None for t in self.trainers)

    # ---- the report --------------------------------------------------------------------------------
    @staticmethod
    def _metrics(trainer: _Member) -> list[dict]:
        path = trainer.log_path.parent / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _report(self) -> dict:
        c = self.config
        trainers = []
        for trainer in self.trainers:
            records = self._metrics(trainer)
            steps = [r for r in records if "loss" in r]
            seconds = sorted(r["seconds"] for r in steps)
            log = trainer.log_path.read_text(errors="replace")
            unhandled = len(UNHANDLED.findall(log))
            trainers.append({
                "name": trainer.name, "exit_code": trainer.proc.returncode if trainer.proc else None,
                "unhandled_errors": unhandled, "steps": len(steps),
                "max_step_s": seconds[-1] if seconds else 0.0,
                "median_step_s": seconds[len(seconds) // 2] if seconds else 0.0,
                "p99_step_s": seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))] if seconds else 0.0,
                "failed_calls": sum(r["failed_calls"] for r in steps),
                "heldout": [[r["step"], r["heldout_loss"]] for r in records if "heldout_loss" in r],
                "loss": [[r["step"], r["loss"], r["time"]] for r in steps],
                "averaging_rounds": sum(1 for r in records if "averaged_with" in r),
            })
            self.corrupt += scan_checkpoints(trainer.log_path.parent / "checkpoints")[1]
        nodes = []
        for node in self.nodes:
            stats = node_forward_calls(node.ready.get("endpoint")) if node.state == "up" else None
            on_disk, corrupt = scan_checkpoints(self.workdir / node.name / "checkpoints")
            self.corrupt += corrupt
            nodes.append({"name": node.name, "in_namespace": node.in_lab, "incarnations": node.incarnations,
                          "forward_calls_since_start": stats, "checkpointed_experts": len(on_disk)})
        counts = {kind: sum(1 for e in self.events if e["kind"] == kind)
                  for kind in ("kill -9", "SIGSTOP", "cut off")}
        return {
            "config": dataclasses.asdict(c), "step_bound_s": c.step_bound_s, "faults": counts,
            "events": self.events, "restarts": self.restarts,
            "corrupt_checkpoints": sorted(set(self.corrupt)), "trainers": trainers,
            "nodes": nodes, "started_at": self.wall_started, "trainers_done_at": self.trainers_done,
            "seconds": round(time.monotonic() - self.started, 1),
        }

    def _stop_all(self) -> None:
        """SIGTERM to each process (as an init system would: a node withdraws its records and
        checkpoints), SIGKILL to its group after a grace period."""
        members = [*self.trainers, *self.nodes, *([self.coordinator] if self.coordinator else [])]
        live = [m for m in members if m.proc is not None and m.proc.poll() is None]
        for member in live:
            try:
                os.killpg(member.proc.pid, signal.SIGCONT)
                member.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for member in live:
            try:
                member.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            stop_process_group(member.proc, 1)
        if self.lab is not None:
            self.lab.close()
            self.lab = None


def node_forward_calls(endpoint: str | None, timeout: float = 10.0) -> int | None:
    """Forward calls the node at endpoint served since it started (its Info), or None if it does not
    answer."""
    if not endpoint:
        return None
    with grpc.insecure_channel(endpoint) as channel:
        try:
            info = pbg.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
    return sum(e.stats.forward_calls for e in info.experts)
