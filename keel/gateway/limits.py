"""A per-caller rate limit: a token bucket for each caller, in this process's memory."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

MAX_BUCKETS = 10_000  # callers remembered at once; full buckets are forgotten first


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """`rate` requests a second for each caller, `burst` at once (rate 0: no limit)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(2 * rate, 1.0)
        self._buckets: dict[str, _Bucket] = {}

    def wait_for(self, key: str, now: float | None = None) -> float:
        """Take one request for `key`: 0 when it may go now, else the seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        b = self._buckets.get(key)
        if b is None:
            self._forget_idle(now)
            b = self._buckets[key] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            return 0.0
        return (1 - b.tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) < MAX_BUCKETS:
            return
        full = [
            k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for k in full or list(self._buckets)[: MAX_BUCKETS // 10]:
            del self._buckets[k]


def retry_after(seconds: float) -> str:
    """A Retry-After header's value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))
