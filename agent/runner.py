"""Host commands behind one injectable runner (mount, mkfs, blkid, fsfreeze, systemctl ...).

Every host command the agent runs goes through a :class:`Runner`, so a reader finds them in one place,
each call is logged with its duration, and a test can substitute a recording runner where a real
command cannot run here.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)


@dataclass
class Result:
    argv: List[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_line(self) -> str:
        detail = (self.stderr or self.stdout).strip().splitlines()
        tail = detail[-1] if detail else ""
        return f"{' '.join(self.argv)} exited {self.returncode}" + (f": {tail}" if tail else "")


class CommandError(RuntimeError):
    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(result.error_line())


class Runner:
    """Runs argv lists (never shell strings) with a timeout."""

    def __init__(self, env: Optional[Dict[str, str]] = None) -> None:
        self.env = env

    def run(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
            input: Optional[str] = None) -> Result:
        started = time.monotonic()
        env = dict(os.environ, **self.env) if self.env else None
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                  input=input, env=env)
            result = Result(list(argv), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
        except subprocess.TimeoutExpired as exc:
            result = Result(list(argv), -9, _text(exc.stdout), f"timed out after {timeout:g}s", time.monotonic() - started)
        except FileNotFoundError:
            result = Result(list(argv), 127, "", f"{argv[0]}: command not found", time.monotonic() - started)
        log.debug("ran %s -> %d in %.3fs", " ".join(argv), result.returncode, result.seconds)
        if check and not result.ok:
            raise CommandError(result)
        return result


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
