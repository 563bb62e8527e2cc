"""sd_notify over the NOTIFY_SOCKET datagram socket, and the watchdog interval.

Written directly (a dozen lines of protocol) rather than through systemd-python, so Type=notify
works even where that optional extension is not installed. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Optional

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: Optional[str] = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self.last_status = ""
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def _target(self) -> str:
        return "\0" + self.address[1:] if self.address.startswith("@") else self.address

    def send(self, *lines: str) -> bool:
        if self._sock is None:
            return False
        payload = "\n".join(lines).encode()
        with self._lock:
            try:
                self._sock.sendto(payload, self._target())
                return True
            except OSError as exc:
                log.debug("sd_notify failed: %s", exc)
                return False

    def ready(self, status: str = "") -> bool:
        lines = ["READY=1"] + ([f"STATUS={status}"] if status else [])
        if status:
            self.last_status = status
        return self.send(*lines)

    def status(self, text: str) -> bool:
        self.last_status = text
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        import time

        return self.send("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1_000_000)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> Optional[float]:
    """Half the unit's WatchdogSec (systemd's advice), or None when the watchdog is off for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1_000_000 / 2)
    except ValueError:
        return None
