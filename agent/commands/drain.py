"""`spot-agent drain`: print the drain plan with its budgets (--dry-run), or drain now by hand.

A drain by hand does what the daemon does on a notice: tell the workload, wait for its checkpoint,
snapshot and upload, complete the lifecycle action. A drain interrupted earlier (agent killed) is
resumed first instead of starting a new one. It refuses to run next to a live daemon (both would write
the same state file) unless --force.

``--shutdown`` is the drain guard unit's ExecStop: it asks the running daemon for the shutdown drain
over the status socket and waits until that drain has finished, so systemd stops the workloads only
after it. The daemon drains only while systemd reports the system ``stopping``: stopping the guard
by hand, or a package removal, drains nothing.
"""

from __future__ import annotations

import json
import os
import sys

from agent.commands import add_config_arg, finite_float
from agent.events import EVENT_KINDS, MANUAL


def register(sub):
    p = sub.add_parser("drain", help="print the drain plan (--dry-run) or drain now")
    add_config_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan with budgets; touch nothing")
    p.add_argument("--kind", default=MANUAL, choices=list(EVENT_KINDS), help="the event to plan for (default manual)")
    p.add_argument("--action", default="", help="the notice action: terminate, stop or hibernate (spot notices)")
    p.add_argument("--deadline-in", type=finite_float, default=None, metavar="SECONDS",
                   help="the instance goes in SECONDS (default: 120 for a spot notice, as AWS gives; "
                        "otherwise the shutdown budget)")
    p.add_argument("--json", action="store_true", help="print the report (or plan) as JSON")
    p.add_argument("--force", action="store_true", help="drain even though the daemon answers on its socket")
    p.add_argument("--shutdown", action="store_true",
                   help="ask the running daemon for the shutdown drain and wait for it (the drain guard's ExecStop; "
                        "only while the system is shutting down)")
    p.set_defaults(func=run)


def _event(args, now: float):
    from agent.events import Event

    action = args.action or ("terminate" if args.kind == "spot-interruption" else "")
    deadline_in = args.deadline_in
    if deadline_in is None and args.kind == "spot-interruption":
        deadline_in = 120.0  # the two-minute notice
    deadline = None if deadline_in is None else now + deadline_in
    key = f"{args.kind}:cli:{now:.3f}"
    return Event(args.kind, action, deadline, key, now, {"source": "spot-agent drain"})


