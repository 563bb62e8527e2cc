"""The real `spot-agent run` as a child process, with a notify socket standing in for systemd's.

The demo learns what the daemon is doing the way systemd does: from its sd_notify datagrams
(``STATUS=...``, ``READY=1``, ``STOPPING=1``), each stamped with the time it arrived, which makes the
boot timeline. The child gets its own session, so a Ctrl-C at the terminal reaches only the demo,
which then stops the child itself (a SIGINT would otherwise start a shutdown drain).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class NotifySocket:
    """Receives sd_notify datagrams; ``messages`` holds (epoch, "KEY=value")."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: List[Tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.time()
            with self._lock:
                self.messages.extend((now, line) for line in data.decode(errors="replace").split("\n") if line)

    def snapshot(self) -> List[Tuple[float, str]]:
        with self._lock:
            return list(self.messages)

    def first(self, prefix: str) -> Optional[float]:
        for at, line in self.snapshot():
            if line.startswith(prefix):
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)


class AgentProcess:
    """One `spot-agent run --config PATH`; stdout+stderr go to ``log_path``."""

    def __init__(self, config_path: str, log_path: str, notify_path: str, env: Optional[Dict[str, str]] = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.notify = NotifySocket(notify_path)
        full = dict(os.environ)
        for key in ("JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            full.pop(key, None)  # the demo's own systemd context must not leak into the child's
        full.update(NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        full.update(env or {})
        pythonpath = full.get("PYTHONPATH", "")
        full["PYTHONPATH"] = REPO + (os.pathsep + pythonpath if pythonpath else "")
        self._log = open(log_path, "ab")
        self.started_at = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", config_path],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full, cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> float:
        """Epoch of READY=1; raises with the log's tail if the daemon exits or is too slow."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            at = self.notify.first("READY=1")
            if at is not None:
                return at
            if self.proc.poll() is not None:
                raise RuntimeError(f"spot-agent run exited with {self.proc.returncode} before READY:\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"spot-agent run not READY within {timeout:.0f} s:\n{self.log_tail()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, the way a power cut or the OOM killer ends it (no drain, nothing flushed)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after ``timeout``; closes the notify socket and the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.notify.close()
        if not self._log.closed:
            self._log.close()
