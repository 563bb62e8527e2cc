"""An IMDS simulator with the realism that matters for a termination agent.

Users rehearse their hooks against it (``spot-agent simulate serve``), and the tests and the demo use
it. Beyond what amazon-ec2-metadata-mock serves, it enforces IMDSv2's token rules (TTL bounds, 401 on a
missing or expired token, 403 for a PUT carrying X-Forwarded-For) and injects the faults an agent meets
in the wild: 429 bursts, 5xx, slow or never-ending answers (a body that trickles, or headers that
trickle: each byte in time for a per-read timeout, the whole never), 403 (IMDS disabled), token
expiry, and malformed bodies. It is driven over HTTP under ``/_sim/v1/`` so any process can trigger a notice.
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

CONTROL = "/_sim/v1/"


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _imds_date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%d %b %Y %H:%M:%S GMT")


@dataclass
class Identity:
    instance_id: str = "i-0123456789abcdef0"
    instance_type: str = "g5.xlarge"
    availability_zone: str = "us-east-1a"
    region: str = "us-east-1"
    life_cycle: str = "spot"
    account_id: str = "123456789012"
    ami_id: str = "ami-0123456789abcdef0"


@dataclass
class SimState:
    identity: Identity = field(default_factory=Identity)
    require_v2: bool = True
    spot: Optional[Dict[str, Any]] = None  # {"action": ..., "time": epoch}
    spot_time_moves: bool = False  # recompute "time" on every GET, as some simulators do
    rebalance: Optional[float] = None
    scheduled: List[Dict[str, Any]] = field(default_factory=list)
    lifecycle_state: Optional[str] = None
    disabled: bool = False  # 403 on everything
    fault_429: int = 0  # the next N requests get 429
    fault_5xx: int = 0
    fault_5xx_code: int = 500
    slow_seconds: float = 0.0
    slow_count: int = 0  # -1: until cleared
    hang_count: int = 0  # the next N GETs send headers, then a body that never ends
    slow_headers_count: int = 0  # the next N requests trickle their headers a byte at a time, for ever
    slow_headers_interval: float = 0.05  # seconds between header bytes
    malformed: Dict[str, Tuple[str, int]] = field(default_factory=dict)  # path -> (body, remaining count; -1 forever)
    tokens: Dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    max_ttl_override: Optional[int] = None
    requests: int = 0
    max_token_headers: int = 0  # most X-aws-ec2-metadata-token headers seen on one request
    requests_by_path: Dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


BLOCK_DEVICES = {"ami": "xvda", "root": "/dev/xvda"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hanging answer must not hold up stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # A client that hangs up mid-request (agents being killed, timeouts) is normal here.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class IMDSSimulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 1338, identity: Optional[Identity] = None,
                 require_v2: bool = True) -> None:
        self.state = SimState(identity=identity or Identity(), require_v2=require_v2)
        self.lock = threading.RLock()
        sim = self

        class Handler(_Handler):
            simulator = sim

        self.httpd = _Server((host, port), Handler)
        self.stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "IMDSSimulator":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="imds-sim", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- control (also reachable over HTTP) ---------------------------------------------------
    def control(self, command: str, body: Dict[str, Any]) -> Dict[str, Any]:
        s = self.state
        with self.lock:
            if command == "spot":
                action = body.get("action", "terminate")
                if "time" in body and body["time"]:
                    when = body["time"]
                else:
                    when = time.time() + float(body.get("in", 120))
                s.spot = {"action": action, "time": when}
                s.spot_time_moves = bool(body.get("moving_time", False))
            elif command == "rebalance":
                s.rebalance = time.time()
            elif command == "scheduled":
                not_before = time.time() + float(body.get("in", 600))
                event = {
                    "Code": body.get("code", "instance-stop"),
                    "Description": body.get("description", "The instance is scheduled for stop"),
                    "EventId": body.get("event_id") or f"instance-event-{secrets.token_hex(8)}",
                    "NotBefore": _imds_date(not_before),
                    "State": body.get("state", "active"),
                }
                if body.get("duration"):
                    event["NotAfter"] = _imds_date(not_before + float(body["duration"]))
                existing = [e for e in s.scheduled if e["EventId"] == event["EventId"]]
                if existing:
                    existing[0]["State"] = event["State"]
                else:
                    s.scheduled.append(event)
                return {"ok": True, "event_id": event["EventId"]}
            elif command == "asg":
                s.lifecycle_state = body.get("state", "Terminated")
            elif command == "fault":
                kind = body.get("kind")
                count = int(body.get("count", 1))
                if kind == "429":
                    s.fault_429 = count
                elif kind == "5xx":
                    s.fault_5xx = count
                    s.fault_5xx_code = int(body.get("code", 500))
                elif kind == "slow":
                    s.slow_seconds = float(body.get("seconds", 2.0))
                    s.slow_count = count
                elif kind == "hang":
                    s.hang_count = count
                elif kind == "slow-headers":
                    s.slow_headers_count = count
                    s.slow_headers_interval = float(body.get("seconds", 0.05))
                elif kind == "403":
                    s.disabled = bool(body.get("on", True))
                elif kind == "token-expiry":
                    s.tokens.clear()
                elif kind == "malformed":
                    s.malformed[body.get("path", "spot/instance-action")] = (body.get("body", "{not json"), count)
                else:
                    raise ValueError(f"unknown fault {kind!r}; use 429, 5xx, slow, hang, slow-headers, 403, token-expiry, malformed")
            elif command == "clear":
                what = body.get("what", "all")
                if what in ("all", "spot"):
                    s.spot = None
                if what in ("all", "rebalance"):
                    s.rebalance = None
                if what in ("all", "scheduled"):
                    s.scheduled = []
                if what in ("all", "asg"):
                    s.lifecycle_state = None
                if what in ("all", "faults"):
                    s.fault_429 = s.fault_5xx = s.hang_count = s.slow_count = s.slow_headers_count = 0
                    s.slow_seconds = 0.0
                    s.disabled = False
                    s.malformed = {}
            elif command == "stats":
                return {"requests": s.requests, "max_token_headers": s.max_token_headers, "by_path": dict(s.requests_by_path),
                        "uptime": time.monotonic() - s.started}
            elif command == "identity":
                for key, value in body.items():
                    if hasattr(s.identity, key):
                        setattr(s.identity, key, value)
            else:
                raise ValueError(f"unknown command {command!r}")
            return {"ok": True}

    # -- the metadata tree --------------------------------------------------------------------
    def lookup(self, path: str) -> Optional[str]:
        s = self.state
        ident = s.identity
        md = "/latest/meta-data/"
        if path.startswith(md):
            key = path[len(md):]
            if key in s.malformed:
                body, remaining = s.malformed[key]
                if remaining > 0:
                    remaining -= 1
                    if remaining == 0:
                        del s.malformed[key]
                    else:
                        s.malformed[key] = (body, remaining)
                elif remaining == 0:
                    del s.malformed[key]
                return body
            simple = {
                "instance-id": ident.instance_id,
                "instance-type": ident.instance_type,
                "instance-life-cycle": ident.life_cycle,
                "placement/availability-zone": ident.availability_zone,
                "placement/region": ident.region,
                "ami-id": ident.ami_id,
                "local-ipv4": "127.0.0.1",
            }
            if key in simple:
                return simple[key]
            if key == "":
                return "\n".join(["ami-id", "autoscaling/", "block-device-mapping/", "events/", "instance-id",
                                  "instance-life-cycle", "instance-type", "placement/", "spot/"])
            if key in ("block-device-mapping", "block-device-mapping/"):
                return "\n".join(BLOCK_DEVICES)
            if key.startswith("block-device-mapping/"):
                return BLOCK_DEVICES.get(key.split("/", 1)[1])
            if key == "spot/instance-action" and s.spot:
                when = time.time() + 120 if s.spot_time_moves else s.spot["time"]
                return json.dumps({"action": s.spot["action"], "time": _iso(when)})
            if key == "spot/termination-time" and s.spot and s.spot["action"] == "terminate":
                return _iso(s.spot["time"])
            if key == "events/recommendations/rebalance" and s.rebalance:
                return json.dumps({"noticeTime": _iso(s.rebalance)})
            if key == "events/maintenance/scheduled":
                return json.dumps(s.scheduled)
            if key == "events/maintenance/history":
                return "[]"
            if key == "autoscaling/target-lifecycle-state" and s.lifecycle_state:
                return s.lifecycle_state
            return None
        if path == "/latest/dynamic/instance-identity/document":
            return json.dumps({
                "accountId": ident.account_id, "architecture": "x86_64",
                "availabilityZone": ident.availability_zone, "imageId": ident.ami_id,
                "instanceId": ident.instance_id, "instanceType": ident.instance_type,
                "pendingTime": _iso(time.time() - 60), "privateIp": "127.0.0.1",
                "region": ident.region, "version": "2017-09-30",
            }, indent=2)
        return None


class _Handler(BaseHTTPRequestHandler):
    simulator: IMDSSimulator
    protocol_version = "HTTP/1.1"  # keep-alive, like IMDS
    server_version = "EC2ws"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        pass

    def _send(self, status: int, body: str = "", content_type: str = "text/plain", headers: Optional[Dict[str, str]] = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _count(self) -> None:
        s = self.simulator.state
        s.requests += 1
        s.max_token_headers = max(s.max_token_headers, len(self.headers.get_all("X-aws-ec2-metadata-token") or []))
        s.requests_by_path[self.path] = s.requests_by_path.get(self.path, 0) + 1

    def _faults(self) -> bool:
        """Apply injected faults; True when the request was answered by one."""
        sim = self.simulator
        s = sim.state
        with sim.lock:
            slow = 0.0
            if s.slow_count:
                slow = s.slow_seconds
                if s.slow_count > 0:
                    s.slow_count -= 1
            hang = False
            if s.hang_count > 0 and self.command == "GET":
                s.hang_count -= 1
                hang = True
            slow_headers = 0.0
            if s.slow_headers_count:
                slow_headers = s.slow_headers_interval
                if s.slow_headers_count > 0:
                    s.slow_headers_count -= 1
            if s.disabled:
                status = 403
            elif s.fault_429 > 0:
                s.fault_429 -= 1
                status = 429
            elif s.fault_5xx > 0:
                s.fault_5xx -= 1
                status = s.fault_5xx_code
            else:
                status = 0
        if slow:
            time.sleep(slow)
        if slow_headers:
            self._trickle_headers(slow_headers)
            return True
        if hang:
            # Headers promise a body, then it trickles forever: only a total deadline saves a client.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(600):
                    if sim.stopped.is_set():
                        break
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            self.close_connection = True
            return True
        if status == 403:
            self._send(403, "Forbidden")
            return True
        if status == 429:
            self._send(429, "Too Many Requests")
            return True
        if status:
            self._send(status, "Internal Server Error")
            return True
        return False

    def _trickle_headers(self, interval: float) -> None:
        """A status line, then one header whose value never ends, a byte every ``interval`` seconds.

        One long header (not many short ones): http.client gives up after 100 headers, but reads a
        64 KiB line, so at 20 bytes a second only a deadline over the whole request ends this.
        """
        sim = self.simulator
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: ":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(interval)
            for _ in range(int(600 / interval)):
                if sim.stopped.is_set():
                    break
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(interval)
        except OSError:
            pass
        self.close_connection = True

    def _read_json(self) -> Dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        data = json.loads(self.rfile.read(length).decode() or "{}")
        if not isinstance(data, dict):
            raise ValueError("control body must be a JSON object")
        return data

    def do_PUT(self) -> None:  # noqa: N802
        if self.path.startswith(CONTROL):
            return self._control()
        self._count()
        if self.path != "/latest/api/token":
            return self._send(404 if self.path.startswith("/latest/") else 400, "Not Found")
        if self._faults():
            return
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Forbidden")
        raw = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        try:
            ttl = int(raw) if raw is not None else -1
        except ValueError:
            ttl = -1
        if not 1 <= ttl <= 21600:
            return self._send(400, "Bad Request")
        s = self.simulator.state
        token = secrets.token_urlsafe(40)
        effective = ttl if s.max_ttl_override is None else min(ttl, s.max_ttl_override)
        with self.simulator.lock:
            now = time.monotonic()
            s.tokens = {t: exp for t, exp in s.tokens.items() if exp > now}
            s.tokens[token] = now + effective
        self._send(200, token, headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith(CONTROL):
            return self._control()
        self._count()
        if self._faults():
            return
        s = self.simulator.state
        token = self.headers.get("X-aws-ec2-metadata-token")
        with self.simulator.lock:
            valid = token is not None and s.tokens.get(token, 0) > time.monotonic()
        if token is not None and not valid:
            return self._send(401, "Unauthorized")
        if token is None and s.require_v2:
            return self._send(401, "Unauthorized")
        with self.simulator.lock:
            body = self.simulator.lookup(self.path.split("?", 1)[0])
        if body is None:
            return self._send(404, "Not Found", content_type="text/html")
        ctype = "application/json" if self.path.endswith("/document") else "text/plain"
        self._send(200, body, content_type=ctype)

    def do_POST(self) -> None:  # noqa: N802
        if self.path.startswith(CONTROL):
            return self._control()
        self._send(405, "Method Not Allowed")

    def _control(self) -> None:
        command = self.path[len(CONTROL):].strip("/")
        try:
            body = self._read_json()
            result = self.simulator.control(command, body)
        except (ValueError, TypeError) as exc:
            return self._send(400, json.dumps({"error": str(exc)}), "application/json")
        self._send(200, json.dumps(result), "application/json")
