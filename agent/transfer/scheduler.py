"""A thread pool that never queues more than ``max_pending`` tasks (like s3transfer's BoundedExecutor),
and ``TaskLoop``, the one coordinator loop every transfer (dataset sync, restore, checkpoint upload)
runs on top of it.

Submitting a million downloads to a plain ThreadPoolExecutor would hold a million futures in memory;
here ``submit`` blocks (with a timeout, so the coordinator can keep draining results and reporting
progress) until a slot frees up. Workers report through a queue the coordinator drains: all
bookkeeping (manifest, counters, metrics) stays on one thread.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional


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


Task = Callable[[], Any]


class TaskLoop:
    """The coordinator of one transfer: feeds tasks into a ``BoundedExecutor`` and hands every result
    to ``handle`` on the calling thread (s3transfer's split: the loop coordinates, the tasks act).

    Downloads, restores and checkpoint uploads all run this same loop; what differs is passed in:

    - ``tasks``: an iterable of zero-argument callables, usually a generator that plans one file at a
      time and yields one task per part, so nothing is built for a file before a slot is near;
    - ``handle(result)``: bookkeeping for each task's non-None return value (or the exception it
      raised), always on the coordinating thread;
    - ``tick()``: called whenever the loop waits (progress reports, deadline checks, manifest flushes);
    - ``halted()``: True stops feeding and waiting; tasks already running finish in the background
      and are collected by ``close``.
    """

    def __init__(self, workers: int, max_pending: int, name: str, handle: Callable[[Any], None],
                 tick: Optional[Callable[[], None]] = None, halted: Optional[Callable[[], bool]] = None,
                 poll: float = 0.1) -> None:
        self.pool = BoundedExecutor(workers, max_pending, name)
        self.handle = handle
        self.tick = tick or (lambda: None)
        self.halted = halted or (lambda: False)
        self.poll = poll

    def collect(self, timeout: float = 0.0) -> None:
        for out in self.pool.drain(timeout):
            self.handle(out)

    def run(self, tasks: Iterable[Task]) -> bool:
        """Run every task and wait for all of them; False when ``halted()`` cut it short. The next
        task is taken from ``tasks`` only after ``tick`` and ``halted`` have been asked, so a
        generator never plans a file (opens it, starts its multipart upload) once the loop is halted."""
        it = iter(tasks)
        while True:
            self.tick()
            if self.halted():
                return False
            task = next(it, None)
            if task is None:
                break
            while not self.pool.submit(task, timeout=self.poll):
                self.collect()  # a full pool: keep the bookkeeping moving while waiting for a slot
                self.tick()
                if self.halted():
                    return False  # this task never runs: its owner's close() reclaims what it planned
            self.collect()
        while not self.pool.idle():
            self.collect(self.poll)
            self.tick()
            if self.halted():
                return False
        return True

    def close(self) -> None:
        """Wait for the tasks still running and hand over their results (idempotent)."""
        self.pool.shutdown()
        self.collect()
