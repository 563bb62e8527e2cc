"""Progress figures (rate, ETA) and the TTY bar. Pure: the caller passes the clock readings."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Optional, Tuple


@dataclass
class SyncProgress:
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    rate: float  # bytes/s over the last few seconds
    eta: Optional[float]  # seconds, None while the rate is unknown

    @property
    def ratio(self) -> float:
        return 1.0 if self.bytes_total <= 0 else min(1.0, self.bytes_done / self.bytes_total)


class RateMeter:
    """Bytes per second over a sliding window, so a stall shows up within ``window`` seconds."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._samples: Deque[Tuple[float, int]] = deque()

    def add(self, now: float, total_bytes: int) -> None:
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def eta(remaining: int, rate: float) -> Optional[float]:
    if remaining <= 0:
        return 0.0
    if rate <= 0:
        return None
    return remaining / rate


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: Optional[float]) -> str:
    if s is None:
        return "--:--"
    s = int(s + 0.5)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def render_bar(p: SyncProgress, width: int = 80) -> str:
    """One line: ``[#####.....]  45%  1.2 GiB/2.6 GiB  85.3 MiB/s  ETA 00:17  120/300 files``."""
    tail = (f" {p.ratio * 100:3.0f}%  {human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)}"
            f"  {human_bytes(p.rate)}/s  ETA {human_seconds(p.eta)}  {p.files_done}/{p.files_total} files")
    bar_w = max(10, width - len(tail) - 3)
    filled = int(bar_w * p.ratio)
    return "[" + "#" * filled + "." * (bar_w - filled) + "]" + tail


def parse_rate(text: str) -> int:
    """``10M``/``500K``/``1.5GiB``/``1000`` (bytes per second, binary multiples) -> int; ValueError if bad."""
    import re

    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(?:/S)?\s*$", text.upper())
    if not m:
        raise ValueError(f"not a byte rate: {text!r} (use e.g. 500K, 10M, 1G)")
    mult = 1024 ** ("KMGT".index(m.group(2)) + 1) if m.group(2) else 1
    return int(float(m.group(1)) * mult)
