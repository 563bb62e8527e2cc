"""`spot-agent simulate`: serve a realistic IMDS locally and drive it, to rehearse hooks and drains."""

from __future__ import annotations

import json
import sys
from typing import Any, Dict

from agent.commands import finite_float

DEFAULT_ENDPOINT = "http://127.0.0.1:1338"


def register(sub):
    p = sub.add_parser("simulate", help="a local IMDS simulator: serve it, trigger notices and faults")
    ssub = p.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])

    serve = ssub.add_parser("serve", help="serve IMDS (default 127.0.0.1:1338)")
    serve.add_argument("--listen", default="127.0.0.1:1338", metavar="HOST:PORT")
    serve.add_argument("--instance-id", default="i-0123456789abcdef0")
    serve.add_argument("--instance-type", default="g5.xlarge")
    serve.add_argument("--availability-zone", default="us-east-1a")
    serve.add_argument("--region", default="", help="default: the availability zone without its letter")
    serve.add_argument("--life-cycle", default="spot", choices=["spot", "on-demand"])
    serve.add_argument("--allow-imdsv1", action="store_true", help="answer requests without a token")
    serve.set_defaults(func=_serve)

    trig = ssub.add_parser("trigger", help="trigger a notice or a fault in a running simulator")
    trig.add_argument("kind", choices=["spot", "rebalance", "scheduled", "asg", "fault", "clear", "stats", "identity"])
    trig.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    trig.add_argument("--action", default="terminate", choices=["terminate", "stop", "hibernate"], help="spot: the action")
    trig.add_argument("--in", dest="in_seconds", type=finite_float, default=None,
                      help="spot: deadline in N seconds (default 120); scheduled: NotBefore in N seconds (default 600)")
    trig.add_argument("--time", default="", help="spot: an explicit ISO time instead of --in")
    trig.add_argument("--moving-time", action="store_true", help="spot: recompute the time on every request")
    trig.add_argument("--code", default="instance-stop",
                      choices=["instance-reboot", "system-reboot", "system-maintenance", "instance-retirement", "instance-stop"])
    trig.add_argument("--state", default=None, help="scheduled: active|canceled|completed; asg: a target lifecycle state")
    trig.add_argument("--event-id", default="", help="scheduled: the EventId (to cancel an earlier one)")
    trig.add_argument("--fault", default="", choices=["", "429", "5xx", "slow", "hang", "slow-headers", "403", "token-expiry", "malformed"])
    trig.add_argument("--count", type=int, default=1, help="fault: how many requests (-1: until cleared)")
    trig.add_argument("--seconds", type=finite_float, default=None,
                      help="fault slow: delay per answer (default 2); slow-headers: delay between header bytes (default 0.05)")
    trig.add_argument("--status", type=int, default=500, help="fault 5xx: the status code")
    trig.add_argument("--off", action="store_true", help="fault 403: turn IMDS back on")
    trig.add_argument("--path", default="spot/instance-action", help="fault malformed: the meta-data path")
    trig.add_argument("--body", default="{not json", help="fault malformed: the body to serve")
    trig.add_argument("--what", default="all", choices=["all", "spot", "rebalance", "scheduled", "asg", "faults"], help="clear: what")
    trig.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="identity: e.g. instance_id=i-...")
    trig.set_defaults(func=_trigger)


def _hostport(text: str):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _serve(args) -> int:
    from agent.sim.imds_server import Identity, IMDSSimulator

    try:
        host, port = _hostport(args.listen)
    except ValueError as exc:
        print(f"spot-agent simulate serve: {exc}", file=sys.stderr)
        return 2
    ident = Identity(instance_id=args.instance_id, instance_type=args.instance_type,
                     availability_zone=args.availability_zone,
                     region=args.region or args.availability_zone[:-1], life_cycle=args.life_cycle)
    try:
        sim = IMDSSimulator(host, port, ident, require_v2=not args.allow_imdsv1)
    except OSError as exc:
        print(f"spot-agent simulate serve: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"IMDS simulator on {sim.url} (instance {ident.instance_id}, {ident.availability_zone})", flush=True)
    try:
        sim.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def build_request(args) -> Dict[str, Any]:
    kind = args.kind
    if kind == "spot":
        body: Dict[str, Any] = {"action": args.action, "moving_time": args.moving_time}
        if not args.time:
            body["in"] = 120 if args.in_seconds is None else args.in_seconds
            return body
        from agent.imds.parse import BadAnswer, parse_iso_time

        try:
            body["time"] = parse_iso_time(args.time)
        except BadAnswer as exc:
            raise ValueError(f"--time: {exc.detail}") from None
        return body
    if kind == "scheduled":
        return {"code": args.code, "state": args.state or "active", "event_id": args.event_id,
                "in": 600 if args.in_seconds is None else args.in_seconds}
    if kind == "asg":
        return {"state": args.state or "Terminated"}
    if kind == "fault":
        if not args.fault:
            raise ValueError("fault needs --fault 429|5xx|slow|hang|slow-headers|403|token-expiry|malformed")
        body = {"kind": args.fault, "count": args.count, "code": args.status,
                "on": not args.off, "path": args.path, "body": args.body}
        if args.seconds is not None:
            body["seconds"] = args.seconds
        return body
    if kind == "clear":
        return {"what": args.what}
    if kind == "identity":
        out = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set wants KEY=VALUE, got {item!r}")
            out[key] = value
        return out
    return {}


def _trigger(args) -> int:
    import requests

    try:
        body = build_request(args)
    except ValueError as exc:
        print(f"spot-agent simulate trigger: {exc}", file=sys.stderr)
        return 2
    url = f"{args.endpoint.rstrip('/')}/_sim/v1/{args.kind}"
    try:
        resp = requests.post(url, json=body, timeout=5)
    except requests.RequestException as exc:
        print(f"spot-agent simulate trigger: no simulator at {args.endpoint}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"spot-agent simulate trigger: {resp.status_code}: {resp.text.strip()}", file=sys.stderr)
        return 1
    print(json.dumps(resp.json()))
    return 0
