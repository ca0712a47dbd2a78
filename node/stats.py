"""ExpertCounters: what a node has done per expert, for Info and the DHT node record.

Counters are updated on the event loop thread only (by the service), so they need no lock.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from dmoe.core.records import ExpertLoad
from dmoe.proto import expert_pb2 as pb

LATENCY_WINDOW = 1024


@dataclasses.dataclass(slots=True)
class ExpertCounters:
    forward_calls: int = 0
    backward_calls: int = 0
    forward_tokens: int = 0
    backward_tokens: int = 0
    errors: int = 0
    rejected: int = 0
    latencies_s: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW)
    )
    spread: float = 0.0  # replica averaging (dmoe.node.averaging): the last blend's spread, and when
    averaged_at: float = 0.0

    def record_call(self, backward: bool, num_tokens: int, latency_s: float) -> None:
        if backward:
            self.backward_calls += 1
            self.backward_tokens += num_tokens
        else:
            self.forward_calls += 1
            self.forward_tokens += num_tokens
        self.latencies_s.append(latency_s)

    def latency_ms(self) -> tuple[float, float]:
        if not self.latencies_s:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self.latencies_s, dtype=np.float64), [50, 99])
        return float(p50) * 1e3, float(p99) * 1e3

    def to_proto(self, *, queued_tokens: int, version: int, skipped_updates: int = 0) -> pb.ExpertStats:
        """``skipped_updates``: Backward calls answered without updating the expert (counted by the
        runtime's influence limits, :mod:`dmoe.node.influence`)."""
        p50, p99 = self.latency_ms()
        return pb.ExpertStats(
            forward_calls=self.forward_calls, backward_calls=self.backward_calls,
            forward_tokens=self.forward_tokens, backward_tokens=self.backward_tokens,
            errors=self.errors, rejected=self.rejected, queued_tokens=queued_tokens,
            latency_p50_ms=p50, latency_p99_ms=p99, optimizer_steps=version, skipped_updates=skipped_updates,
        )

    def to_load(self, *, queued_tokens: int, version: int) -> ExpertLoad:
        p50, p99 = self.latency_ms()
        return ExpertLoad(
            forward_calls=self.forward_calls, backward_calls=self.backward_calls,
            tokens=self.forward_tokens + self.backward_tokens, errors=self.errors, rejected=self.rejected,
            queued_tokens=queued_tokens, latency_p50_ms=round(p50, 3), latency_p99_ms=round(p99, 3),
            version=version, spread=round(self.spread, 6), averaged_at=self.averaged_at,
        )
