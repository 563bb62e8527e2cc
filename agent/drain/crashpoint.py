"""Test seam: die on purpose at a named point of the drain, the way SIGKILL or a power cut would.

When the environment variable ``SPOT_AGENT_TEST_CRASH_AFTER`` equals the point's name, the process
exits at once with ``os._exit(137)`` (no ``finally``, no atexit: exactly what SIGKILL leaves behind).
The crash-at-every-step integration tests set it in a drain subprocess, then restart the drain and
check it resumes without a second snapshot or lifecycle completion and with nothing left frozen.
Points: each step name (after its result is recorded), ``frozen`` (inside the fsfreeze window, before
CreateSnapshot) and ``snapshot-call`` (CreateSnapshot returned, not yet thawed or recorded).
Nothing sets this variable outside the tests.
"""

from __future__ import annotations

import os

ENV = "SPOT_AGENT_TEST_CRASH_AFTER"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os._exit(137)
