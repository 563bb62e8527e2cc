"""A thread pool that never queues more than ``max_pending`` tasks (like s3transfer's BoundedExecutor).

Submitting a million downloads to a plain ThreadPoolExecutor would hold a million futures in memory;
here ``submit`` blocks (with a timeout, so the coordinator can keep draining results and reporting
progress) until a slot frees up. Workers report through a queue the coordinator drains: all
bookkeeping (manifest, counters, metrics) stays on one thread.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional


class BoundedExecutor:
    def __init__(self, workers: int, max_pending: int, name: str = "transfer") -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(max_pending)
        self.results: "queue.Queue[Any]" = queue.Queue()
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> bool:
        """Run ``fn(*args)``; its return value (if not None) goes to ``results``. False on timeout."""
        if not self._slots.acquire(timeout=timeout):
            return False
        with self._lock:
            self._inflight += 1

        def run() -> None:
            try:
                out = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - a task must never kill the coordinator
                out = exc
            finally:
                with self._lock:
                    self._inflight -= 1
                self._slots.release()
            if out is not None:
                self.results.put(out)

        self._pool.submit(run)
        return True

    def drain(self, timeout: float = 0.0) -> Iterator[Any]:
        """Yield every result available now (waiting up to ``timeout`` for the first)."""
        try:
            item = self.results.get(timeout=timeout) if timeout > 0 else self.results.get_nowait()
        except queue.Empty:
            return
        yield item
        while True:
            try:
                yield self.results.get_nowait()
            except queue.Empty:
                return

    def idle(self) -> bool:
        return self.inflight == 0 and self.results.empty()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
