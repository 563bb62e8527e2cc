"""An injectable clock: deadlines use wall time, waits use monotonic time, and tests can move both."""

from __future__ import annotations

import threading
import time


class Clock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, stop: "threading.Event | None" = None) -> bool:
        """Sleep, waking early when ``stop`` is set. Returns True when stopped."""
        if seconds <= 0:
            return bool(stop and stop.is_set())
        if stop is None:
            time.sleep(seconds)
            return False
        return stop.wait(seconds)


class FakeClock(Clock):
    """Time that moves only when told; sleeps advance it. For pure tests of budgets and token expiry."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            self._mono += seconds

    def sleep(self, seconds: float, stop: "threading.Event | None" = None) -> bool:
        self.advance(max(0.0, seconds))
        return bool(stop and stop.is_set())


SYSTEM_CLOCK = Clock()
