"""TokenBucket: a rate with room for a burst, the one rate limiter of the node's per-peer limits and
the relay's byte and request limits."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``rate`` units per second with room for ``burst``; ``take`` waits while in debt."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, amount: float = 1.0) -> bool:
        self._refill()
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    async def take(self, amount: float) -> None:
        self._refill()
        self.tokens -= amount
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)
