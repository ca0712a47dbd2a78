"""Hostile peers in the trainers' averaging, for tests and benchmarks: BTARD's attacks (:func:`poison`) and
:class:`AveragingPeers`, a group of real :class:`~dmoe.lm.averaging.ParameterAverager` s (hivemind's
all-reduce over libp2p, each with its DHT peer and its averager process) in one process, whose rounds
run all at once on command.

An attack replaces what one peer offers in a round, from ``own`` (what an honest peer would offer:
its parameters after its local steps), ``reference`` (where the round started: the last average) and
``stale`` (its parameters of long ago):

- ``sign-flip``: its update times -1000 (``reference - 1000 * (own - reference)``);
- ``random``: a random direction, 1000 times its update's norm;
- ``stale``: ``stale`` sent again (a replay: plausible values, within every bound);
- ``in-bound``: its update's opposite, as long as the averaging guard lets through: 8 times each
  tensor's norm, so that the mean of four lands 2 norms away (the guard refuses 4).

Create :class:`AveragingPeers` before any other thread of the process starts (the averagers fork).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from dmoe.core.dht import DHTPeer
from dmoe.lm.averaging import ParameterAverager

ATTACKS = ("none", "sign-flip", "random", "stale", "in-bound")
SCALE = 1000.0  # BTARD's attacks: x-1000, and a random direction of 1000 times the norm
IN_BOUND = 8.0  # in-bound: offset of 8 norms; one of four moves the mean 2 norms, under the guard's 4


def poison(attack: str, own: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
           stale: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """What a hostile peer offers instead of ``own`` (see the module docstring)."""
    if attack == "none":
        return [t.clone() for t in own]
    if attack == "stale":
        return [t.clone() for t in stale]
    result = []
    for mine, ref in zip(own, reference):
        update = mine - ref
        if attack == "sign-flip":
            result.append(ref - SCALE * update)
        elif attack == "random":
            direction = torch.randn(ref.shape, generator=generator)
            result.append(ref + SCALE * update.norm() * direction / direction.norm().clamp_min(1e-30))
        elif attack == "in-bound":
            result.append(ref - IN_BOUND * ref.norm() * update / update.norm().clamp_min(1e-30))
        else:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    return result


class AveragingPeers:
    """``num_peers`` trainers' averagers of one run, each over its own copy of ``shapes``-shaped tensors
    (``tensors[i]``), on DHT peers of a DHT of their own on 127.0.0.1. ``with AveragingPeers(...) as
    peers: peers.set(i, values); peers.round()``."""

    def __init__(self, shapes: Sequence[torch.Size], *, num_peers: int = 4, run_id: str = "byzantine",
                 aggregate: str = "mean", matchmaking_time: float = 1.0, round_timeout: float = 30.0):
        self.tensors = [[torch.zeros(shape) for shape in shapes] for _ in range(num_peers)]
        self.dht = [DHTPeer() for _ in range(num_peers)]
        self._sizes = [0] * num_peers  # group sizes found in the last round
        self.averagers: list[ParameterAverager] = []
        try:
            for tensors, peer in zip(self.tensors, self.dht):  # the forks, before any peer's thread
                self.averagers.append(ParameterAverager(
                    tensors, peer=peer, run_id=run_id, interval=3600.0, matchmaking_time=matchmaking_time,
                    round_timeout=round_timeout, aggregate=aggregate))
            self.dht[0].start()
            for peer in self.dht[1:]:
                peer.initial_peers = list(self.dht[0].visible_maddrs)
                peer.start()
            for averager in self.averagers:
                averager.connect()
        except BaseException:
            self.shutdown()
            raise

    def set(self, index: int, values: Sequence[torch.Tensor]) -> None:
        """Peer ``index``'s tensors become ``values`` (what it offers next round)."""
        with torch.no_grad():
            for tensor, value in zip(self.tensors[index], values):
                tensor.copy_(value)

    def round(self, timeout: float = 60.0) -> list[str]:
        """One averaging round of every peer at once, and each result applied; returns each peer's
        outcome: "averaged", "refused" (by its guard) or "failed". :meth:`group_sizes` then gives the
        size of the group each peer found in this round (0 where it failed)."""
        outcomes = ["failed"] * len(self.averagers)
        self._sizes = [0] * len(self.averagers)  # this round's: a failed one leaves the last round's size

        def run(index: int) -> None:
            averager = self.averagers[index]
            refused = averager.num_refused_rounds
            if averager.round() and averager.apply_pending():
                outcomes[index] = "averaged"
            elif averager.num_refused_rounds > refused:
                outcomes[index] = "refused"
            if outcomes[index] != "failed":
                self._sizes[index] = averager.last_group_size

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(self.averagers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        return outcomes

    def group_sizes(self) -> list[int]:
        """The size of the group each peer found in the last :meth:`round` (0: it found none, or failed)."""
        return list(self._sizes)

    def shutdown(self) -> None:
        # the last forked first: each averager's process holds the DHT pipes of those forked before it
        for averager in reversed(self.averagers):
            averager.shutdown()
        for peer in self.dht:
            peer.shutdown()
        self.averagers = []

    def __enter__(self) -> AveragingPeers:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
