"""Training and inference through the client: the LM learns over a real two-node swarm,
checkpoints resume exactly, two trainers average, inference survives a node killed mid-generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from swarm_fixtures import HERE, wait_for

from dmoe.client.config import SwarmConfig
from dmoe.client.swarm import Swarm
from dmoe.errors import CheckpointError
from dmoe.lm.config import InferConfig, TrainConfig
from dmoe.lm.infer import generate, load_model
from dmoe.lm.model import MoELM
from dmoe.lm.train import Trainer, load_checkpoint
from dmoe.moe.gating import MoELayer

pytestmark = pytest.mark.timeout(240)
MODEL = dict(d_model=32, num_heads=2, num_layers=2, num_experts=4, expert_inner=64, seq_len=32)


def node_args(first: int, last: int) -> list[str]:
    args = ["--hidden-dim", str(MODEL["d_model"]), "--inner-dim", str(MODEL["expert_inner"]), "--lr", "3e-3"]
    for layer in range(MODEL["num_layers"]):
        args += ["--experts", f"lm{layer}.[{first}:{last}]"]
    return args


@pytest.fixture
def two_nodes(node_factory):
    a = node_factory(*node_args(0, 2), name="a")
    b = node_factory(*node_args(2, 4), "--swarm", a.swarm[0], name="b")
    return a, b


def test_training_over_a_two_node_swarm_lowers_the_held_out_loss(two_nodes, tmp_path):
    a, b = two_nodes
    # no call may fail: every answer is awaited up to the forward's deadline, not 1 s past the first
    config = TrainConfig(**MODEL, swarm=SwarmConfig(initial_peers=a.swarm), steps=25, batch_size=8, lr=3e-3,
                         eval_interval=0, timeout_after_k_min=30, save=str(tmp_path / "run"),
                         metrics_file=str(tmp_path / "metrics.jsonl"))
    with Trainer(config) as trainer:
        before = trainer.evaluate()
        after = trainer.train()
        assert trainer.num_failed_calls == 0
    assert after < before - 0.3, (before, after)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 26))
    assert all(r["live_experts"] == 8 and r["failed_calls"] == 0 for r in steps)
    _, state, step = load_checkpoint(str(tmp_path / "run"))
    assert step == 25 and not any(".experts." in name for name in state)  # the experts stay on the nodes


def test_steps_in_flight_train_over_the_swarm_and_end_before_each_evaluation_and_save(two_nodes, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr("dmoe.lm.overlap.WARMUP_STEPS", 0)  # steps in flight from the first
    a, b = two_nodes
    config = TrainConfig(**MODEL, swarm=SwarmConfig(initial_peers=a.swarm), steps=25, batch_size=8, lr=3e-3,
                         eval_interval=10, save_interval=8, timeout_after_k_min=30, steps_in_flight=2,
                         save=str(tmp_path / "run"), metrics_file=str(tmp_path / "metrics.jsonl"),
                         publish_demand=False)
    saved = []
    with Trainer(config) as trainer:
        save = trainer.save
        trainer.save = lambda: saved.append((trainer.step, trainer._in_flight.num_in_flight)) or save()
        evaluated = []
        after = trainer.train(on_eval=lambda step, loss: evaluated.append(
            (step, trainer._in_flight.num_in_flight, loss)))
        assert trainer.num_failed_calls == 0
        routed = [int(layer.routed_tokens.sum()) for layer in trainer.model.moe_layers()]
    # each evaluation and checkpoint sees every step before it ended, none in flight
    assert [(step, pending) for step, pending, _ in evaluated] == [(0, 0), (10, 0), (20, 0), (25, 0)]
    assert saved == [(8, 0), (16, 0), (24, 0), (25, 0)]
    assert after < evaluated[0][2] - 0.3, evaluated
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 26))
    assert all(r["live_experts"] == 8 and r["failed_calls"] == 0 for r in steps)
    # the replicas' gates routed every token of every step to k experts, counted on the master's layers
    # (with those of its 4 evaluations of 4 held-out batches)
    assert routed == [(25 + 4 * 4) * 8 * MODEL["seq_len"] * 2] * MODEL["num_layers"]
    assert load_checkpoint(str(tmp_path / "run"))[2] == 25


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    """--local is deterministic: 6 steps, save, resume, 6 more equals 12 steps straight."""
    common = dict(**MODEL, local=True, batch_size=4, eval_interval=0, save_interval=3, data="stdlib")
    with Trainer(TrainConfig(**common, steps=12, save=str(tmp_path / "straight"))) as straight:
        straight.train()
        expected = {k: v.clone() for k, v in straight.model.state_dict().items()}
    with Trainer(TrainConfig(**common, steps=6, save=str(tmp_path / "split"))) as first:
        first.train()
    with Trainer(TrainConfig(**common, steps=12, save=str(tmp_path / "split"), resume=True)) as second:
        assert second.step == 6
        second.train()
        assert second.history[0]["step"] == 7
        for name, value in second.model.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    common = dict(local=True, batch_size=2, eval_interval=0, steps=1, save=str(tmp_path / "run"))
    with Trainer(TrainConfig(**MODEL, **common)) as trainer:
        trainer.train()
    with pytest.raises(CheckpointError, match="another shape"):
        Trainer(TrainConfig(**{**MODEL, "d_model": 64}, **common, resume=True)).start()


def client_params(seed: int) -> dict[str, torch.Tensor]:
    """The client-side parameters a trainer with this seed starts from (its gates are a RemoteMoE's)."""
    from dmoe.lm.config import LMConfig

    torch.manual_seed(seed)
    config = LMConfig(**MODEL)
    model = MoELM(config, lambda c, i: MoELayer(prefix=c.layer_prefix(i), grid=(c.num_experts,),
                                               in_features=c.d_model, k=c.k))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] - b[k]).square().sum() for k in a)) ** 0.5


