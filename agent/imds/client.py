"""The IMDSv2 HTTP client: session tokens, keep-alive, bounded reads, and no silent IMDSv1.

Why the care: the agent's only warning of termination comes through here, and IMDS misbehaves in
known ways (throttling at 429, tokens expiring, 403 when IMDS is turned off, proxies answering HTML,
bodies or headers that never end). Each is turned into a typed outcome for the watcher; nothing here
retries in a loop or sleeps, so the watcher's schedule stays in one place.

``timeout`` is a total deadline per request: connect, headers and body. A socket timeout alone is
per read, so a server that sends one byte of header a second would hold the single watcher thread
for ever; here every read of the connection's socket gets only what is left of the deadline.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from agent import metrics
from agent.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_BODY = 64 * 1024

# Short, bounded labels for the metrics.
PATH_LABELS = {
    "/latest/meta-data/spot/instance-action": "spot/instance-action",
    "/latest/meta-data/events/recommendations/rebalance": "events/recommendations/rebalance",
    "/latest/meta-data/events/maintenance/scheduled": "events/maintenance/scheduled",
    "/latest/meta-data/autoscaling/target-lifecycle-state": "autoscaling/target-lifecycle-state",
    TOKEN_PATH: "api/token",
}


# The deadline of the request this thread is making (time.monotonic(); None: no deadline). Reads
# happen on the calling thread, so a thread-local reaches the socket without widening urllib3's API.
_DEADLINE = threading.local()


class _DeadlineSocket:
    """A socket whose every send and receive gets at most what is left of the request's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _arm(self) -> None:
        at = getattr(_DEADLINE, "at", None)
        if at is None:
            return
        left = at - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request's total deadline has passed")
        self._sock.settimeout(left)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return self._sock.recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        self._sock.sendall(data, flags)

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, **kwargs: Any) -> Any:
        if mode != "rb":
            return self._sock.makefile(mode, buffering, **kwargs)  # type: ignore[call-overload]
        # What socket.makefile does, but reading through this wrapper (http.client reads headers here).
        self._sock._io_refs += 1  # type: ignore[attr-defined]
        return io.BufferedReader(socket.SocketIO(self, "rb"), buffering or io.DEFAULT_BUFFER_SIZE)  # type: ignore[arg-type]


class _DeadlineConnection(HTTPConnection):
    def _new_conn(self) -> Any:
        return _DeadlineSocket(super()._new_conn())


class _DeadlinePool(HTTPConnectionPool):
    ConnectionCls = _DeadlineConnection


def _deadline_adapter() -> HTTPAdapter:
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = dict(adapter.poolmanager.pool_classes_by_scheme, http=_DeadlinePool)
    return adapter


class IMDSError(Exception):
    """A transient failure: timeout, connection error, 429, 5xx, an endless or oversized body."""

    def __init__(self, reason: str, detail: str, status: Optional[int] = None) -> None:
        self.reason = reason
        self.status = status
        super().__init__(f"{reason}: {detail}")


class IMDSDisabled(Exception):
    """403: IMDS is turned off for this instance (or the request is forbidden). Not transient."""


@dataclass
class Answer:
    status: int
    text: str

    @property
    def found(self) -> bool:
        return self.status == 200


def _code_class(status: Optional[int]) -> str:
    if status is None:
        return "error"
    return f"{status // 100}xx"


