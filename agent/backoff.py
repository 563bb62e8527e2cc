"""Bounded exponential backoff with jitter: never a tight retry loop, never an unbounded wait."""

from __future__ import annotations

import random
from typing import Callable, Optional


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
