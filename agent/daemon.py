"""`spot-agent run`: the daemon's life, from start to drained.

The main thread only loops: it takes events and commands from one queue, pings the systemd watchdog
and runs the supervisor's tick. Startup work (identity, volumes, restore, pre-warm) runs in its own
thread, so a notice that arrives during a long pre-warm is still handled, and a hung startup step
cannot starve the watchdog. Signals only enqueue: SIGTERM becomes the ``shutdown`` event, SIGHUP a
reload.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from agent import __version__, metrics
from agent.clock import SYSTEM_CLOCK, Clock
from agent.config import Config, ConfigError, load
from agent.daemon_context import Context, build_context
from agent.drain.freeze import boot_id
from agent.events import MANUAL, SHUTDOWN, Event
from agent.state import agent_dirs_problem, atomic_write
from agent.supervisor import Supervisor, shutdown_event
from agent.systemd_notify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_BUDGET = 90.0


class Daemon:
    def __init__(self, config: Config, config_path: str, clock: Clock = SYSTEM_CLOCK,
                 notifier: Optional[Notifier] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.queue: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self.ctx: Optional[Context] = None
        self.supervisor = Supervisor(config, clock, on_change=self.changed)
        self.supervisor.on_drained = self._record_drained
        self.started_at = clock.time()
        self.ready = threading.Event()
        self.startup_error = ""
        self.status_line = "starting"
        self.watchers: List[Any] = []
        self.imds_health: Dict[str, Any] = {"up": False, "disabled": False, "last_success": 0.0}
        self.loop_beat = clock.monotonic()
        self.datasets: Dict[str, Dict[str, Any]] = {}
        self.checkpoint_stores: List[Any] = []
        self.volume_manager: Any = None
        self.last_checkpoint: Optional[Dict[str, Any]] = None
        self._drain_finished_at: Optional[float] = None
        self._stop = threading.Event()
        self._status_lock = threading.Lock()
        self._http: Any = None
        self._status_server: Any = None

    @property
    def shutdown_budget(self) -> float:
        """The drainer read the unit's TimeoutStopSec at startup; before that, the config or 90 s."""
        drainer = self.supervisor.drainer
        if drainer is not None:
            return drainer.shutdown_budget
        return self.config.drain.shutdown_budget or DEFAULT_SHUTDOWN_BUDGET

    # -- status -------------------------------------------------------------------------------
    def set_status(self, line: str) -> None:
        self.status_line = line
        self.notifier.status(line)
        log.info("status: %s", line)
        self.changed()

    def status(self) -> Dict[str, Any]:
        sup = self.supervisor
        if sup.drain_done.is_set():
            state = "drained" if getattr(sup.drain_report, "ok", False) else "failed"
        elif sup.draining:
            state = "draining"
        elif self.ready.is_set():
            state = "ready"
        elif self.startup_error:
            state = "failed"
        else:
            state = "starting"
        ident = self.ctx.identity.to_dict() if self.ctx else None
        mounts = []
        if self.volume_manager is not None:
            mounts = [m.to_dict() for m in self.volume_manager.mounted().values()]
        last_snapshot = None
        report = sup.drain_report
        snaps = getattr(report, "snapshots", None) or {}
        if snaps:
            name, snap = sorted(snaps.items())[-1]
            last_snapshot = {"volume": name, "snapshot_id": snap, "created_at": self._drain_finished_at}
        steps = [s.to_dict() if hasattr(s, "to_dict") else dict(getattr(s, "__dict__", {}))
                 for s in (getattr(report, "steps", None) or [])]
        return {
            "state": state,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "updated_at": self.clock.time(),
            "ready": self.ready.is_set(),
            "status_line": self.status_line,
            "error": self.startup_error or sup.drain_error,
            "instance": ident,
            "imds": dict(self.imds_health),
            "notices": [{k: v for k, v in e.to_dict().items() if k != "raw"} for e in sup.active_notices()],
            "deadline": sup.deadline,
            "mounts": mounts,
            "datasets": list(self.datasets.values()),
            "last_checkpoint": self.last_checkpoint,
            "last_snapshot": last_snapshot,
            "drain": {"state": "none" if not sup.drain_started.is_set() else ("done" if sup.drain_done.is_set() else "running"),
                      "kind": sup.terminal_event.kind if sup.terminal_event else "",
                      "ok": getattr(report, "ok", None), "steps": steps,
                      "snapshots": dict(snaps), "checkpoint_ids": dict(getattr(report, "checkpoint_ids", None) or {}),
                      "lifecycle_completed": getattr(report, "lifecycle_completed", None),
                      "margin_seconds": getattr(report, "margin_seconds", None)},
        }

    def changed(self) -> None:
        """Write the status file (read by `spot-agent status` when the socket is not there)."""
        import json

        with self._status_lock:
            try:
                atomic_write(os.path.join(self.config.agent.state_dir, "status.json"),
                             json.dumps(self.status(), default=str).encode(), mode=0o600)
            except OSError as exc:
                log.debug("cannot write status file: %s", exc)

    def alive(self) -> bool:
        interval = max(5.0, 3 * (watchdog_interval() or 1.0))
        return self.clock.monotonic() - self.loop_beat < interval

    # -- signals ------------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda s, f: self.queue.put(("signal", s)))
        signal.signal(signal.SIGINT, lambda s, f: self.queue.put(("signal", s)))
        signal.signal(signal.SIGHUP, lambda s, f: self.queue.put(("reload",)))

    # -- the main loop ------------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.config.agent.state_dir, mode=0o700, exist_ok=True)
        metrics.set_state("starting")
        self._start_servers()
        self.install_signals()
        self.notifier.status("starting")
        startup = threading.Thread(target=self._startup, name="startup", daemon=True)
        startup.start()
        beat = watchdog_interval() or 1.0
        tick = min(beat, 1.0)
        exit_code = 0
        shutting_down = False
        while True:
            self.loop_beat = self.clock.monotonic()
            metrics.LOOP_HEARTBEAT.set(self.clock.time())
            self.notifier.watchdog()
            try:
                item = self.queue.get(timeout=tick)
            except queue.Empty:
                item = None
            if item is not None:
                kind = item[0]
                if kind == "event":
                    self.supervisor.dispatch(item[1])
                elif kind == "reload":
                    self.reload()
                elif kind == "signal" and not shutting_down:
                    shutting_down = True
                    self.notifier.stopping("draining before shutdown")
                    log.warning("received %s: draining before exit", signal.Signals(item[1]).name,
                                extra={"journal": {"EVENT_KIND": SHUTDOWN}})
                    self.supervisor.dispatch(shutdown_event(self.clock.time(), self.shutdown_budget))
                elif kind == "exit":
                    exit_code = item[1]
                    break
            self.supervisor.tick()
            if shutting_down and (not self.supervisor.drain_started.is_set() or self.supervisor.drain_done.is_set()):
                self.supervisor.wait(timeout=1.0)
                break
        self._shutdown()
        return exit_code

    def _shutdown(self) -> None:
        self._stop.set()
        for w in self.watchers:
            w.stop()
        self.changed()
        for srv in (self._http, self._status_server):
            if srv is not None:
                try:
                    srv.stop()
                except Exception:  # noqa: BLE001
                    pass
        log.info("spot-agent stopped (%s)", self.status()["state"])

    def submit(self, event: Event) -> None:
        self.queue.put(("event", event))

    def manual_drain(self, deadline_in: Optional[float] = None) -> None:
        now = self.clock.time()
        deadline = now + deadline_in if deadline_in else None
        self.submit(Event(MANUAL, "drain", deadline, "manual", now, {}))

    # -- servers ------------------------------------------------------------------------------
    def _start_servers(self) -> None:
        from agent.http_server import MetricsServer
        from agent.status_socket import StatusServer

        if self.config.metrics.enabled:
            try:
                self._http = MetricsServer(self.config.metrics, self.alive, self.ready.is_set)
                self._http.start()
            except OSError as exc:
                log.error("metrics endpoint %s: %s (continuing without it)", self.config.metrics.listen, exc)
                self._http = None
        try:
            self._status_server = StatusServer(self.config.agent.socket, self.status)
            self._status_server.start()
        except OSError as exc:
            log.error("status socket %s: %s (continuing without it)", self.config.agent.socket, exc)
            self._status_server = None

    # -- startup ------------------------------------------------------------------------------
    def _startup(self) -> None:
        try:
            self._startup_steps()
        except Exception as exc:  # noqa: BLE001
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("startup failed")
            self.set_status(f"startup failed: {exc}")
            metrics.set_state("failed")
            self.queue.put(("exit", 1))

    def _startup_steps(self) -> None:
        cfg = self.config
        self.set_status("reading instance identity from IMDS")
        ctx = build_context(cfg, self.clock, self.notifier)
        self.ctx = ctx
        if ctx.imds_disabled:
            self.imds_health = {"up": False, "disabled": True, "last_success": 0.0}
            metrics.IMDS_DISABLED.set(1)
        log.info("instance %s (%s) in %s", ctx.identity.instance_id or "?", ctx.identity.instance_type or "?",
                 ctx.identity.availability_zone or "?")
        drained = self._drained_this_boot(ctx)
        if drained:
            log.warning("this boot's termination (%s) was already drained by an earlier run; not draining again", drained)
            self.supervisor.mark_drained(drained)
        self._start_watchers(ctx)
        self._attach_drainer(ctx)
        if self.supervisor.drain_started.is_set():
            # Draining (resumed) or drained: bringing up volumes or pre-warming now would only race the
            # snapshot. Wait for the drain, then report READY so systemd does not time the unit out.
            while not self.supervisor.drain_done.wait(5.0):
                self.notifier.extend_timeout(30)
            self.ready.set()
            self.notifier.ready("drained")
            self.changed()
            return
        if self.volume_manager is not None and cfg.volumes:
            self._volumes_up(ctx)
        self._restore_and_prewarm(ctx)
        if self._stop.is_set():
            return
        self.ready.set()
        metrics.READY.set(1)
        if not self.supervisor.drain_started.is_set():
            metrics.set_state("ready")
        line = self._ready_line()
        self.status_line = line
        self.notifier.ready(line)
        log.info("ready: %s", line, extra={"journal": {"MESSAGE_ID": "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c10"}})
        self.changed()
        self._start_checkpoint_schedules()

    def _ready_line(self) -> str:
        parts = ["ready", "watching IMDS" if not (self.ctx and self.ctx.imds_disabled) else "IMDS DISABLED (403)"]
        if self.volume_manager is not None and self.config.volumes:
            parts.append(f"{len(self.volume_manager.mounted())} volume(s) mounted")
        if self.config.datasets:
            parts.append(f"{sum(1 for d in self.datasets.values() if d.get('state') == 'done')}/{len(self.config.datasets)} dataset(s) warm")
        return "; ".join(parts)

    def _start_watchers(self, ctx: Context) -> None:
        from agent.watchers.imds import IMDSWatcher

        latched = ctx.state.get("watcher", {}).get("latched", [])
        watcher = IMDSWatcher(ctx.imds, self.config.imds, self.clock, latched=latched,
                              on_latch=lambda keys: ctx.state.update("watcher", latched=keys),
                              on_health=self._imds_health)
        watcher.start(self.submit)
        self.watchers.append(watcher)

    def _imds_health(self, health: Dict[str, Any]) -> None:
        flipped = (health.get("up"), health.get("disabled")) != (self.imds_health.get("up"), self.imds_health.get("disabled"))
        self.imds_health = health
        if flipped:
            self.changed()

    def _record_drained(self, event: Event, report: Any) -> None:
        """Remember, for this boot, that the termination was drained: a restarted agent must not
        drain again when the shutdown's SIGTERM arrives (one drain per termination)."""
        self._drain_finished_at = self.clock.time()
        for name, checkpoint_id in (getattr(report, "checkpoint_ids", None) or {}).items():
            self.last_checkpoint = {"name": name, "checkpoint_id": checkpoint_id, "committed_at": self._drain_finished_at}
        if self.ctx is not None:
            self.ctx.state.update("termination", boot_id=boot_id(), kind=event.kind, at=self.clock.time())

    def _drained_this_boot(self, ctx: Context) -> Optional[str]:
        rec = ctx.state.get("termination", {}) or {}
        if rec.get("boot_id") and rec.get("boot_id") == boot_id():
            return rec.get("kind") or "?"
        return None

    def _attach_drainer(self, ctx: Context) -> None:
        from agent.drain.executor import Drainer
        from agent.drain.freeze import thaw_leftovers

        for mountpoint in thaw_leftovers(ctx.state, ctx.runner):
            log.warning("thawed %s, left frozen by an earlier run", mountpoint)
        if self.config.volumes:
            from agent.volumes.manager import VolumeManager

            self.volume_manager = VolumeManager(self.config.volumes, self.config.host, ctx.clients, ctx.identity,
                                                ctx.state, ctx.runner, self.clock)
        if self.config.checkpoints and ctx.clients is not None:
            from agent.transfer.gang import make_store  # a gang's shard store, or a plain CheckpointStore

            self.checkpoint_stores = [make_store(ctx.clients.s3, ck, self.config.transfer, self.config.agent.state_dir)
                                      for ck in self.config.checkpoints]
        mounted = self.volume_manager.mounted if self.volume_manager is not None else (lambda: {})
        drainer = Drainer(self.config, ctx.clients, ctx.identity, ctx.state, ctx.runner, self.clock,
                          mounted, self.checkpoint_stores, progress=self.set_status)
        self.supervisor.drainer = drainer
        pending = drainer.pending_event()
        if pending is not None and not self.supervisor.drain_started.is_set():
            log.warning("resuming the drain interrupted by a restart (%s)", pending.kind,
                        extra={"journal": {"EVENT_KIND": pending.kind}})
            self.supervisor.dispatch(pending)

    def _volumes_up(self, ctx: Context) -> None:
        self.set_status(f"bringing up {len(self.config.volumes)} volume(s)")
        self.notifier.extend_timeout(300)
        results = self.volume_manager.up(progress=self._progress)
        failed = [r for r in results if not r.ok and r.required]
        for r in results:
            if not r.ok:
                log.error("volume %s: %s", r.name, r.error, extra={"journal": {"VOLUME": r.name}})
        if failed:
            raise RuntimeError("required volume(s) failed: " + "; ".join(f"{r.name}: {r.error}" for r in failed))

    def _progress(self, line: str) -> None:
        self.notifier.extend_timeout(120)
        self.set_status(line)

    def _restore_and_prewarm(self, ctx: Context) -> None:
        cfg = self.config
        for store, ck in zip(self.checkpoint_stores, cfg.checkpoints):
            if not ck.restore:
                continue
            self.set_status(f"restoring the newest checkpoint into {ck.dir}")
            self.notifier.extend_timeout(300)
            result = store.restore()
            if result.error and result.checkpoint_id:  # no checkpoint_id: a first boot, nothing committed yet
                raise RuntimeError(f"checkpoint restore into {ck.dir}: {result.error}")
            if result.checkpoint_id:
                self.last_checkpoint = {"dir": ck.dir, "s3": ck.s3, "checkpoint_id": result.checkpoint_id,
                                        "committed_at": None}
        if not cfg.datasets:
            return
        from agent.transfer.datasets import sync_dataset

        assert ctx.clients is not None, "datasets need an AWS region"
        background = []
        for ds in cfg.datasets:
            self.datasets[ds.dest] = {"source": ds.source, "dest": ds.dest, "state": "pending", "bytes_done": 0,
                                      "bytes_total": 0, "files_done": 0, "files_total": 0, "errors": 0}
        for ds in cfg.datasets:
            if ds.background:
                background.append(ds)
                continue
            self._sync_one(ctx, ds, sync_dataset)
        for ds in background:
            threading.Thread(target=self._sync_one, args=(ctx, ds, sync_dataset), name="dataset", daemon=True).start()

    def _sync_one(self, ctx: Context, ds: Any, sync_dataset: Callable) -> None:
        entry = self.datasets[ds.dest]
        entry["state"] = "syncing"
        last = [0.0]

        def progress(p: Any) -> None:
            entry.update(bytes_done=p.bytes_done, bytes_total=p.bytes_total, files_done=p.files_done,
                         files_total=p.files_total)
            now = self.clock.monotonic()
            if now - last[0] >= 2.0:
                last[0] = now
                eta = f", ETA {p.eta:.0f}s" if getattr(p, "eta", None) else ""
                pct = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
                if not ds.background:
                    self.notifier.extend_timeout(60)
                self.notifier.status(f"pre-warming {ds.dest}: {pct:.0f}% of {p.bytes_total / 1e6:.0f} MB{eta}")

        self.set_status(f"pre-warming {ds.source} -> {ds.dest}")
        if not ds.background:
            self.notifier.extend_timeout(60)  # READY waits for this sync; progress extends it further
        result = sync_dataset(ctx.clients.s3, ds, self.config.transfer, self.config.agent.state_dir,
                              progress=progress, stop=self._stop)
        entry["errors"] = result.errors
        entry["state"] = "done" if result.ok else "failed"
        self.changed()
        if not result.ok and not ds.background:
            raise RuntimeError(f"dataset {ds.source}: {result.errors} error(s): "
                               + "; ".join(result.error_messages[:3]))

    def _start_checkpoint_schedules(self) -> None:
        for store, ck in zip(self.checkpoint_stores, self.config.checkpoints):
            if ck.interval > 0:
                threading.Thread(target=self._checkpoint_loop, args=(store, ck), name="checkpoint", daemon=True).start()

    def _checkpoint_loop(self, store: Any, ck: Any) -> None:
        while not self.clock.sleep(ck.interval, self._stop):
            if self.supervisor.drain_started.is_set():
                return
            try:
                result = store.upload(reason="interval")
                if result.committed:
                    self.last_checkpoint = {"dir": ck.dir, "s3": ck.s3, "checkpoint_id": result.checkpoint_id,
                                            "committed_at": self.clock.time()}
                    self.changed()
            except Exception:  # noqa: BLE001
                log.exception("periodic checkpoint upload of %s failed", ck.dir)

    # -- reload -------------------------------------------------------------------------------
    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            log.error("reload: keeping the old config: %s", exc.one_line())
            self.notifier.ready(self.status_line)
            return
        changed = [name for name in ("hooks", "imds", "drain", "checkpoints", "datasets", "volumes", "metrics", "aws")
                   if getattr(new, name) != getattr(self.config, name)]
        restart_needed = [n for n in changed if n in ("volumes", "datasets", "checkpoints", "metrics", "aws")]
        # Hooks, drain settings and IMDS timing apply at once; the rest needs a restart.
        self.config.hooks = new.hooks
        self.config.drain = new.drain
        self.supervisor.config = self.config
        if "imds" in changed and self.watchers:
            w = self.watchers[0]
            w.section.poll_interval = new.imds.poll_interval
            w.section.slow_poll_interval = new.imds.slow_poll_interval
        log.info("reloaded %s: %s%s", self.config_path, ", ".join(changed) or "no changes",
                 f" ({', '.join(restart_needed)} take effect on restart)" if restart_needed else "")
        self.notifier.ready(self.status_line)


def run(config_path: str) -> int:
    """Entry point of `spot-agent run`."""
    import sys

    from agent import logs
    from agent.cli import EXIT_USAGE

    try:
        config = load(config_path)
    except ConfigError as exc:
        print(f"spot-agent: refusing to start: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    problem = agent_dirs_problem(config.agent.state_dir, config.agent.socket)
    if problem:
        print(f"spot-agent: refusing to start: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(config.agent.log_level)
    log.info("spot-agent %s starting with %s", __version__, config_path)
    return Daemon(config, config_path).run()
