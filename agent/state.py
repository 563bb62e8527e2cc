"""Crash-safe state: a JSON document written atomically (temp file, fsync, rename, fsync dir).

The drain records each step here before and after doing it, so a restart resumes a drain instead of
repeating a snapshot or a lifecycle completion, and the startup path can thaw anything left frozen.
That is why the state directory must be the agent's own (:func:`secure_dir`): a user who can write
there could plant a drain record for the root agent to "resume".
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import threading
from typing import Any, Dict, Optional

from agent.trust import UntrustedPath, resolve_trusted


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def secure_dir(path: str, mode: int = 0o700) -> str:
    """Create ``path`` if missing, then require it to be the agent's own; return it resolved.

    Own means (``agent.trust``): not a symlink, owned by root (or the agent's uid when it does not
    run as root), not writable by group or others, and the same for every directory above it (a
    sticky one such as ``/tmp`` is fine). Checked after creating, so a directory someone else made
    first is refused rather than adopted. Raises :class:`agent.trust.UntrustedPath` (one line).
    """
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as exc:
        raise UntrustedPath(f"{path}: cannot create: {exc.strerror}") from None
    return resolve_trusted(path, allow_final_link=False, kind="dir")


def agent_dirs_problem(state_dir: str, socket_path: str) -> Optional[str]:
    """One line naming the key, if the state directory or the socket's directory is not the agent's own."""
    for key, path, mode in (("agent.state_dir", state_dir, 0o700),
                            ("agent.socket", os.path.dirname(socket_path), 0o755)):
        try:
            secure_dir(path, mode)
        except UntrustedPath as exc:
            return f"{key}: {exc}"
    return None


class StateStore:
    """A dict persisted on every ``update``. Sections are top-level keys owned by one component each."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._data: Dict[str, Any] = self._read()

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path, "rb") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            # A torn or corrupt file cannot come from atomic_write; keep it for inspection, start clean.
            try:
                os.replace(self.path, self.path + ".corrupt")
            except OSError:
                pass
            return {}

    def get(self, section: str, default: Optional[Any] = None) -> Any:
        with self._lock:
            value = self._data.get(section, default)
            return copy.deepcopy(value)

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._data)

    def set(self, section: str, value: Any) -> None:
        with self._lock:
            self._data[section] = copy.deepcopy(value)
            self._flush()

    def update(self, section: str, **fields: Any) -> Dict[str, Any]:
        with self._lock:
            current = self._data.setdefault(section, {})
            current.update(copy.deepcopy(fields))
            self._flush()
            return copy.deepcopy(current)

    def delete(self, section: str) -> None:
        with self._lock:
            if section in self._data:
                del self._data[section]
                self._flush()

    def _flush(self) -> None:
        atomic_write(self.path, json.dumps(self._data, indent=1, sort_keys=True).encode())
