"""A local S3/EC2/Auto Scaling endpoint on loopback: moto's server, plus what moto lacks.

moto does not implement CompleteLifecycleAction or RecordLifecycleActionHeartbeat (it answers 500).
We add both here and record each call, so the demo and the tests can assert that the drain completed
the lifecycle action exactly once. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

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


class LocalAWS:
    """moto's threaded server on 127.0.0.1 with our extensions. ``url`` is the endpoint for boto3."""

    def __init__(self, port: int = 0, record_file: Optional[str] = None) -> None:
        global _record_file
        _install_autoscaling_extensions()
        _record_file = record_file
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.url = ""

    def start(self) -> "LocalAWS":
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget all resources (moto's reset API) and recorded lifecycle calls."""
        import requests

        requests.post(f"{self.url}/moto-api/reset", timeout=10)
        with _LOCK:
            LIFECYCLE_CALLS.clear()

    def __enter__(self) -> "LocalAWS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="local S3/EC2/Auto Scaling on loopback (moto + lifecycle calls)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--record", default=None, help="append lifecycle calls as JSON lines to this file")
    args = parser.parse_args(argv)
    server = LocalAWS(args.port, args.record).start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
