"""The local status channel: a Unix socket (mode 0600) on which the daemon answers with its status JSON.

The socket is the live answer; the state file ``<state_dir>/status.json`` (written by the daemon on
every change) is the fallback when the socket cannot be reached, and the last word once the daemon is
gone. Telling "running" from "not running" cannot trust the file alone (a crashed daemon leaves it
behind), so the file's pid must still be alive and must be the process that wrote it.

Protocol: the client connects, sends one line (``status``) and reads JSON until EOF. One request per
connection, handled on the accept thread: the provider is cheap, and only root can connect.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

log = logging.getLogger(__name__)

MAX_REQUEST = 1024
CONNECTION_TIMEOUT = 2.0
SOURCE_SOCKET = "socket"
SOURCE_STATE_FILE = "state-file"


class DaemonNotRunning(Exception):
    """Nothing answers on the socket and the state file names no live daemon.

    ``last`` is the last status the daemon wrote (or None), so a caller can say what it was doing when
    it went away, e.g. "drained".
    """

    def __init__(self, message: str, last: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.last = last


class StatusServer:
    def __init__(self, path: str, provider: Callable[[], dict],
                 commands: Optional[Dict[str, Callable[[], dict]]] = None) -> None:
        self.path = path
        self.provider = provider
        self.commands = dict(commands or {})  # other one-line requests (e.g. the drain guard's)
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._wake_r: Optional[int] = None
        self._wake_w: Optional[int] = None
        self._inode: Optional[Tuple[int, int]] = None

    def start(self) -> "StatusServer":
        if self._sock is not None:
            return self
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: there is no moment when others could connect
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"status socket {self.path}: cannot bind: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(8)
        sock.setblocking(False)
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="status-socket", daemon=True)
        self._thread.start()
        return self

    def _clear_stale(self) -> None:
        """Remove a socket left by a dead daemon; refuse to steal one a live daemon still answers on."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"status socket {self.path}: exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: left behind by a crash
            return
        finally:
            probe.close()
        raise OSError(f"status socket {self.path}: another spot-agent is answering on it")

    def _serve(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = sel.select()  # no timeout: idle costs nothing
                if any(key.fd == self._wake_r for key, _ in ready):
                    return
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    log.debug("status socket: accept failed", exc_info=True)
                    continue
                try:
                    self._answer(conn)
                except Exception:  # noqa: BLE001 - one bad client must not end the server
                    log.debug("status socket: request failed", exc_info=True)
                finally:
                    conn.close()

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + CONNECTION_TIMEOUT  # for the whole request, not per recv
        request = b""
        while b"\n" not in request and len(request) < MAX_REQUEST:
            left = deadline - time.monotonic()
            if left <= 0:
                break  # a client that trickles bytes gets the default request: status
            conn.settimeout(left)
            try:
                chunk = conn.recv(MAX_REQUEST)
            except socket.timeout:
                break
            if not chunk:
                break
            request += chunk
        command = request.split(b"\n", 1)[0].strip().decode("ascii", "replace") or "status"
        if command in self.commands:
            try:
                body: Dict[str, Any] = self.commands[command]()
            except Exception as exc:  # noqa: BLE001 - report it to the client rather than hang up
                log.warning("status socket: request %s failed", command, exc_info=True)
                body = {"error": f"{command} failed: {exc}"}
        elif command != "status":
            body = {"error": f"unknown request {command[:40]!r}; send 'status'"}
        else:
            try:
                body = self.provider()
            except Exception as exc:  # noqa: BLE001 - report it to the client rather than hang up
                log.warning("status socket: status provider failed", exc_info=True)
                body = {"error": f"status provider failed: {exc}"}
        conn.settimeout(CONNECTION_TIMEOUT)
        conn.sendall(json.dumps(body, sort_keys=True, default=str).encode() + b"\n")

    def stop(self) -> None:
        if self._sock is None:
            return
        assert self._wake_w is not None and self._wake_r is not None
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:  # only unlink our own socket, not one a successor bound meanwhile
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock = None
        self._thread = None

    def __enter__(self) -> "StatusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def query_socket(socket_path: str, timeout: float = 2.0, request: str = "status") -> Dict[str, Any]:
    """Ask the daemon; raises OSError when nothing answers, ValueError on an answer that is not JSON."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request.encode("ascii") + b"\n")
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no complete answer on {socket_path} within {timeout:g} s")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    data = json.loads(b"".join(chunks).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"answer on {socket_path} is not a JSON object")
    if set(data) == {"error"}:
        raise ValueError(f"daemon on {socket_path} answered: {data['error']}")
    return data


def read_state_file(state_file: str) -> Optional[Dict[str, Any]]:
    """The last status the daemon wrote, or None; PermissionError propagates (it says nothing about liveness)."""
    try:
        with open(state_file, "rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise
    except (OSError, ValueError):
        return None  # unreadable or torn: as good as absent for "is it running"
    return data if isinstance(data, dict) else None


def pid_is_writer(pid: Any, started_at: Any) -> bool:
    """True when ``pid`` is alive and is the process that started at ``started_at`` (not a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        import psutil

        created = psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, zombie: treat as gone
        return False
    if isinstance(started_at, (int, float)) and started_at > 0:
        # The daemon records started_at after it was created; a process created later is someone else.
        return created <= float(started_at) + 2.0
    return True


def fetch_status(socket_path: str, state_file: str, timeout: float = 2.0) -> Tuple[Dict[str, Any], str]:
    """The status and where it came from (``socket`` or ``state-file``); raises DaemonNotRunning."""
    try:
        return query_socket(socket_path, timeout), SOURCE_SOCKET
    except (OSError, ValueError) as exc:
        socket_error = exc
    try:
        last = read_state_file(state_file)
    except PermissionError:
        raise PermissionError(f"cannot read {state_file} or {socket_path}: permission denied (run as root)") from None
    if last is not None and pid_is_writer(last.get("pid"), last.get("started_at")):
        return last, SOURCE_STATE_FILE
    if isinstance(socket_error, PermissionError):
        raise PermissionError(f"{socket_path}: permission denied (run as root)")
    if last is None:
        reason = f"no answer on {socket_path} ({_why(socket_error)}) and no state file at {state_file}"
    else:
        reason = f"no answer on {socket_path} ({_why(socket_error)}) and pid {last.get('pid')} from {state_file} is gone"
    raise DaemonNotRunning(reason, last)


def read_status(socket_path: str, state_file: str, timeout: float = 2.0) -> Dict[str, Any]:
    return fetch_status(socket_path, state_file, timeout)[0]


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, PermissionError):
        return "permission denied; run as root"
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