def run(args) -> int:
    import time

    from agent import config as cfgmod
    from agent.cli import EXIT_FAILED, EXIT_USAGE

    if args.deadline_in is not None and args.deadline_in < 0:
        print("spot-agent drain: --deadline-in must be 0 or more seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    if args.shutdown:
        return _shutdown(cfg)
    now = time.time()
    event = _event(args, now)
    if args.dry_run:
        return _dry_run(cfg, event, now, args.json)

    from agent import logs

    logs.setup(cfg.agent.log_level)
    from agent.state import agent_dirs_problem

    problem = agent_dirs_problem(cfg.agent.state_dir, cfg.agent.socket)
    if problem:
        print(f"spot-agent drain: refusing to run: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not args.force and _daemon_answers(cfg.agent.socket):
        print(f"spot-agent drain: the daemon answers on {cfg.agent.socket}; it drains on its own "
              f"(stop it, or use --force)", file=sys.stderr)
        return EXIT_FAILED
    from agent.daemon_context import build_context
    from agent.drain.executor import Drainer
    from agent.drain.freeze import thaw_leftovers

    try:
        ctx = build_context(cfg, identity_attempts=5)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"spot-agent drain: cannot read the instance identity from {cfg.imds.endpoint}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if ctx.clients is None:
        print("spot-agent drain: no AWS region (set [aws] region)", file=sys.stderr)
        return EXIT_FAILED
    for mountpoint in thaw_leftovers(ctx.state, ctx.runner):
        print(f"thawed {mountpoint}, left frozen by an earlier run", file=sys.stderr)
    mounted = _mounted(cfg, ctx)
    stores = _stores(cfg, ctx)
    drainer = Drainer(cfg, ctx.clients, ctx.identity, ctx.state, ctx.runner, ctx.clock, mounted, stores,
                      progress=lambda s: print(s, file=sys.stderr, flush=True))
    report = drainer.resume_if_pending()
    if report is None:
        report = drainer.run(event)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
        for s in report.steps:
            print(f"  {s.name:<10} {s.state:<8} {s.seconds:7.3f} s  {s.reason}".rstrip())
        for name, sid in sorted(report.snapshots.items()):
            print(f"  snapshot {name}: {sid}")
        for name, cid in sorted(report.checkpoint_ids.items()):
            print(f"  checkpoint {name}: {cid}")
    return 0 if report.ok else EXIT_FAILED


def _shutdown(cfg) -> int:
    """Ask the daemon for the shutdown drain; wait while it runs. Exit 0 unless the drain failed:
    a daemon that is not running has nothing to drain, and the shutdown must go on either way."""
    import time

    from agent.cli import EXIT_FAILED
    from agent.status_socket import query_socket

    sock = cfg.agent.socket
    try:
        answer = query_socket(sock, timeout=5.0, request="drain-shutdown")
    except (OSError, ValueError) as exc:
        print(f"spot-agent drain --shutdown: no daemon answers on {sock} ({exc}); nothing to drain")
        return 0
    if answer.get("drain") != "requested":
        print(f"spot-agent drain --shutdown: not draining: {answer.get('reason') or answer}")
        return 0
    print(f"spot-agent drain --shutdown: the daemon is draining (system {answer.get('system_state') or '?'})",
          flush=True)
    status: dict = {}
    seen_start = time.monotonic() + 5.0  # the request is queued: give the main loop a moment to start it
    while True:
        time.sleep(0.2)
        try:
            status = query_socket(sock, timeout=5.0)
        except (OSError, ValueError):
            print("spot-agent drain --shutdown: the daemon went away")
            return 0
        drain = status.get("drain") or {}
        if drain.get("state") == "done" or (drain.get("state") == "none" and time.monotonic() > seen_start):
            break
    drain = status.get("drain") or {}
    ok = drain.get("ok") is not False
    print(f"spot-agent drain --shutdown: drain {drain.get('kind') or '?'} {'done' if ok else 'FAILED'}; "
          "the workloads may stop now")
    return 0 if ok else EXIT_FAILED


def _dry_run(cfg, event, now: float, as_json: bool) -> int:
    from agent.drain.planner import build_plan

    plan = build_plan(event, cfg, now, _shutdown_budget(cfg))
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.render())
        life = plan.step("lifecycle")
        if life is not None and life.state != "skipped" and not cfg.drain.lifecycle.group:
            print("  note: the lifecycle step runs only if the instance is in a group with a terminating hook "
                  "(found via the API at start)")
    return 0


def _shutdown_budget(cfg) -> float:
    from agent.drain.planner import DEFAULT_SHUTDOWN_BUDGET, parse_timeout_stop
    from agent.runner import Runner

    if cfg.drain.shutdown_budget > 0:
        return cfg.drain.shutdown_budget
    if os.path.isdir("/run/systemd/system"):
        res = Runner().run(["systemctl", "show", "-p", "TimeoutStopUSec", "spot-agent.service"], timeout=5, check=False)
        seconds = parse_timeout_stop(res.stdout) if res.ok else None
        if seconds:
            return seconds
    return DEFAULT_SHUTDOWN_BUDGET


def _daemon_answers(socket_path: str) -> bool:
    if not os.path.exists(socket_path):
        return False
    try:
        from agent.status_socket import query_socket

        query_socket(socket_path, timeout=1.0)
        return True
    except (OSError, ValueError):
        return False


def _mounted(cfg, ctx):
    try:
        from agent.volumes.manager import VolumeManager
    except ImportError:
        return lambda: {}
    manager = VolumeManager(cfg.volumes, cfg.host, ctx.clients, ctx.identity, ctx.state, ctx.runner, ctx.clock)
    return manager.mounted


def _stores(cfg, ctx):
    if not cfg.checkpoints:
        return []
    from agent.transfer.checkpoints import CheckpointStore

    return [CheckpointStore(ctx.clients.s3, ck, cfg.transfer, cfg.agent.state_dir) for ck in cfg.checkpoints]
