"""The metrics and health listener: ``/metrics``, ``/healthz``, ``/readyz`` and a landing page.

prometheus_client's own ``start_http_server`` serves one path; the agent also needs health endpoints
that a load balancer, systemd or a human can hit, so this is a small ``http.server`` handler that
renders the same registry. Design points:

- Idle cost is zero: the accept loop blocks in ``select`` on the listening socket and a wake-up pipe,
  with no timeout, so an idle agent never wakes up for the listener.
- Work per request is bounded: HTTP/1.0 (one request per connection, no idle keep-alive threads), a
  socket timeout on every connection, a cap on concurrent connections (the excess gets a 503), and the
  registry's size is bounded by configuration (no unbounded labels).
- TLS is optional; the handshake happens in the connection's own thread, so a slow or hostile client
  can never stall the accept loop.
"""

from __future__ import annotations

import errno
import gzip
import html
import logging
import os
import selectors
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from agent import __version__
from agent.config import MetricsSection
from agent.metrics import REGISTRY

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # concurrent requests; Prometheus needs one, a human with curl another
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request or read the answer


def parse_listen(listen: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` into (host, port); an empty host means all IPv4 addresses."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"[metrics] listen must be HOST:PORT (e.g. 0.0.0.0:8947), got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restart must not wait out TIME_WAIT on the same port

    def __init__(self, address: Tuple[str, int], handler: type, owner: "MetricsServer") -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "[::]:8947" should mean IPv6 and IPv4, as it does for most servers.
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:  # pragma: no cover - kernels without dual stack
                pass
        super().server_bind()

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        # A client that hangs up or fails the TLS handshake is not our problem; never print a trace.
        log.debug("metrics: request from %s failed", client_address[0] if client_address else "?", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = f"spot-agent/{__version__}"
    timeout = REQUEST_TIMEOUT

    def setup(self) -> None:
        context = self.server.owner.ssl_context
        if context is not None:
            self.request.settimeout(self.timeout)
            self.request = context.wrap_socket(self.request, server_side=True)  # handshake, bounded by the timeout
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.close()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("metrics: %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _refuse(self) -> None:
        self._send(405, b"only GET and HEAD\n", "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        owner = self.server.owner
        if url.path == "/metrics":
            self._metrics(url.query, head)
        elif url.path == "/healthz":
            self._probe(owner.is_alive, "alive", head)
        elif url.path == "/readyz":
            self._probe(owner.is_ready, "ready", head)
        elif url.path in ("/", "/index.html"):
            self._send(200, _landing_page(), "text/html; charset=utf-8", head=head)
        else:
            self._send(404, b"not found; try /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8", head=head)

    def _probe(self, check: Callable[[], bool], what: str, head: bool) -> None:
        try:
            ok = bool(check())
        except Exception:  # noqa: BLE001 - a probe that cannot answer is a failed probe
            log.warning("metrics: /%sz check raised", "health" if what == "alive" else "ready", exc_info=True)
            ok = False
        body = f"{what}\n" if ok else f"not {what}\n"
        self._send(200 if ok else 503, body.encode(), "text/plain; charset=utf-8", head=head)

    def _metrics(self, query: str, head: bool) -> None:
        registry = self.server.owner.registry
        names = parse_qs(query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(registry)
        except Exception:  # noqa: BLE001 - a broken collector must not kill the listener
            log.exception("metrics: collecting the registry failed")
            self._send(500, b"collecting metrics failed; see the agent's log\n", "text/plain; charset=utf-8", head=head)
            return
        extra = {}
        if "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024:
            body = gzip.compress(body, compresslevel=1)
            extra["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, head=head, extra=extra)

    def _send(self, code: int, body: bytes, content_type: str, head: bool = False, extra: Optional[dict] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _landing_page() -> bytes:
    version = html.escape(__version__)
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>spot-agent</title></head><body>"
        f"<h1>spot-agent {version}</h1>"
        "<p>Makes EC2 spot capacity safe for long training and batch jobs.</p><ul>"
        "<li><a href=\"/metrics\">/metrics</a>: Prometheus metrics</li>"
        "<li><a href=\"/healthz\">/healthz</a>: 200 while the process and its main loop are alive</li>"
        "<li><a href=\"/readyz\">/readyz</a>: 200 once READY was reached (volumes mounted, datasets warm)</li>"
        "</ul><p>On the instance: <code>spot-agent status</code>.</p></body></html>\n"
    ).encode()


def _ssl_context(section: MetricsSection) -> Optional[ssl.SSLContext]:
    if not section.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(section.tls_cert, section.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"[metrics] tls_cert/tls_key: cannot load {section.tls_cert} / {section.tls_key}: {exc}") from None
    return context


class MetricsServer:
    """The listener as the daemon uses it: ``start()`` binds and serves on a daemon thread."""

    def __init__(self, section: MetricsSection, is_alive: Callable[[], bool], is_ready: Callable[[], bool],
                 registry: Optional[CollectorRegistry] = None) -> None:
        self.section = section
        self.is_alive = is_alive
        self.is_ready = is_ready
        self.registry = registry if registry is not None else REGISTRY
        self.ssl_context: Optional[ssl.SSLContext] = None
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._wake_r: Optional[int] = None
        self._wake_w: Optional[int] = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("MetricsServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0] if self._httpd else "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    def start(self) -> "MetricsServer":
        if self._httpd is not None:
            return self
        host, port = parse_listen(self.section.listen)
        self.ssl_context = _ssl_context(self.section)
        try:
            httpd = _Server((host, port), _Handler, self)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = " (another process holds it; change [metrics] listen)" if exc.errno == errno.EADDRINUSE else ""
            raise OSError(exc.errno, f"[metrics] listen = {self.section.listen!r}: cannot listen on {host}:{port}: {reason}{hint}") from None
        httpd.socket.setblocking(False)  # a client that resets before accept() must not block the loop
        self._httpd = httpd
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics: serving %s/metrics", self.url)
        return self

    def _serve(self) -> None:
        assert self._httpd is not None and self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._httpd.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = sel.select()  # no timeout: an idle listener costs nothing
                if any(key.fd == self._wake_r for key, _ in ready):
                    return
                # BaseServer's own accept-and-dispatch step (what serve_forever calls), minus its polling.
                self._httpd._handle_request_noblock()

    def stop(self) -> None:
        if self._httpd is None:
            return
        assert self._wake_w is not None and self._wake_r is not None
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
