"""Bounded exponential backoff with jitter: never a tight retry loop, never an unbounded wait."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class Backoff:
    """Equal jitter: half the exponential step is fixed, half random, so delays never collapse to 0."""

    def __init__(self, base: float = 0.25, cap: float = 8.0, rand: Optional[Callable[[], float]] = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rand = rand or random.random

    def next_delay(self) -> float:
        step = min(self.cap, self.base * (2 ** self.failures))
        self.failures += 1
        return step / 2 + self._rand() * step / 2

    def reset(self) -> None:
        self.failures = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0


class OutOfTime(RuntimeError):
    """The budget ended before a call succeeded; ``last`` is the last error met (the message says it)."""

    def __init__(self, what: str, attempts: int, last: Optional[BaseException], seconds: float) -> None:
        detail = f": last error {type(last).__name__}: {last}" if last is not None else ""
        super().__init__(f"{what}: gave up after {attempts} attempt(s) in {seconds:.1f} s, the step's budget{detail}")
        self.what = what
        self.attempts = attempts
        self.last = last


def retry_until(fn: Callable[[], T], *, deadline: float, retry_after: Callable[[BaseException], Optional[float]],
                what: str = "call", clock: Any = None, backoff: Optional[Backoff] = None,
                on_retry: Callable[[BaseException, float], None] = lambda exc, delay: None) -> T:
    """Call ``fn`` until it succeeds, fails for good, or ``deadline`` (monotonic) comes.

    ``retry_after(exc)`` says whether an error is worth another try: None (raise it now) or the least
    number of seconds to wait (0: the jittered backoff alone). No attempt starts at or after the
    deadline, and no wait runs past it: when the next attempt would, :class:`OutOfTime` is raised with
    the last error. This replaces botocore's fixed attempt count on the drain path, where time, not
    tries, is what runs out.
    """
    from agent.clock import SYSTEM_CLOCK

    clock = clock or SYSTEM_CLOCK
    backoff = backoff or Backoff(base=0.2, cap=4.0)
    started = clock.monotonic()
    attempts = 0
    last: Optional[BaseException] = None
    while True:
        if clock.monotonic() >= deadline:
            raise OutOfTime(what, attempts, last, clock.monotonic() - started)
        attempts += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified just below
            wait = retry_after(exc)
            if wait is None:
                raise
            last = exc
            delay = max(wait, backoff.next_delay())
            if clock.monotonic() + delay >= deadline:
                raise OutOfTime(what, attempts, last, clock.monotonic() - started) from exc
            on_retry(exc, delay)
            clock.sleep(delay)
