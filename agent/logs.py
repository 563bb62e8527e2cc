"""Logging: journald with structured fields under systemd, plain text on stderr otherwise.

Components attach fields with ``extra={"journal": {"EVENT_KIND": ..., "DEADLINE": ...}}``; a
``MESSAGE_ID`` field there lets operators find every event of one kind with ``journalctl``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JournalHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        from systemd import journal  # optional extension; caller checks it imports

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: Dict[str, Any] = {
                "PRIORITY": str(_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": "spot-agent",
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,  # python3-systemd formats it with {:d}
                "CODE_FUNC": record.funcName,
            }
            extra = getattr(record, "journal", None) or {}
            for key, value in extra.items():
                fields[str(key).upper()] = "" if value is None else str(value)
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(message, **fields)
        except Exception:  # noqa: BLE001 - logging must never take the agent down
            self.handleError(record)


class TextFormatter(logging.Formatter):
    """Plain text, with the structured fields appended as key=value so nothing is lost off-journal."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = getattr(record, "journal", None)
        fields = [f"{k}={v}" for k, v in (extra or {}).items() if k != "MESSAGE_ID"]
        if fields:
            text += " " + " ".join(fields)
        return text


def _priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM when stderr is connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(level: str = "info", force_text: bool = False) -> str:
    """Configure the root logger; returns "journal" or "text"."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    mode = "text"
    handler: logging.Handler
    if not force_text and under_journald():
        try:
            handler = JournalHandler()
            mode = "journal"
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter(_FORMAT))
    root.addHandler(handler)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return mode
