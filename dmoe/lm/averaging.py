"""ParameterAverager: trainers of one run average their client-side parameters, asynchronously.

The experts learn on their nodes; what each trainer holds itself (embeddings, attention, gates)
is averaged with the other trainers of the same run (``--run-id``) by hivemind's
``DecentralizedAverager``: all-reduce in groups found through the DHT, no central server.
A background thread snapshots the parameters every ``interval`` seconds and runs one averaging
round; the training loop never waits for it. When a round ends, the trainer applies
``average - snapshot`` to its parameters at the next step boundary, so what it learned meanwhile is
kept (as in local SGD with delayed averaging). A round whose peers vanish times out and is skipped.
A trainer that joins late first loads the averaged parameters from a peer (``catch_up``).

hivemind's DHT and averager run in forked processes: create this object before anything starts
gRPC threads in the process (the Trainer does).
"""

from __future__ import annotations

import logging
import threading

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.utils.auth import AuthorizerBase

from dmoe.core.addresses import listen_maddr

logger = logging.getLogger(__name__)


class ParameterAverager:
    def __init__(self, params: list[torch.nn.Parameter], *, initial_peers: list[str], run_id: str,
                 host: str = "127.0.0.1", interval: float = 10.0, matchmaking_time: float = 3.0,
                 round_timeout: float = 30.0, authorizer: AuthorizerBase | None = None):
        if interval <= 0 or matchmaking_time <= 0 or round_timeout <= 0:
            raise ValueError("interval, matchmaking_time and round_timeout must be positive")
        self.params, self.interval, self.round_timeout = params, interval, round_timeout
        self.num_rounds = self.num_failed_rounds = 0
        self.last_group_size = 0
        self._pending: list[torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        extra = {"authorizer": authorizer} if authorizer is not None else {}  # a private swarm's DHT
        self.dht = DHT(initial_peers=initial_peers, host_maddrs=[listen_maddr(host, 0)], start=True, **extra)
        try:
            self.averager = DecentralizedAverager(
                [p.detach().clone() for p in params], self.dht, prefix=f"dmoe_run_{run_id}", start=True,
                min_matchmaking_time=matchmaking_time, request_timeout=min(3.0, matchmaking_time),
                allreduce_timeout=round_timeout, target_group_size=None,
            )
        except BaseException:
            self.dht.shutdown()
            raise

    def catch_up(self, timeout: float = 30.0) -> bool:
        """Load the run's averaged parameters from a peer, if there is one. True if loaded."""
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return False
        _, tensors = loaded
        if len(tensors) != len(self.params) or any(t.shape != p.shape for t, p in zip(tensors, self.params)):
            logger.warning("a peer of this run sent parameters of another shape; not loading them")
            return False
        with torch.no_grad():
            for param, tensor in zip(self.params, tensors):
                param.copy_(tensor)
        logger.info("caught up: loaded the run's averaged parameters from a peer")
        return True

    def start(self) -> ParameterAverager:
        self._thread = threading.Thread(target=self._loop, name="dmoe-averager", daemon=True)
        self._thread.start()
        return self

    def apply_pending(self) -> bool:
        """At a step boundary: add the result of the last finished round. True if one was applied."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        with torch.no_grad():
            for param, delta in zip(self.params, pending):
                param.add_(delta)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._round()
            except Exception as e:  # a failed round is skipped; the next one may succeed
                self.num_failed_rounds += 1
                logger.info("averaging round failed (%s); training goes on", e)

    def _round(self) -> None:
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in self.params]
        with self.averager.get_tensors() as tensors:
            for tensor, value in zip(tensors, snapshot):
                tensor.copy_(value)
        result = self.averager.step(timeout=self.round_timeout, allow_retries=False)
        if result is None:
            self.num_failed_rounds += 1
            return
        with self.averager.get_tensors() as tensors:
            delta = [t - s for t, s in zip(tensors, snapshot)]
        with self._lock:  # a round not yet applied is kept: both deltas count
            self._pending = delta if self._pending is None else [a + b for a, b in zip(self._pending, delta)]
        self.num_rounds += 1
        self.last_group_size = len(result)
        logger.info("averaged parameters with %d trainer(s)", len(result))

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.round_timeout + 10)
            self._thread = None
        self.averager.shutdown()
        self.dht.shutdown()
