"""The watcher interface: start emitting events to ``emit``, stop on request. One source each."""

from __future__ import annotations

from typing import Callable, Protocol

from agent.events import Event

Emit = Callable[[Event], None]


class Watcher(Protocol):
    name: str

    def start(self, emit: Emit) -> None: ...

    def stop(self) -> None: ...
