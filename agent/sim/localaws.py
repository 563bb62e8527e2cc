"""A local S3/EC2/Auto Scaling endpoint on loopback: moto's server, plus what moto lacks.

moto does not implement CompleteLifecycleAction or RecordLifecycleActionHeartbeat (it answers 500).
We add both here and record each call, so the demo and the tests can assert that the drain completed
the lifecycle action exactly once. Everything listens on 127.0.0.1 only.

``strict=True`` puts :class:`agent.sim.strict.StrictModel` in front of moto as a WSGI middleware
(:class:`StrictMiddleware`): state changes take time, describes are eventually consistent, calls are
throttled and refused in the wrong state, lifecycle actions wait in ``Terminating:Wait``. Several agent
processes pointed at one strict server (``python -m agent.sim.localaws --strict``) share its token
buckets: the fleet mode. Each call is logged with the caller's access key id, so the fleet can tell
its agents apart (``GET /_spot-agent/calls``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qsl

from agent.sim.strict import (AUTOSCALING, EC2, AWSError, Request, StrictModel, StrictSettings, ec2_error_body,
                              query_error_body, settings_from)

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

LIFECYCLE_CALLS: List[Dict[str, Any]] = []
_LOCK = threading.Lock()
_record_file: Optional[str] = None
_listeners: List[Callable[[Dict[str, Any]], None]] = []


def _record(call: Dict[str, Any]) -> None:
    with _LOCK:
        call = dict(call, at=time.time())
        LIFECYCLE_CALLS.append(call)
        if _record_file:
            with open(_record_file, "a") as fh:
                fh.write(json.dumps(call) + "\n")
        listeners = list(_listeners)
    for fn in listeners:
        fn(call)


def _install_autoscaling_extensions() -> None:
    from moto.autoscaling.responses import AutoScalingResponse

    if getattr(AutoScalingResponse, "_spot_agent_patched", False):
        return

    def _params(self: Any) -> Dict[str, Any]:
        return {
            "group": self._get_param("AutoScalingGroupName"),
            "hook": self._get_param("LifecycleHookName"),
            "instance_id": self._get_param("InstanceId"),
            "token": self._get_param("LifecycleActionToken"),
        }

    def _check(self: Any, params: Dict[str, Any]) -> None:
        from moto.autoscaling.exceptions import ValidationError

        hooks = self.autoscaling_backend.describe_lifecycle_hooks(params["group"], [params["hook"]])
        if not hooks:
            raise ValidationError(f"No Lifecycle Hook found with name {params['hook']} for group {params['group']}")

    def complete_lifecycle_action(self: Any) -> str:
        params = _params(self)
        _check(self, params)
        params["result"] = self._get_param("LifecycleActionResult")
        params["call"] = "CompleteLifecycleAction"
        _record(params)
        return _EMPTY.format(action="CompleteLifecycleAction")

    def record_lifecycle_action_heartbeat(self: Any) -> str:
        params = _params(self)
        _check(self, params)
        params["call"] = "RecordLifecycleActionHeartbeat"
        _record(params)
        return _EMPTY.format(action="RecordLifecycleActionHeartbeat")

    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]
    AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat  # type: ignore[attr-defined]
    AutoScalingResponse._spot_agent_patched = True  # type: ignore[attr-defined]


_EMPTY = (
    '<{action}Response xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
    "<{action}Result></{action}Result>"
    "<ResponseMetadata><RequestId>7c6e177f-f082-11e1-ac58-3714bEXAMPLE</RequestId></ResponseMetadata>"
    "</{action}Response>"
)


def lifecycle_calls(call: str = "") -> List[Dict[str, Any]]:
    with _LOCK:
        return [c for c in LIFECYCLE_CALLS if not call or c["call"] == call]


def on_lifecycle_call(fn: Callable[[Dict[str, Any]], None]) -> None:
    with _LOCK:
        _listeners.append(fn)


class MotoBackend:
    """:class:`agent.sim.strict.Backend` over moto's in-process state (every account and region)."""

    @staticmethod
    def _ec2() -> Iterable[Any]:
        from moto.ec2.models import ec2_backends

        for account in list(ec2_backends.values()):
            for region in list(account.keys()):
                yield account[region]

    def _volume(self, volume_id: str) -> Any:
        for b in self._ec2():
            if volume_id in b.volumes:
                return b.volumes[volume_id]
        return None

    def _instance(self, instance_id: str) -> Any:
        for b in self._ec2():
            for reservation in list(b.reservations.values()):
                for inst in reservation.instances:
                    if inst.id == instance_id:
                        return inst
        return None

    def volume_az(self, volume_id: str) -> Optional[str]:
        vol = self._volume(volume_id)
        return vol.availability_zone if vol is not None else None

    def volume_attachments(self, volume_id: str) -> List[Tuple[str, str]]:
        vol = self._volume(volume_id)
        return [(a.instance.id, a.device) for a in vol.attachments] if vol is not None else []

    def instance_az(self, instance_id: str) -> Optional[str]:
        inst = self._instance(instance_id)
        return inst.availability_zone if inst is not None else None

    def instance_devices(self, instance_id: str) -> Dict[str, str]:
        inst = self._instance(instance_id)
        if inst is None:
            return {}
        return {device: getattr(bdt, "volume_id", "") for device, bdt in inst.get_block_device_mapping}

    def instance_root_device(self, instance_id: str) -> str:
        inst = self._instance(instance_id)
        return getattr(inst, "root_device_name", "") if inst is not None else ""

    def terminating_hooks(self, instance_id: str) -> List[Tuple[str, str, float, str]]:
        from moto.autoscaling.models import autoscaling_backends

        out = []
        for account in list(autoscaling_backends.values()):
            for region in list(account.keys()):
                b = account[region]
                for state in b.describe_auto_scaling_instances([instance_id]):
                    group = state.auto_scaling_group_name
                    for hook in sorted(b.describe_lifecycle_hooks(group), key=lambda h: h.name):
                        if hook.lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING":
                            out.append((group, hook.name, float(hook.heartbeat_timeout), hook.default_result))
        return out

    def hook_transition(self, group: str, hook: str) -> str:
        from moto.autoscaling.models import autoscaling_backends

        for account in list(autoscaling_backends.values()):
            for region in list(account.keys()):
                for h in account[region].describe_lifecycle_hooks(group, [hook]):
                    return str(h.lifecycle_transition or "")
        return ""

    def written_gib(self, volume_id: str) -> Optional[float]:
        from agent.sim import blockdevs

        return blockdevs.written_gib(volume_id)


