"""`spot-agent run`: the daemon's life, from start to drained.

The main thread only loops: it takes events and commands from one queue, pings the systemd watchdog
and runs the supervisor's tick. Startup work (identity, volumes, restore, pre-warm) runs in its own
thread, so a notice that arrives during a long pre-warm is still handled, and a hung startup step
cannot starve the watchdog. Signals only enqueue: SIGHUP is a reload, SIGTERM and SIGINT a stop.

A stop is not a termination. ``systemctl stop`` and ``restart`` send the same SIGTERM as a poweroff,
so the daemon asks the host: only while systemd reports the system ``stopping`` (``[drain]
on_sigterm = "auto"``) does a SIGTERM run the ``shutdown`` drain. At a poweroff the drain guard unit
(spot-agent-drain.service, stopped only at shutdown and before the workloads) asks for that drain
first, over the status socket (``spot-agent drain --shutdown``), and waits for it; the agent's own
SIGTERM comes later, after the workloads stopped, and finds the termination drained. Outside systemd a
SIGTERM or Ctrl-C just stops the agent (``spot-agent drain`` drains by hand).

What the daemon remembers belongs to one boot (``[host] proc_root``'s boot id): latched notices, the
hook kinds that ran, and "this termination was drained", which only ever suppresses a second drain of
the same termination.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from agent import __version__, hostfacts, metrics
from agent.clock import SYSTEM_CLOCK, Clock
from agent.config import Config, ConfigError, load
from agent.daemon_context import Context, build_context
from agent.events import MANUAL, SHUTDOWN, TERMINAL_KINDS, Event
from agent.hostfacts import HostFacts
from agent.runner import Runner
from agent.state import StateStore, agent_dirs_problem, atomic_write
from agent.supervisor import Supervisor, shutdown_event
from agent.systemd_notify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_BUDGET = 90.0
IDLE_SCHEDULE = 5.0  # how often a checkpoint schedule with interval 0 looks whether a reload turned it on

# What `systemctl reload` applies at once; every other changed key is named in the log and keeps its
# old value until a restart (never half of each).
LIVE_KEYS = ("hooks", "drain", "imds.poll_interval", "imds.slow_poll_interval", "metrics", "agent.log_level",
             "checkpoints[].interval")


class Daemon:
    def __init__(self, config: Config, config_path: str, clock: Clock = SYSTEM_CLOCK,
                 notifier: Optional[Notifier] = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.queue: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self.ctx: Optional[Context] = None
        self.host = HostFacts.from_config(config.host)
        hostfacts.set_default(self.host)
        self.state: Optional[StateStore] = None  # opened (and thawed from) before any network I/O
        self.supervisor = Supervisor(config, clock, on_change=self.changed)
        self.supervisor.on_drained = self._record_drained
        self.supervisor.on_hooks = self._record_hooks
        self.started_at = clock.time()
        self.ready = threading.Event()
        self.startup_error = ""
        self.status_line = "starting"
        self.watchers: List[Any] = []
        self.imds_health: Dict[str, Any] = {"up": False, "disabled": False, "last_success": 0.0}
        self.loop_beat = clock.monotonic()
        self.datasets: Dict[str, Dict[str, Any]] = {}
        self.checkpoint_stores: List[Any] = []
        self.launch_hook: Any = None
        self.volume_manager: Any = None
        self.last_checkpoint: Optional[Dict[str, Any]] = None
        self.restore_fallbacks: List[Dict[str, Any]] = []  # restores this boot that skipped unverifiable manifests
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
            "notice": self.notice()["notice"],
            "deadline": sup.deadline,
            "mounts": mounts,
            "datasets": list(self.datasets.values()),
            "last_checkpoint": self.last_checkpoint,
            "restore_fallbacks": list(self.restore_fallbacks),
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

        self._sync_notice()

        with self._status_lock:
            try:
                atomic_write(os.path.join(self.config.agent.state_dir, "status.json"),
                             json.dumps(self.status(), default=str).encode(), mode=0o600)
            except OSError as exc:
                log.debug("cannot write status file: %s", exc)

    def _workload(self) -> Any:
        return getattr(self.supervisor.drainer, "workload", None)

    def _sync_notice(self) -> None:
        """notice.json for a notice that does not drain (yet): a rebalance recommendation or a
        scheduled event not due, withdrawn when it is cancelled. A drain publishes its own notice
        in its notify step, before the signal."""
        wl = self._workload()
        if wl is None or self.supervisor.drain_started.is_set():
            return
        try:
            waiting = [e for e in self.supervisor.active_notices() if e.kind not in TERMINAL_KINDS]
            waiting.sort(key=lambda e: (e.deadline is None, e.deadline or 0.0))
            current = (wl.channel.current or {}).get("key")
            if waiting and waiting[0].key != current:
                wl.publish(waiting[0], waiting[0].deadline, terminal=False)
            elif not waiting and current:
                wl.withdraw()
        except Exception:  # noqa: BLE001 - the notice file must never break the status path
            log.warning("cannot update the notice file", exc_info=True)

    def notice(self) -> Dict[str, Any]:
        """The status socket's ``notice`` request: what notice.json holds (or null)."""
        wl = self._workload()
        return {"notice": getattr(getattr(wl, "channel", None), "current", None)}

    def alive(self) -> bool:
        interval = max(5.0, 3 * (watchdog_interval() or 1.0))
        return self.clock.monotonic() - self.loop_beat < interval

    # -- signals ------------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda s, f: self.queue.put(("signal", s)))
        signal.signal(signal.SIGINT, lambda s, f: self.queue.put(("signal", s)))
        signal.signal(signal.SIGHUP, lambda s, f: self.queue.put(("reload",)))

    def _sigterm_drains(self) -> bool:
        """Whether this SIGTERM/SIGINT is a termination: ``[drain] on_sigterm``; "auto" asks systemd."""
        mode = self.config.drain.on_sigterm
        if mode == "drain":
            return True
        if mode == "exit":
            return False
        return self.host.shutting_down()

    def _shutdown_request(self) -> Dict[str, Any]:
        """The drain guard's ExecStop (`spot-agent drain --shutdown`): drain now, the workloads still run.
        Only a system that is shutting down drains: stopping the guard by hand does nothing."""
        state = self.host.system_state()
        if state != hostfacts.STOPPING and self.config.drain.on_sigterm != "drain":
            return {"drain": "refused", "reason": f"the system is not shutting down (system state {state or 'unknown'!r})"}
        self.queue.put(("shutdown-drain",))
        return {"drain": "requested", "system_state": state}

    # -- the main loop ------------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.config.agent.state_dir, mode=0o700, exist_ok=True)
        metrics.set_state("starting")
        self._thaw_first()
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
                elif kind == "shutdown-drain":
                    log.warning("the system is shutting down: draining while the workloads still run",
                                extra={"journal": {"EVENT_KIND": SHUTDOWN}})
                    self.supervisor.dispatch(shutdown_event(self.clock.time(), self.shutdown_budget))
                elif kind == "signal" and not shutting_down:
                    shutting_down = True
                    name = signal.Signals(item[1]).name
                    if self._sigterm_drains():
                        self.notifier.stopping("draining before shutdown")
                        log.warning("received %s: draining before exit", name,
                                    extra={"journal": {"EVENT_KIND": SHUTDOWN}})
                        self.supervisor.dispatch(shutdown_event(self.clock.time(), self.shutdown_budget))
                    else:
                        self.notifier.stopping("stopping (not a termination: no drain)")
                        log.warning("received %s and the system is not shutting down (a unit stop or restart): "
                                    "exiting without a drain; the workload keeps running%s", name,
                                    "; waiting for the running drain first" if self.supervisor.draining else "")
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
    def _thaw_first(self) -> None:
        """Thaw what a killed predecessor left frozen, before any network I/O: IMDS may be down (the
        identity call retries forever) and writers on a frozen filesystem hang until thaw."""
        from agent.drain.freeze import thaw_leftovers

        self.state = StateStore(os.path.join(self.config.agent.state_dir, "state.json"))
        try:
            for mountpoint in thaw_leftovers(self.state, Runner(), self.host.boot_id()):
                log.warning("thawed %s, left frozen by an earlier run", mountpoint)
        except OSError as exc:
            log.error("thawing filesystems left frozen: %s", exc)

    def _metrics_server(self, section: Any) -> Any:
        from agent.http_server import MetricsServer

        server = MetricsServer(section, self.alive, self.ready.is_set)
        server.start()
        return server

    def _start_servers(self) -> None:
        from agent.status_socket import StatusServer

        if self.config.metrics.enabled:
            try:
                self._http = self._metrics_server(self.config.metrics)
            except OSError as exc:
                log.error("metrics endpoint %s: %s (continuing without it)", self.config.metrics.listen, exc)
                self._http = None
        try:
            self._status_server = StatusServer(self.config.agent.socket, self.status,
                                               commands={"drain-shutdown": self._shutdown_request, "notice": self.notice})
            self._status_server.start()
        except OSError as exc:
            log.error("status socket %s: %s (continuing without it)", self.config.agent.socket, exc)
            self._status_server = None

    # -- startup ------------------------------------------------------------------------------
    def _startup(self) -> None:
        try:
            self._startup_steps()
        except Exception as exc:  # noqa: BLE001
            if self.launch_hook is not None:
                self.launch_hook.finish("ABANDON", f"startup failed: {exc}", wait=5.0)  # the exit waits for it
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("startup failed")
            self.set_status(f"startup failed: {exc}")
            metrics.set_state("failed")
            self.queue.put(("exit", 1))

    def _startup_steps(self) -> None:
        cfg = self.config
        self.set_status("reading instance identity from IMDS")
        ctx = build_context(cfg, self.clock, self.notifier, state=self.state)
        self.ctx = ctx
        if ctx.clients is not None:
            from agent.fleet import LaunchHook  # the launching lifecycle hook: heartbeats until READY

            clients = ctx.clients
            self.launch_hook = LaunchHook(cfg.fleet, cfg.drain.lifecycle.group, clients.autoscaling,
                                          ctx.identity.instance_id, ctx.state,
                                          budgeted=lambda s: clients.budgeted(s, self.clock, "launch lifecycle").autoscaling).start()
        if ctx.imds_disabled:
            self.imds_health = {"up": False, "disabled": True, "last_success": 0.0}
            metrics.IMDS_DISABLED.set(1)
        log.info("instance %s (%s) in %s", ctx.identity.instance_id or "?", ctx.identity.instance_type or "?",
                 ctx.identity.availability_zone or "?")
        drained = self._drained_this_boot(ctx)
        hooks_run = self._hooks_this_boot(ctx)
        if drained:
            log.warning("this boot's termination (%s) was already drained by an earlier run; not draining again", drained)
            rec = ctx.state.get("termination", {}) or {}
            self.supervisor.mark_drained(drained, hooks_run, rec.get("deadline"), rec.get("key") or "earlier-run")
        elif hooks_run:
            self.supervisor.hook_kinds = list(hooks_run)
        self._start_watchers(ctx)
        self._attach_drainer(ctx)
        if self.supervisor.drain_started.is_set():
            # Draining (resumed) or drained: bringing up volumes or pre-warming now would only race the
            # snapshot. Wait for the drain, then report READY so systemd does not time the unit out.
            if self.launch_hook is not None:
                self.launch_hook.stop()  # terminating: no launch to complete
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
        if self.launch_hook is not None:  # CONTINUE to Auto Scaling, off the startup path
            threading.Thread(target=self.launch_hook.finish, args=("CONTINUE", "READY"), name="launch-hook", daemon=True).start()
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

        # Latches belong to a boot: a spot instance stopped and started again must see its next
        # `stop` notice (same key) as new. A record without a boot id predates this rule: dropped.
        boot = self.host.boot_id()
        rec = ctx.state.get("watcher", {}) or {}
        latched = rec.get("latched", []) if rec.get("boot_id") == boot else []
        watcher = IMDSWatcher(ctx.imds, self.config.imds, self.clock, latched=latched,
                              on_latch=lambda keys: ctx.state.update("watcher", latched=keys, boot_id=boot),
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
            self.ctx.state.update("termination", boot_id=self.host.boot_id(), kind=event.kind, key=event.key,
                                  deadline=event.deadline, at=self.clock.time())

    def _record_hooks(self, kinds: List[str]) -> None:
        """Each terminal kind's hooks run once per boot, also across a restart of the agent."""
        state = self.ctx.state if self.ctx is not None else self.state
        if state is not None:
            state.update("hooks_run", boot_id=self.host.boot_id(), kinds=list(kinds))

    def _hooks_this_boot(self, ctx: Context) -> List[str]:
        rec = ctx.state.get("hooks_run", {}) or {}
        boot = self.host.boot_id()
        return list(rec.get("kinds") or []) if boot and rec.get("boot_id") == boot else []

    def _drained_this_boot(self, ctx: Context) -> Optional[str]:
        rec = ctx.state.get("termination", {}) or {}
        boot = self.host.boot_id()
        if boot and rec.get("boot_id") == boot:
            return rec.get("kind") or "?"
        return None

    def _attach_drainer(self, ctx: Context) -> None:
        from agent.drain.executor import Drainer

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
                          mounted, self.checkpoint_stores, progress=self.set_status, host=self.host)
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
            if result.rejected:  # fell back past manifests that did not verify (the store logged each)
                self.restore_fallbacks.append({"dir": ck.dir, "s3": ck.s3, "checkpoint_id": result.checkpoint_id or None,
                                               "rejected_manifests": list(result.rejected)})
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
        # One loop per store even with interval 0: a reload may turn the schedule on (it reads
        # ck.interval each round; reload sets it in place).
        for store, ck in zip(self.checkpoint_stores, self.config.checkpoints):
            threading.Thread(target=self._checkpoint_loop, args=(store, ck), name="checkpoint", daemon=True).start()

    def _checkpoint_loop(self, store: Any, ck: Any) -> None:
        while not self.clock.sleep(ck.interval if ck.interval > 0 else IDLE_SCHEDULE, self._stop):
            if self.supervisor.drain_started.is_set():
                return
            if ck.interval <= 0:
                continue
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
        """Re-read the config. Each changed key is either applied to every consumer (hooks, the drain
        plan and workload, IMDS intervals, checkpoint intervals, the metrics listener, the log level)
        or named as needing a restart and left at its old value."""
        self.notifier.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            log.error("reload: keeping the old config: %s", exc.one_line())
            self.notifier.ready(self.status_line)
            return
        applied, restart = [], []
        for key in changed_keys(self.config, new):
            if key in LIVE_KEYS or key.split(".")[0] in LIVE_KEYS or _pattern(key) in LIVE_KEYS:
                applied.append(key)
            else:
                restart.append(key)
        if any(k.split(".")[0] == "metrics" for k in applied) and not self._rebind_metrics(new.metrics):
            applied = [k for k in applied if k.split(".")[0] != "metrics"]
            restart += ["metrics"]
        cfg = self.config
        if "hooks" in applied:
            cfg.hooks = new.hooks
        if any(k.split(".")[0] == "drain" for k in applied):
            cfg.drain = new.drain
        for key in ("poll_interval", "slow_poll_interval"):
            setattr(cfg.imds, key, getattr(new.imds, key))  # the watcher reads them each round
        for old_ck, new_ck in zip(cfg.checkpoints, new.checkpoints):
            if f"checkpoints[{cfg.checkpoints.index(old_ck)}].interval" in applied:
                old_ck.interval = new_ck.interval
        if "agent.log_level" in applied:
            cfg.agent.log_level = new.agent.log_level
            logging.getLogger().setLevel(new.agent.log_level.upper())
        self.supervisor.config = cfg
        if self.supervisor.drainer is not None and hasattr(self.supervisor.drainer, "reconfigure"):
            self.supervisor.drainer.reconfigure()
        log.info("reloaded %s: %s%s", self.config_path, ", ".join(_sections(applied)) or "no changes",
                 f"; needs a restart, old value kept: {', '.join(restart)}" if restart else "")
        self.notifier.ready(self.status_line)

    def _rebind_metrics(self, section: Any) -> bool:
        """A changed [metrics]: a new listener, or the old one kept (and False) if it cannot bind."""
        old = self._http
        if old is not None:
            old.stop()
        try:
            self._http = self._metrics_server(section) if section.enabled else None
            self.config.metrics = section
            return True
        except OSError as exc:
            log.error("reload: metrics endpoint %s: %s; keeping %s", section.listen, exc, self.config.metrics.listen)
            self._http = None
            if old is not None and self.config.metrics.enabled:
                try:
                    self._http = self._metrics_server(self.config.metrics)
                except OSError as again:
                    log.error("metrics endpoint %s: %s (continuing without it)", self.config.metrics.listen, again)
            return False


def changed_keys(old: Config, new: Config) -> List[str]:
    """The dotted keys whose values differ ("hooks" and "drain" as wholes; list sections per entry
    and key when their lengths match, else the whole list). Pure."""
    from agent.config import to_dict

    a, b = to_dict(old), to_dict(new)
    out: List[str] = []
    for section in a:
        if a[section] == b.get(section):
            continue
        if section in ("hooks", "drain") or not isinstance(a[section], (dict, list)):
            out.append(section)
        elif isinstance(a[section], dict):
            out += [f"{section}.{k}" for k in a[section] if a[section][k] != b[section].get(k)]
        elif len(a[section]) != len(b[section]):
            out.append(section)
        else:
            for i, (x, y) in enumerate(zip(a[section], b[section])):
                out += [f"{section}[{i}].{k}" for k in x if x[k] != y.get(k)]
    return out


def _pattern(key: str) -> str:
    import re

    return re.sub(r"\[\d+\]", "[]", key)


def _sections(keys: List[str]) -> List[str]:
    seen: List[str] = []
    for k in keys:
        name = k if not k.startswith(("hooks", "drain")) else k.split(".")[0]
        if name not in seen:
            seen.append(name)
    return seen


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
