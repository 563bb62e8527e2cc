"""Read every block of a volume restored from a snapshot once, before READY.

Why: EBS loads a restored volume's blocks lazily from S3, so a training job's first epoch would run at
S3 speed. Reading everything once up front (what AWS suggests doing with dd or fio) moves that cost
before READY, where it is visible as progress instead of as a slow job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from agent.clock import SYSTEM_CLOCK, Clock

CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class InitResult:
    bytes_read: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else float(self.bytes_read)


def initialize(device: str, progress: Callable[[int, int], None] = lambda done, total: None,
               clock: Clock = SYSTEM_CLOCK, report_every: float = 2.0, chunk: int = CHUNK) -> InitResult:
    """Read ``device`` start to end; ``progress(done, total)`` at most every ``report_every`` seconds and at the end."""
    started = clock.monotonic()
    last_report = started
    done = 0
    fd = os.open(device, os.O_RDONLY)
    try:
        total = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        while done < total:
            data = os.read(fd, min(chunk, total - done))
            if not data:
                break
            done += len(data)
            if hasattr(os, "posix_fadvise"):
                # Don't let a terabyte of reads evict the page cache the workload is about to need.
                os.posix_fadvise(fd, done - len(data), len(data), os.POSIX_FADV_DONTNEED)
            now = clock.monotonic()
            if now - last_report >= report_every:
                progress(done, total)
                last_report = now
    finally:
        os.close(fd)
    progress(done, total)
    return InitResult(done, max(clock.monotonic() - started, 1e-9))