def start_trainer(tmp_path, name: str, swarm: list[str], seed: int, steps: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "dmoe", "train", "--run-id", "pair", "--average-interval", "2",
            "--seed", str(seed), "--steps", str(steps), "--batch-size", "4", "--lr", "1e-5",
            "--eval-interval", "0", "--save-interval", "1", "--save", str(tmp_path / name),
            "--metrics-file", str(tmp_path / f"{name}.jsonl")]
    for key, value in MODEL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    for address in swarm:
        args += ["--swarm", address]
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=HERE)


def process_group(pgid: int) -> list[str]:
    """The command names of the processes in a process group (read from /proc)."""
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid:
            names.append(text[text.index("(") + 1:text.rindex(")")])
    return names


def events(tmp_path, name: str) -> list[dict]:
    path = tmp_path / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(300)
def test_two_trainers_average_and_one_survives_the_other_being_killed(two_nodes, tmp_path):
    """Trainers with different seeds start far apart; after an averaging round their client-side
    parameters are close (lr is tiny, so only averaging moves them far). Then b is killed (-9):
    a goes on and finishes all its steps."""
    a_node, _ = two_nodes
    far = distance(client_params(0), client_params(1))
    trainers = {"t0": start_trainer(tmp_path, "t0", a_node.swarm, 0, 100000),
                "t1": start_trainer(tmp_path, "t1", a_node.swarm, 1, 100000)}
    try:
        def averaged(name):
            if trainers[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")
            return [e["step"] for e in events(tmp_path, name) if e.get("averaged_with") == 2]

        wait_for(lambda: averaged("t0") and averaged("t1"), 120, "an averaging round of both trainers")
        # a checkpoint of each written after the round was applied
        wait_for(lambda: all(max(e["step"] for e in events(tmp_path, n) if "loss" in e) > averaged(n)[0] + 1
                             for n in trainers), 60, "a step past the round")
        _, t0_state, _ = load_checkpoint(str(tmp_path / "t0"))
        _, t1_state, _ = load_checkpoint(str(tmp_path / "t1"))
        near = distance(t0_state, t1_state)
        print(f"parameter distance: {far:.3f} at the start, {near:.4f} after averaging")
        assert near < 0.2 * far, (near, far)
        # one DHT stack per trainer: the averager uses the trainer's DHT peer and its libp2p daemon
        for proc in trainers.values():
            names = process_group(proc.pid)
            assert names.count("p2pd") == 1 and len(names) == 3, names  # trainer, averager, daemon

        os.killpg(trainers["t1"].pid, signal.SIGKILL)  # the trainer, its averager and its libp2p daemon
        trainers["t1"].wait(10)
        killed_at = max(e["step"] for e in events(tmp_path, "t0") if "loss" in e)
        wait_for(lambda: max(e["step"] for e in events(tmp_path, "t0") if "loss" in e) > killed_at + 30, 90,
                 "t0 to go on training without t1")
        assert trainers["t0"].poll() is None
        trainers["t0"].terminate()
        assert trainers["t0"].wait(60) == 130
        assert "stopped at step" in (tmp_path / "t0.log").read_text()
    finally:
        for proc in trainers.values():
            if proc.poll() is None:
                proc.terminate()  # a graceful stop shuts its averager and DHT peer down
        for proc in trainers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
            except ProcessLookupError:
                pass
            proc.wait(10)


def test_inference_goes_on_when_a_node_is_killed_mid_generation(two_nodes, tmp_path, monkeypatch):
    """b is killed once some bytes are out: the generation ends with all its bytes, and b, once a call
    to it failed, is asked nothing more (so no later byte waits on it)."""
    a, b = two_nodes
    config = TrainConfig(**MODEL, swarm=SwarmConfig(initial_peers=a.swarm), steps=3, batch_size=4,
                         eval_interval=0, save=str(tmp_path / "run"))
    with Trainer(config) as trainer:
        trainer.train()
    # a failed endpoint is avoided for the rest of the test
    with Swarm(SwarmConfig(initial_peers=a.swarm, cache_ttl=60, ban_base=600, ban_max=600)) as swarm:
        model = load_model(InferConfig(checkpoint=str(tmp_path / "run"), forward_timeout=3.0), swarm)
        # warm, both nodes answer: greedy bytes are the model's argmax after each context
        tokens = list(b"def ")
        with torch.no_grad():
            for _ in range(5):
                tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        written = bytes(tokens[4:]).decode("utf-8", errors="replace")
        assert generate(model, "def ", 5, temperature=0) == written
        assert sum(layer.num_failed_calls for layer in model.moe_layers()) == 0

        events: list[tuple[str, str]] = []  # ("request" | "failed", endpoint), in order
        from dmoe.client import dispatch

        build, enqueue = dispatch.Dispatcher._request, dispatch.Dispatcher._enqueue
        report = swarm.health.report

        def request(dispatcher, call, *args, **kwargs):  # a call of its own
            events.append(("request", call.endpoint))
            return build(dispatcher, call, *args, **kwargs)

        def queued(dispatcher, call, *args, **kwargs):  # a part of a node's batched or packed call
            events.append(("request", call.endpoint))
            return enqueue(dispatcher, call, *args, **kwargs)

        def reported(endpoint, uid, error):
            if error is not None:
                events.append(("failed", endpoint))
            report(endpoint, uid, error)

        monkeypatch.setattr(dispatch.Dispatcher, "_request", request)
        monkeypatch.setattr(dispatch.Dispatcher, "_enqueue", queued)
        monkeypatch.setattr(swarm.health, "report", reported)
        first_layer = model.moe_layers()[0]
        routed = int(first_layer.routed_tokens.sum())
        result: dict = {}
        generation = threading.Thread(target=lambda: result.update(tokens=model.generate(list(b"def "), 150)))
        generation.start()
        # some bytes in (each new byte routes its one token to k=2 experts per layer)
        wait_for(lambda: int(first_layer.routed_tokens.sum()) >= routed + 2 * 10, 60, "the first bytes")
        b.kill()
        generation.join(120)
        assert not generation.is_alive()
        assert len(result["tokens"]) == 150
        assert sum(layer.num_failed_calls for layer in model.moe_layers()) > 0  # b's experts were dropped
        at_b = [kind for kind, endpoint in events if endpoint == b.endpoint]
        assert "failed" in at_b and "request" not in at_b[at_b.index("failed"):], at_b
