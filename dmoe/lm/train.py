"""Training the MoE language model through the client: TrainConfig and Trainer (``dmoe train``).

The Trainer owns the corpus, the model (:class:`dmoe.lm.model.MoELM` with RemoteMoE layers on a swarm,
or LocalMoE layers with ``local``), an Adam optimizer over the client-side parameters (the experts'
optimizers run on their nodes), periodic held-out evaluation, atomic checkpoints of the
client-side parameters and optimizer (safetensors, with ``resume``), and, with ``run_id``, the
asynchronous averaging of the client-side parameters with the other trainers of that run.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dmoe.core.checkpoint import CheckpointStore, TrainingState
from dmoe.core.logsafe import printable
from dmoe.core.modelspec import ModelSpec, SpecPublisher
from dmoe.errors import CheckpointError, ConfigError
from dmoe.lm.config import LMConfig, TrainConfig
from dmoe.lm.data import ByteCorpus
from dmoe.lm.model import MoELM, local_moe_factory, remote_moe_factory
from dmoe.lm.overlap import StepsInFlight

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "client"  # <save>/client/<step>.safetensors (layout: dmoe.core.checkpoint.TrainingState)
RNG_TENSOR = "rng.data"  # the data order's generator state, saved with the model


class Trainer:
    """``with Trainer(config) as trainer: trainer.train()``."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.step = 0
        self.swarm = None
        self.averager = None
        self.spec_publisher = None  # re-stores this model's spec in the swarm (dmoe.core.modelspec)
        self.num_failed_calls = 0
        self.history: list[dict] = []
        self._store = None
        self._saved_step = -1
        self._make_model: Callable[[], MoELM] | None = None
        self._in_flight: StepsInFlight[dict] | None = None  # with steps_in_flight > 1
        self._last_end = 0.0  # when the last overlapped step ended (perf_counter)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Trainer:
        config = self.config
        self.corpus = ByteCorpus.load(config.data)
        self.heldout = self.corpus.heldout_batches(config.batch_size, config.seq_len, config.eval_batches)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        try:
            self.model = self._build_model()
            if self.swarm is not None:
                self._publish_model()
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
            if config.steps_in_flight > 1:  # replicas of the model, each running a step at once
                self._in_flight = StepsInFlight(self.model, self._make_model, apply=self._apply_gradients,
                                                in_flight=config.steps_in_flight, on_end=_hand_routing)
            if config.save:
                self._store = CheckpointStore(config.save, keep=2)
            if config.resume and self._store is not None:
                self._load()
            if self.averager is not None:
                if not config.resume or self.step == 0:
                    self.averager.catch_up(timeout=10.0)
                self.averager.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _build_model(self) -> MoELM:
        config = self.config
        if config.ffn == "dense":
            self._make_model = lambda: MoELM(config.model_config)
            return self._make_model()
        if config.local:
            self._make_model = lambda: MoELM(config.model_config, local_moe_factory())
            return self._make_model()
        from dmoe.client.swarm import Swarm

        # The averager forks (see dmoe.lm.averaging): it is created after the model, whose RemoteMoE
        # layers only need the Swarm object, and before the Swarm starts its DHT peer's thread.
        swarm = Swarm(config.swarm)
        try:
            torch.manual_seed(config.seed)
            factory = remote_moe_factory(
                swarm, k_min=config.k_min, forward_timeout=config.forward_timeout,
                timeout_after_k_min=config.timeout_after_k_min, backward_timeout=config.backward_timeout,
                compression=config.compression,
                # a node that joins later serving a uid of this model with other sizes is not called
                expert_schema=model_spec(config).expert_schema)
            self._make_model = lambda: MoELM(config.model_config, factory)
            model = self._make_model()
            if config.run_id is not None:
                from dmoe.lm.averaging import ParameterAverager

                client_side = [p for name, p in model.named_parameters() if ".experts." not in name]
                self.averager = ParameterAverager(client_side, peer=swarm.peer, run_id=config.run_id,
                                                  interval=config.average_interval,
                                                  aggregate=config.average_aggregate,
                                                  clip_tau=config.average_clip_tau,
                                                  clip_iterations=config.average_clip_iterations)
            self.swarm = swarm.start()
            if config.publish_demand:  # the tokens/s each layer's gate routes to each expert, in the DHT
                from dmoe.core.demand import DemandPublisher
                from dmoe.moe.remote import RemoteMoE

                publisher = DemandPublisher(swarm.peer, interval=config.demand_interval)
                for layer in model.modules():
                    if isinstance(layer, RemoteMoE):
                        layer.publish_demand(publisher)
        except BaseException:
            swarm.peer.shutdown()  # a peer that never started only closes its event loop
            raise
        if self.averager is not None:
            self.averager.connect()
        return model

    def _publish_model(self) -> None:
        """Refuse a swarm whose nodes serve this model's uids with another schema (class, sizes, dtype)
        and none with this one; then publish the model's spec, so that nodes started with --model build
        its experts. Where some replica has this model's schema, the others are only warned of (the
        client skips them): one record of another schema, which anyone may announce, does not stop a
        trainer."""
        from dmoe.core.records import find_experts

        spec = model_spec(self.config)
        ours, matching, other = spec.expert_schema, 0, []
        for uid, replicas in find_experts(self.swarm.peer, spec.uids).items():
            for record in replicas:
                theirs = record.expert_schema
                if theirs and theirs != ours:
                    other.append(f"node {printable(record.node_id)} at {printable(record.endpoint)} serves "
                                 f"{uid} as {printable(theirs)}, but this model needs {ours}")
                else:
                    matching += 1
        if other and not matching:
            raise ConfigError(f"{other[0]}: restart that node with --model {spec.name} (or the matching "
                              f"sizes), or train with the sizes it serves")
        for line in other[:8]:
            logger.warning("%s; its replicas are skipped", line)
        self.spec_publisher = SpecPublisher(self.swarm.peer, spec).start()

    def shutdown(self) -> None:
        if self._in_flight is not None:  # its steps need the swarm: they end first
            self._in_flight.close()
            self._in_flight = None
        if self.spec_publisher is not None:
            self.spec_publisher.stop()
            self.spec_publisher = None
        if self.averager is not None:
            self.averager.shutdown()
            self.averager = None
        if self.swarm is not None:
            self.swarm.shutdown()
            self.swarm = None

    def __enter__(self) -> Trainer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- training --------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One training step, start to end (with steps_in_flight > 1, :meth:`train` overlaps them)."""
        config = self.config
        self._apply_averaged()
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self.corpus.batch(config.batch_size, config.seq_len, self.generator)
        record = _forward_backward(self.model, x, y)
        self._apply_gradients()
        return self._ended(record, time.perf_counter() - started)

    def _apply_averaged(self) -> None:
        if self.averager is not None and self.averager.apply_pending():
            self._log({"step": self.step, "averaged_with": self.averager.last_group_size,
                       "time": time.time()})

    def _apply_gradients(self) -> None:
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _ended(self, record: dict, elapsed: float, pace: float | None = None) -> dict:
        """A step's record, once its gradients are applied: ``seconds`` is the time it took alone, or
        with steps in flight the time since the step before it ended (their sum is the time spent, but
        steps that end together, as at an evaluation, get nearly none); ``tokens_per_s`` is its tokens
        over ``pace`` (with steps in flight, the mean of the last few steps' ``seconds``), or over
        ``seconds``."""
        self.step += 1
        self.num_failed_calls += record["failed_calls"]
        record = {
            "step": self.step, **record, "tokens_per_s": record.pop("tokens") / (pace or elapsed),
            "seconds": elapsed,
            # nodes whose replicas were skipped (lately) for serving a uid of this model with another schema
            "skipped_nodes": len(self.swarm.skipped_nodes()) if self.swarm is not None else 0,
            "time": time.time(),
        }
        self._log(record)
        return record

    def _overlapped_steps(self, on_step: Callable[[dict], None] | None, until: int,
                          out_of_time: Callable[[], bool]) -> None:
        """Steps up to ``until`` (or out of time), ``steps_in_flight`` at once, all ended on return."""
        assert self._in_flight is not None
        config, pipeline = self.config, self._in_flight
        self._last_end = time.perf_counter()
        recent: collections.deque[float] = collections.deque(maxlen=config.steps_in_flight)

        def ended(records: list[dict]) -> None:
            for record in records:
                now = time.perf_counter()
                recent.append(now - self._last_end)
                record = self._ended(record, recent[-1], pace=sum(recent) / len(recent))
                self._last_end = now
                if on_step is not None:
                    on_step(record)

        while self.step + pipeline.num_in_flight < until and not out_of_time():
            self._apply_averaged()
            x, y = self.corpus.batch(config.batch_size, config.seq_len, self.generator)
            ended(pipeline.submit(lambda model, x=x, y=y: _forward_backward(model, x, y)))
        ended(pipeline.drain())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy (nats per byte) on the fixed held-out batches."""
        self.model.eval()
        losses = [float(self.model.loss(x, y)[1]) for x, y in self.heldout]
        loss = sum(losses) / len(losses)
        self._log({"step": self.step, "heldout_loss": loss, "time": time.time()})
        return loss

    def train(self, on_step: Callable[[dict], None] | None = None,
              on_eval: Callable[[int, float], None] | None = None) -> float:
        """Run up to config.steps (or config.max_time seconds); returns the final held-out loss. A run
        that starts at step 0 is evaluated first, so that its log shows where it began."""
        config = self.config
        if self.step == 0 and self.step < config.steps:
            loss = self.evaluate()
            if on_eval is not None:
                on_eval(self.step, loss)
        started = time.monotonic()

        def out_of_time() -> bool:
            return bool(config.max_time) and time.monotonic() - started >= config.max_time

        while self.step < config.steps and not out_of_time():
            if self._in_flight is not None:  # up to the next evaluation or checkpoint, overlapped
                until = config.steps
                for every in (config.eval_interval, config.save_interval if self._store is not None else 0):
                    if every:
                        until = min(until, (self.step // every + 1) * every)
                self._overlapped_steps(on_step, until, out_of_time)
            else:
                record = self.train_step()
                if on_step is not None:
                    on_step(record)
            if (config.eval_interval and self.step % config.eval_interval == 0 and self.step < config.steps
                    and not out_of_time()):
                loss = self.evaluate()
                if on_eval is not None:
                    on_eval(self.step, loss)
            if self._store is not None and self.step % config.save_interval == 0:
                self.save()
        loss = self.evaluate()
        if on_eval is not None:
            on_eval(self.step, loss)
        if self._store is not None and self._saved_step != self.step:
            self.save()
        return loss

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.metrics_file:
            with open(self.config.metrics_file, "a") as file:
                file.write(json.dumps(record) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self) -> Path:
        """Client-side parameters (and local experts), optimizer state and data-order RNG, atomically."""
        assert self._store is not None
        state = TrainingState(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                              step=self.step, config=self.config.model_config.to_dict(),
                              tensors={RNG_TENSOR: self.generator.get_state()})
        path = self._store.save_state(CHECKPOINT_NAME, state)
        self._saved_step = self.step
        logger.info("checkpoint of step %d written to %s", self.step, path)
        return path

    def _load(self) -> None:
        assert self._store is not None
        loaded = self._store.load_state(CHECKPOINT_NAME)
        if loaded is None:
            logger.info("no checkpoint in %s: starting from step 0", self.config.save)
            return
        state, path = loaded
        if state.config != self.config.model_config.to_dict():
            raise CheckpointError(f"{path} holds a model of another shape: {state.config}")
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.generator.set_state(state.tensors[RNG_TENSOR])
        self.step = state.step
        logger.info("resumed from %s at step %d", path, self.step)


def _forward_backward(model: MoELM, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Loss and gradients of one batch into ``model``'s ``.grad``; what its record says of it."""
    model.train()
    loss, ce = model.loss(x, y)
    loss.backward()
    layers = model.moe_layers()
    return {
        "loss": float(ce), "tokens": x.numel(),
        "live_experts": sum(len(layer.last_routing[0]) if layer.last_routing else 0 for layer in layers),
        "failed_calls": sum(layer.last_num_failed for layer in layers),
    }


def _hand_routing(master: MoELM, replica: MoELM) -> None:
    """The tokens a replica's gates routed in a step, added to the master's counters (which the demand
    published from the master's layers reads)."""
    for mine, theirs in zip(replica.moe_layers(), master.moe_layers()):
        theirs.routed_tokens += mine.routed_tokens
        mine.routed_tokens.zero_()


def load_checkpoint(checkpoint_dir: str) -> tuple[LMConfig, dict[str, torch.Tensor], int]:
    """(model config, client-side parameters, step) of the newest checkpoint in a --save directory."""
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"no checkpoint directory {checkpoint_dir}")
    loaded = CheckpointStore(checkpoint_dir, keep=2, writer=False).load_state(CHECKPOINT_NAME)
    if loaded is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir} (was it written by dmoe train --save?)")
    state, _ = loaded
    return LMConfig.from_dict(state.config), state.model, state.step


def model_spec(config: LMConfig) -> ModelSpec:
    """The spec ``dmoe train`` publishes for its model, named after its uid prefix: a grid per MoE
    layer, ffn experts of d_model x expert_inner, float32, trained by the nodes' default optimizer (the
    spec's defaults: adam, lr 1e-3, gradients clipped to 1, seed 0)."""
    return ModelSpec.from_values({"name": config.prefix, "experts": config.expert_patterns(),
                                  "expert_cls": "ffn", "hidden_dim": config.d_model,
                                  "inner_dim": config.expert_inner, "version": 1})