class IMDSClient:
    def __init__(self, endpoint: str, timeout: float = 1.0, token_ttl: int = 21600,
                 allow_imdsv1: bool = False, clock: Clock = SYSTEM_CLOCK) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self.allow_imdsv1 = allow_imdsv1
        self.clock = clock
        self._session = requests.Session()
        self._session.trust_env = False  # never route IMDS through an HTTP(S)_PROXY
        self._session.mount("http://", _deadline_adapter())
        self._token: Optional[str] = None
        self._token_expires = 0.0  # monotonic
        self._v1 = False
        self._lock = threading.Lock()

    # -- tokens -------------------------------------------------------------------------------
    def _refresh_margin(self) -> float:
        # Refresh well before expiry: a tenth of the TTL, between 1 s and 60 s.
        return min(60.0, max(1.0, self.token_ttl / 10))

    def _token_valid(self) -> bool:
        return self._token is not None and self.clock.monotonic() < self._token_expires - self._refresh_margin()

    def invalidate_token(self) -> None:
        self._token = None
        self._token_expires = 0.0

    def _fetch_token(self) -> None:
        answer = self._request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
        if answer.status == 200 and answer.text.strip():
            self._token = answer.text.strip()
            self._token_expires = self.clock.monotonic() + self.token_ttl
            self._v1 = False
            return
        if answer.status == 403:
            raise IMDSDisabled("IMDS refused the session token (403): IMDS is disabled for this instance "
                               "or the request is not allowed; not falling back to IMDSv1")
        if answer.status in (404, 405) and self.allow_imdsv1:
            if not self._v1:
                log.warning("IMDS has no token endpoint (%d); using IMDSv1 as allowed by imds.allow_imdsv1", answer.status)
            self._v1 = True
            return
        if answer.status == 429 or answer.status >= 500:
            raise IMDSError("throttled" if answer.status == 429 else "server-error",
                            f"token PUT answered {answer.status}", answer.status)
        raise IMDSError("token-refused", f"token PUT answered {answer.status}: {answer.text[:80]!r}", answer.status)

    # -- requests -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, headers: Dict[str, str]) -> Answer:
        url = self.endpoint + path
        label = PATH_LABELS.get(path, "other")
        deadline = self.clock.monotonic() + self.timeout
        _DEADLINE.at = time.monotonic() + self.timeout
        try:
            with self._session.request(method, url, headers=headers, timeout=self.timeout, stream=True,
                                       allow_redirects=False) as resp:
                status = resp.status_code
                text = self._read_body(resp, path, deadline)
        except IMDSError:
            metrics.IMDS_REQUESTS.labels(path=label, code_class="error").inc()
            metrics.IMDS_UP.set(0)
            raise
        except (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout):
            metrics.IMDS_REQUESTS.labels(path=label, code_class="error").inc()
            metrics.IMDS_UP.set(0)
            self._session.close()  # the connection is mid-answer: never reuse it
            raise IMDSError("timeout", f"{path}: no complete answer within {self.timeout:g}s") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            metrics.IMDS_REQUESTS.labels(path=label, code_class="error").inc()
            metrics.IMDS_UP.set(0)
            self._session.close()
            raise IMDSError("connection", f"{path}: {type(exc).__name__}") from None
        finally:
            _DEADLINE.at = None
        metrics.IMDS_REQUESTS.labels(path=label, code_class=_code_class(status)).inc()
        metrics.IMDS_UP.set(1 if status < 500 else 0)
        return Answer(status, text)

    def _read_body(self, resp: requests.Response, path: str, deadline: float) -> str:
        """Read with a total deadline: a body that trickles forever beats a per-read timeout."""
        raw = resp.raw
        read1 = getattr(raw, "read1", None)  # urllib3 2.x: whatever has arrived, up to n bytes
        chunks = []
        size = 0
        while True:
            chunk = read1(4096) if read1 is not None else raw.read(1)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                raise IMDSError("oversized", f"{path}: body over {MAX_BODY} bytes")
            if self.clock.monotonic() > deadline:
                raise IMDSError("timeout", f"{path}: body still arriving after {self.timeout:g}s")
        return b"".join(chunks).decode("utf-8", "replace")

    def get(self, path: str) -> Answer:
        """GET a metadata path. 200 and 404 are answers; 401 refreshes the token and retries once.

        Raises IMDSDisabled on 403 and IMDSError on transient failures (including 429 and 5xx).
        """
        with self._lock:
            return self._get_locked(path)

    def _get_locked(self, path: str) -> Answer:
        for attempt in (1, 2):
            if not self._v1 and not self._token_valid():
                self._fetch_token()
            headers = {} if self._v1 or self._token is None else {TOKEN_HEADER: self._token}
            answer = self._request("GET", path, headers)
            if answer.status == 401 and attempt == 1:
                log.info("IMDS answered 401 for %s; fetching a new token", path)
                self.invalidate_token()
                self._v1 = False
                continue
            if answer.status == 403:
                raise IMDSDisabled(f"IMDS answered 403 for {path}: IMDS is disabled or the request is forbidden")
            if answer.status == 429:
                raise IMDSError("throttled", f"{path}: 429 Too Many Requests", 429)
            if answer.status >= 500:
                raise IMDSError("server-error", f"{path}: {answer.status}", answer.status)
            if answer.status == 401:
                raise IMDSError("unauthorized", f"{path}: 401 after a fresh token", 401)
            if answer.status not in (200, 404):
                raise IMDSError("unexpected-status", f"{path}: {answer.status}", answer.status)
            return answer
        raise AssertionError("unreachable")

    def get_text(self, path: str) -> Optional[str]:
        answer = self.get(path)
        return answer.text if answer.found else None

    def close(self) -> None:
        self._session.close()