# The access key of the test's or the demo's own view of the cloud ("what is really there"): its calls
# pass the strict model untouched, unthrottled and unlogged, so an oracle never perturbs what it checks.
ORACLE_KEY = "spot-agent-oracle"

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]*/[^/]*/([^/]+)/")
_NAMESPACE = {AUTOSCALING: "http://autoscaling.amazonaws.com/doc/2011-01-01/"}


class StrictMiddleware:
    """WSGI in front of moto: parse the Action, let the model refuse it, rewrite what moto answers.

    Only the EC2 and Auto Scaling query APIs are judged; S3 and moto's own API pass through. The
    control API under ``/_spot-agent/`` drives what AWS does on its own (a group starting to terminate
    an instance) and shows the call log.
    """

    def __init__(self, app: Callable[..., Any], model: StrictModel) -> None:
        self.app = app
        self.model = model

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_spot-agent/"):
            return self._control(environ, start_response, path)
        auth = environ.get("HTTP_AUTHORIZATION", "")
        m = _CREDENTIAL.search(auth)
        service = m.group(2) if m else ""
        if (service not in (EC2, AUTOSCALING) or environ.get("REQUEST_METHOD") != "POST"
                or (m is not None and m.group(1) == ORACLE_KEY)):
            return self.app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        req = Request(service, params.get("Action", ""), params, m.group(1) if m else "")
        err = self.model.check(req)
        if err is not None:
            return self._error(req, err, start_response)
        captured: Dict[str, Any] = {}

        def capture(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        from agent.sim import blockdevs

        # an attachment's block device appears when it reaches "attached", not when moto (at once) says so
        delay = self.model.settings.attach_seconds if req.action == "AttachVolume" else 0.0
        with blockdevs.attach_delay(delay):
            chunks = self.app(environ, capture)
            try:
                out = b"".join(chunks)
            finally:
                if hasattr(chunks, "close"):
                    chunks.close()
        status = captured.get("status", "500 INTERNAL SERVER ERROR")
        if status.startswith("200"):
            self.model.learned(req, out)
            out = self.model.rewrite(req, out)
        headers = [(k, v) for k, v in captured.get("headers", []) if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(out))))
        start_response(status, headers)
        return [out]

    def _error(self, req: Request, err: AWSError, start_response: Callable[..., Any]) -> Iterable[bytes]:
        rid = str(uuid.uuid4())
        if req.service == EC2:
            body = ec2_error_body(err, rid)
        else:
            body = query_error_body(err, rid, _NAMESPACE.get(req.service, ""))
        reason = {400: "Bad Request", 503: "Service Unavailable"}.get(err.status, "Error")
        start_response(f"{err.status} {reason}", [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def _control(self, environ: Dict[str, Any], start_response: Callable[..., Any], path: str) -> Iterable[bytes]:
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        status, data = "200 OK", {}  # type: Tuple[str, Any]
        if path == "/_spot-agent/terminate":
            data = {"hooks": self.model.begin_termination(query.get("instance_id", ""))}
        elif path == "/_spot-agent/calls":
            data = self.model.calls_by(query.get("caller", ""))
        elif path == "/_spot-agent/lifecycle":
            data = lifecycle_calls(query.get("call", ""))
        elif path == "/_spot-agent/reset":
            self.model.reset()
            with _LOCK:
                LIFECYCLE_CALLS.clear()
        else:
            status, data = "404 Not Found", {"error": f"unknown control path {path}"}
        body = json.dumps(data).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def _make_threaded_server(strict: Optional[StrictModel], port: int) -> Any:
    from moto.server import ThreadedMotoServer

    class _Server(ThreadedMotoServer):
        """moto's threaded server, with the strict middleware around its app when asked for."""

        def _server_entry(self) -> None:
            from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                       create_backend_app)
            from werkzeug.serving import make_server

            app: Any = DomainDispatcherApplication(create_backend_app)
            if strict is not None:
                app = StrictMiddleware(app, strict)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return _Server(ip_address="127.0.0.1", port=port, verbose=False)


class LocalAWS:
    """moto's threaded server on 127.0.0.1 with our extensions. ``url`` is the endpoint for boto3.

    ``strict``: the strict model in front (``settings`` tune it; ``clock`` for tests). ``self.strict`` is
    the model, for in-process use (``begin_termination``, the call log)."""

    def __init__(self, port: int = 0, record_file: Optional[str] = None, strict: bool = False,
                 settings: Optional[StrictSettings] = None, clock: Any = None) -> None:
        global _record_file
        _install_autoscaling_extensions()
        _record_file = record_file
        self.strict: Optional[StrictModel] = None
        if strict:
            from agent.clock import SYSTEM_CLOCK

            self.strict = StrictModel(MotoBackend(), settings, clock or SYSTEM_CLOCK, on_lifecycle=_record)
        self._server = _make_threaded_server(self.strict, port)
        self.url = ""
        self._ticker: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    @property
    def mode(self) -> str:
        return "strict" if self.strict is not None else "instant"

    def start(self) -> "LocalAWS":
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        if self.strict is not None:
            # lifecycle hooks time out even when nobody calls: a slow tick, as Auto Scaling's own clock
            self._ticker = threading.Thread(target=self._tick, name="strict-aws-tick", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stopping.wait(0.5):
            if self.strict is not None:
                self.strict.tick()

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop()

    def reset(self) -> None:
        """Forget all resources (moto's reset API), recorded lifecycle calls and the strict overlays."""
        import requests

        requests.post(f"{self.url}/moto-api/reset", timeout=10)
        with _LOCK:
            LIFECYCLE_CALLS.clear()
        if self.strict is not None:
            self.strict.reset()

    def begin_termination(self, instance_id: str) -> List[str]:
        """What Auto Scaling does when it starts terminating ``instance_id``: strict mode waits in
        ``Terminating:Wait`` for the terminating hook (instant mode accepts completions any time)."""
        return self.strict.begin_termination(instance_id) if self.strict is not None else []

    def __enter__(self) -> "LocalAWS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true", help="the strict model in front of moto (docs/simulators.md: Local AWS)")
    parser.add_argument("--fast", action="store_true", help="strict, on the demo's shorter time scale")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a strict setting, e.g. attach_seconds=5 or ec2_describe_bucket=10/2 or CreateSnapshot=5/1")


def settings_from_args(args: argparse.Namespace) -> Optional[StrictSettings]:
    if not (args.strict or args.fast or args.set):
        return None
    return settings_from(args.set, StrictSettings.fast() if args.fast else StrictSettings())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="local S3/EC2/Auto Scaling on loopback (moto + lifecycle calls)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--record", default=None, help="append lifecycle calls as JSON lines to this file")
    add_mode_args(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    server = LocalAWS(args.port, args.record, strict=settings is not None, settings=settings).start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
