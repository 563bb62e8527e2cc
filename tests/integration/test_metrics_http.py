"""The metrics listener over real HTTP on loopback: paths, health flips, formats, TLS, promtool lint."""

from __future__ import annotations

import gzip
import http.client
import time
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from typing import Dict, Optional, Tuple

import pytest

from agent import metrics
from agent.config import MetricsSection
from agent.http_server import MAX_CONNECTIONS, MetricsServer


class Flags:
    def __init__(self) -> None:
        self.alive = True
        self.ready = False


@pytest.fixture
def flags() -> Flags:
    return Flags()


@pytest.fixture
def server(flags: Flags):
    srv = MetricsServer(MetricsSection(listen="127.0.0.1:0"), lambda: flags.alive, lambda: flags.ready)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def get(url: str, headers: Optional[Dict[str, str]] = None, method: str = "GET",
        context: Optional[ssl.SSLContext] = None) -> Tuple[int, Dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_healthz_follows_is_alive(server: MetricsServer, flags: Flags) -> None:
    assert get(server.url + "/healthz")[::2] == (200, b"alive\n")
    flags.alive = False
    assert get(server.url + "/healthz")[::2] == (503, b"not alive\n")
    flags.alive = True
    assert get(server.url + "/healthz")[0] == 200


def test_readyz_flips_when_ready_is_reached(server: MetricsServer, flags: Flags) -> None:
    assert get(server.url + "/readyz")[::2] == (503, b"not ready\n")
    flags.ready = True
    assert get(server.url + "/readyz")[::2] == (200, b"ready\n")


def test_a_probe_that_raises_is_a_failed_probe() -> None:
    def broken() -> bool:
        raise RuntimeError("main loop state unknown")

    with MetricsServer(MetricsSection(listen="127.0.0.1:0"), broken, broken) as srv:
        assert get(srv.url + "/healthz")[0] == 503
        assert get(srv.url + "/readyz")[0] == 503
        assert get(srv.url + "/metrics")[0] == 200  # the listener itself survives


def test_landing_page_links_the_endpoints(server: MetricsServer) -> None:
    code, headers, body = get(server.url + "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    for path in (b'href="/metrics"', b'href="/healthz"', b'href="/readyz"'):
        assert path in body


def test_unknown_paths_and_methods(server: MetricsServer) -> None:
    code, _, body = get(server.url + "/nope")
    assert code == 404 and b"/metrics" in body
    code, headers, _ = get(server.url + "/metrics", method="POST")
    assert code == 405 and headers["Allow"] == "GET, HEAD"
    code, headers, body = get(server.url + "/metrics", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def test_metrics_text_openmetrics_gzip_and_name_filter(server: MetricsServer) -> None:
    metrics.NOTICE_ACTIVE.labels(kind="manual").set(0)
    code, headers, body = get(server.url + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'spot_agent_notice_active{kind="manual"} 0.0' in body
    assert b"spot_agent_build_info{" in body

    code, headers, body = get(server.url + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")

    code, headers, body = get(server.url + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert b"spot_agent_state{" in gzip.decompress(body)

    code, _, body = get(server.url + "/metrics?name[]=spot_agent_ready")
    lines = [line for line in body.decode().splitlines() if not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("spot_agent_ready "), lines


def test_promtool_check_metrics_passes_on_a_live_scrape(server: MetricsServer, tmp_path) -> None:
    # Exercise every kind of series, including the scrape-time filesystem collector on a real directory.
    metrics.set_state("ready")
    metrics.READY.set(1)
    metrics.IMDS_UP.set(1)
    metrics.IMDS_REQUESTS.labels(path="spot/instance-action", code_class="2xx").inc()
    metrics.NOTICE_ACTIVE.labels(kind="spot-interruption").set(1)
    metrics.NOTICES.labels(kind="spot-interruption").inc()
    metrics.DEADLINE.set(1_800_000_120)
    metrics.DRAIN_STEP_SECONDS.labels(step="snapshot").observe(1.5)
    metrics.DRAINS.labels(result="success").inc()
    metrics.SNAPSHOTS.labels(volume="lint").inc()
    metrics.DATASET_BYTES.labels(dataset="lint").inc(1024)
    metrics.DATASET_PROGRESS.labels(dataset="lint").set(0.5)
    metrics.CHECKPOINT_LAST_COMMIT.labels(checkpoint="lint").set(1_800_000_000)
    metrics.HOOK_SECONDS.labels(hook="lint").observe(0.3)
    metrics.MOUNTED_VOLUMES.set("lint", str(tmp_path), "/dev/loop-not-there")
    try:
        for accept in ("", "application/openmetrics-text; version=1.0.0"):
            code, _, body = get(server.url + "/metrics", {"Accept": accept} if accept else None)
            assert code == 200
            text = body.decode()
            assert f'spot_agent_filesystem_size_bytes{{mountpoint="{tmp_path}",volume="lint"}}' in text
            assert 'spot_agent_drain_step_duration_seconds_bucket{le="2.5",step="snapshot"}' in text
            if accept:
                continue  # promtool 2.42 lints the text format only
            lint = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=body,
                                  capture_output=True, timeout=30)
            assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (lint.stdout, lint.stderr)
    finally:
        metrics.MOUNTED_VOLUMES.unset("lint")
        metrics.NOTICE_ACTIVE.labels(kind="spot-interruption").set(0)
        metrics.set_state("starting")
        metrics.READY.set(0)


def test_promtool_check_metrics_can_fail() -> None:
    """The lint above is meaningful: promtool rejects a counter without _total."""
    bad = b"# HELP spot_agent_things Things.\n# TYPE spot_agent_things counter\nspot_agent_things 1\n"
    lint = subprocess.run(["promtool", "check", "metrics"], input=bad, capture_output=True, timeout=30)
    assert lint.returncode != 0 and b"_total" in lint.stdout + lint.stderr


def test_a_taken_port_is_a_clear_oserror(server: MetricsServer) -> None:
    other = MetricsServer(MetricsSection(listen=f"127.0.0.1:{server.port}"), lambda: True, lambda: True)
    with pytest.raises(OSError, match=r"\[metrics\] listen = '127\.0\.0\.1:\d+': cannot listen on .*in use"):
        other.start()


def test_stop_releases_the_port(flags: Flags) -> None:
    srv = MetricsServer(MetricsSection(listen="127.0.0.1:0"), lambda: True, lambda: True).start()
    port = srv.port
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    again = MetricsServer(MetricsSection(listen=f"127.0.0.1:{port}"), lambda: True, lambda: True).start()
    try:
        assert get(again.url + "/healthz")[0] == 200
    finally:
        again.stop()


def test_ipv6_loopback() -> None:
    try:
        srv = MetricsServer(MetricsSection(listen="[::1]:0"), lambda: True, lambda: True).start()
    except OSError as exc:
        pytest.fail(f"IPv6 loopback unavailable here: {exc}")
    try:
        assert srv.url.startswith("http://[::1]:")
        assert get(srv.url + "/healthz")[0] == 200
    finally:
        srv.stop()


def test_excess_connections_get_503_and_slow_clients_do_not_block_others(server: MetricsServer) -> None:
    # Hold every slot with clients that never send a request (the accept loop must stay responsive).
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        # Wait until all idle connections have been accepted and hold a slot.
        deadline = time.monotonic() + 5
        while server._httpd.slots._value > 0 and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.02)
        assert server._httpd.slots._value == 0  # noqa: SLF001
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 503
        conn.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if get(server.url + "/healthz")[0] == 200:
            break
        time.sleep(0.05)
    assert get(server.url + "/healthz")[0] == 200


@pytest.fixture
def tls_files(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_tls(tls_files, flags: Flags) -> None:
    cert, key = tls_files
    flags.ready = True
    with MetricsServer(MetricsSection(listen="127.0.0.1:0", tls_cert=cert, tls_key=key),
                       lambda: flags.alive, lambda: flags.ready) as srv:
        assert srv.url.startswith("https://")
        context = ssl.create_default_context(cafile=cert)
        code, _, body = get(srv.url + "/metrics", context=context)
        assert code == 200 and b"spot_agent_build_info" in body
        assert get(srv.url + "/readyz", context=context)[0] == 200
        # Plain HTTP to the TLS port gets nothing useful, and the server keeps serving.
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError)):
            urllib.request.urlopen(srv.url.replace("https", "http") + "/metrics", timeout=5).read()
        assert get(srv.url + "/healthz", context=context)[0] == 200


def test_bad_tls_files_are_a_clear_oserror(tmp_path) -> None:
    missing = str(tmp_path / "nope.pem")
    srv = MetricsServer(MetricsSection(listen="127.0.0.1:0", tls_cert=missing, tls_key=missing), lambda: True, lambda: True)
    with pytest.raises(OSError, match=r"\[metrics\] tls_cert/tls_key: cannot load"):
        srv.start()


def test_the_listener_thread_is_a_daemon_thread(server: MetricsServer) -> None:
    assert server._thread is not None and server._thread.daemon  # noqa: SLF001
