"""A fault-injecting HTTP proxy on loopback, in front of the local S3 (moto), for transfer tests.

There is no netem or toxiproxy on these machines, and the interesting failures of an S3 download are
HTTP-level anyway: a 503 SlowDown, a connection reset in the middle of a body, a body that stops
short (clean FIN before Content-Length), or a short body with a matching Content-Length (only the
client's own size check catches that). Faults are given per matching request number, so a test
knows exactly which request breaks. Every request is logged (method, path, query, range, fault), so
tests can count GETs per key, e.g. to prove a resumed sync did not fetch completed files again.

Usage::

    proxy = FaultProxy(upstream_url, [Fault("reset", method="GET", nth={2, 5})]).start()
    boto3.client("s3", endpoint_url=proxy.url) ...
    proxy.requests  # [Request(method, path, query, range, fault)]
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, List, Optional, Set
from urllib.parse import unquote, urlsplit

KINDS = ("slowdown", "reset", "truncate", "short", "delay", "redirect")

REDIRECT_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code>'
                 b"<Message>The bucket you are attempting to access must be addressed using the specified endpoint.</Message></Error>")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>")


@dataclass
class Fault:
    """Break the ``nth`` (1-based) requests matching ``method``/``path_contains``; ``every`` = each k-th.

    kinds: ``slowdown`` (503 SlowDown before any body), ``reset`` (RST after half the body),
    ``truncate`` (FIN after half the body, Content-Length promising all of it), ``short``
    (Content-Length and body both cut to half: a "valid" but wrong response), ``delay`` (sleep
    ``seconds`` before answering), ``redirect`` (301 PermanentRedirect, as S3 answers a wrong region).
    """

    kind: str
    method: str = ""
    path_contains: str = ""
    query_contains: str = ""
    nth: Set[int] = field(default_factory=set)
    every: int = 0
    seconds: float = 0.0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(KINDS)}")

    def matches(self, method: str, path: str, query: str) -> bool:
        return ((not self.method or self.method == method) and self.path_contains in path
                and self.query_contains in query)

    def fires(self) -> bool:
        self.seen += 1
        return self.seen in self.nth or (self.every > 0 and self.seen % self.every == 0)


@dataclass
class Request:
    method: str
    path: str  # unquoted path, e.g. /bucket/key
    query: str
    range: str
    fault: str
    status: int = 0


class FaultProxy:
    def __init__(self, upstream: str, faults: Iterable[Fault] = ()) -> None:
        u = urlsplit(upstream)
        self.upstream_host = u.hostname or "127.0.0.1"
        self.upstream_port = u.port or 80
        self.faults: List[Fault] = list(faults)
        self.requests: List[Request] = []
        self.lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    def set_faults(self, faults: Iterable[Fault]) -> None:
        with self.lock:
            self.faults = list(faults)

    def count(self, method: str = "", path: str = "", query_contains: Optional[str] = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if (not method or r.method == method) and (not path or r.path == path)
                       and (query_contains is None or query_contains in r.query))

    def _pick(self, method: str, path: str, query: str) -> Optional[Fault]:
        with self.lock:
            for f in self.faults:
                if f.matches(method, path, query) and f.fires():
                    return f
        return None

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                u = urlsplit(self.path)
                path, query = unquote(u.path), u.query
                body = self._body()
                fault = proxy._pick(self.command, path, query)
                rec = Request(self.command, path, query, self.headers.get("Range", ""), fault.kind if fault else "")
                with proxy.lock:
                    proxy.requests.append(rec)
                if fault is not None and fault.kind in ("slowdown", "redirect"):
                    rec.status, payload = (503, SLOWDOWN_BODY) if fault.kind == "slowdown" else (301, REDIRECT_BODY)
                    self.send_response(rec.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault is not None and fault.kind == "reset" and self.command in ("PUT", "POST"):
                    # An upload cut off mid-body: the server never sees a complete request.
                    rec.status = -1
                    self._reset()
                    return
                if fault is not None and fault.kind == "delay":
                    time.sleep(fault.seconds)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                rec.status = resp.status
                kind = fault.kind if fault is not None else ""
                if kind in ("reset", "truncate", "short") and len(data) < 2:
                    if kind == "reset":
                        self._reset()
                        return
                    kind = ""
                half = len(data) // 2
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        continue
                    self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(half if kind == "short" else len(data)))
                self.end_headers()
                if kind == "reset":
                    self.wfile.write(data[:half])
                    self.wfile.flush()
                    self._reset()
                    return
                if kind == "truncate":
                    self.wfile.write(data[:half])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_WR)
                    return
                self.wfile.write(data[:half] if kind == "short" else data)

            def _reset(self) -> None:
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
