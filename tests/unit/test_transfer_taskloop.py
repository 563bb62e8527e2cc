"""TaskLoop: the one coordinator loop of dataset syncs, restores and checkpoint uploads."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, List

from agent.transfer.scheduler import TaskLoop


def test_every_result_is_handled_on_the_coordinating_thread() -> None:
    seen: List[Any] = []
    threads = set()

    def handle(out: Any) -> None:
        threads.add(threading.get_ident())
        seen.append(out)

    loop = TaskLoop(3, 2, "t", handle)
    tasks = [(lambda i=i: i) for i in range(50)] + [lambda: None]  # None is not a result
    assert loop.run(tasks) is True
    loop.close()
    assert sorted(seen) == list(range(50))
    assert threads == {threading.get_ident()}


def test_a_task_that_raises_is_handed_over_as_its_exception() -> None:
    seen: List[Any] = []

    def boom() -> None:
        raise RuntimeError("part failed")

    loop = TaskLoop(2, 2, "t", seen.append)
    assert loop.run([boom, lambda: "ok"])
    loop.close()
    assert "ok" in seen and any(isinstance(x, RuntimeError) and str(x) == "part failed" for x in seen)


def test_halted_stops_feeding_and_the_generator_is_not_advanced_past_it() -> None:
    planned: List[int] = []
    halt = threading.Event()

    def tasks() -> Iterator[Callable[[], Any]]:
        for i in range(100):
            planned.append(i)  # what a generator does per file: open it, start its multipart upload
            yield lambda i=i: i

    def tick() -> None:
        if len(planned) >= 4:
            halt.set()

    loop = TaskLoop(1, 1, "t", lambda out: None, tick=tick, halted=halt.is_set, poll=0.01)
    assert loop.run(tasks()) is False
    loop.close()
    assert len(planned) == 4  # nothing planned once halted


def test_tick_runs_while_waiting_for_a_slot_and_for_the_last_tasks() -> None:
    ticks = [0]
    release = threading.Event()

    def tick() -> None:
        ticks[0] += 1
        if ticks[0] > 5:
            release.set()

    loop = TaskLoop(1, 1, "t", lambda out: None, tick=tick, poll=0.01)
    assert loop.run([lambda: release.wait(5), lambda: release.wait(5)])
    loop.close()
    assert release.is_set()
