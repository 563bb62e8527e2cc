"""One token bucket shared by every request of a transfer, so ``max_bandwidth`` caps the sum.

The bucket is pure (``reserve`` returns how long to wait, given ``now``); ``Limiter`` adds the
sleeping and a lock. Waits are taken outside the lock so parallel readers queue fairly by reservation.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens (possibly going negative); return the seconds to wait before using them."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Limiter:
    """``consume(n)`` blocks as needed. ``rate <= 0`` means unlimited and costs nothing."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, stop: Optional[threading.Event] = None) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._stop = stop
        self._lock = threading.Lock()
        self._bucket = TokenBucket(rate, max(64 * 1024, rate / 10), clock()) if rate > 0 else None

    @property
    def chunk(self) -> int:
        """A read size that keeps the flow smooth at this rate (about 20 reads a second, 16 KiB-1 MiB)."""
        if self._bucket is None:
            return 1024 * 1024
        return int(min(1024 * 1024, max(16 * 1024, self.rate / 20)))

    def consume(self, n: int) -> None:
        if self._bucket is None:
            return
        with self._lock:
            wait = self._bucket.reserve(n, self._clock())
        if wait > 0:
            if self._stop is not None:
                self._stop.wait(wait)
            else:
                self._sleep(wait)
