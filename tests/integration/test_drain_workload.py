"""The drain with a real workload process: it is told, its checkpoint is awaited, and persistence
happens whatever the workload, the hooks or the webhook do. The lifecycle action is completed once.

Toy workload as a real process, real hooks (shell scripts), a real HTTP webhook on loopback, real
loop-device filesystem, moto over HTTP with the Auto Scaling lifecycle calls recorded.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from agent.events import Event
from agent.sim.localaws import lifecycle_calls
from agent.sim.toy_workload import newest_step
from tests.integration.drain_helpers import GROUP, HOOK, drain_env, writable  # noqa: F401

pytestmark = pytest.mark.root


def spot(seconds: float = 120.0, key: str = "spot:1", action: str = "terminate") -> Event:
    now = time.time()
    return Event("spot-interruption", action, now + seconds, key, now)


def _final_step(ckpt_dir: str) -> int:
    step = newest_step(ckpt_dir)
    with open(os.path.join(ckpt_dir, f"ckpt-{step:08d}.json")) as fh:
        data = json.load(fh)
    assert data["final"] is True
    return step


def test_spot_notice_signals_waits_snapshots_and_completes_once(drain_env):
    proc = drain_env.start_workload()
    time.sleep(0.5)  # let it train a few steps
    cfg = drain_env.config(extra="[drain.lifecycle]\nheartbeat_interval = 1\n")
    drainer = drain_env.drainer(cfg)
    report = drainer.run(spot())
    assert report.ok, report.steps
    assert [s.state for s in report.steps] == ["ok", "ok", "ok", "skipped", "ok", "ok"], report.steps
    assert proc.wait(10) == 0
    step = _final_step(drain_env.ckpt_dir)
    assert step > 0
    # the checkpoint was on disk before the snapshot: the marker's mtime precedes the snapshot request
    assert os.path.exists(drain_env.marker)
    assert "ckpt" in report.snapshots and len(drain_env.snapshots()) == 1
    completions = lifecycle_calls("CompleteLifecycleAction")
    assert [(c["group"], c["hook"], c["instance_id"], c["result"]) for c in completions] == [
        (GROUP, HOOK, drain_env.identity.instance_id, "CONTINUE")]
    assert report.lifecycle_completed
    assert lifecycle_calls("RecordLifecycleActionHeartbeat"), "no heartbeat while draining"
    assert writable(drain_env.mnt)
    # the same notice again (a restarted daemon sees it in IMDS): the first report, nothing redone
    again = drainer.run(spot())
    assert again.snapshots == report.snapshots
    assert len(lifecycle_calls("CompleteLifecycleAction")) == 1
    assert len(drain_env.snapshots()) == 1
    # the workload resumes from its final checkpoint
    proc2 = drain_env.start_workload("--max-steps", str(step + 1))
    assert proc2.wait(20) == 0
    assert "starting at step %d" % step in proc2.stdout.read()


def test_workload_ignoring_sigterm_costs_its_budget_not_the_snapshot(drain_env):
    proc = drain_env.start_workload("--ignore-sigterm")
    cfg = drain_env.config(workload=f'pidfile = "{drain_env.pidfile}"\nwait = "process"\ncheckpoint_timeout = 2\n')
    report = drain_env.drainer(cfg).run(spot())
    wait = report.step("wait")
    assert wait.state == "cut" and "process" in wait.reason
    assert 1.5 <= wait.seconds < 10
    assert report.step("snapshot").state == "ok" and report.ok
    assert len(drain_env.snapshots()) == 1
    assert proc.poll() is None  # still running: it ignored us
    assert len(lifecycle_calls("CompleteLifecycleAction")) == 1


def test_failing_hook_and_dead_webhook_do_not_stop_persistence(drain_env, tmp_path):
    hook = tmp_path / "fail.sh"
    hook.write_text("#!/bin/sh\necho saving; exit 3\n")
    hook.chmod(0o755)
    drain_env.start_workload()
    extra = f'[[hooks]]\non = ["spot-interruption"]\ncommand = ["{hook}"]\ntimeout = 5\n'
    wl = (f'pidfile = "{drain_env.pidfile}"\nmarker = "{drain_env.marker}"\nwait = "hooks"\n'
          '[drain.workload.webhook]\nurl = "http://127.0.0.1:9/drain"\ntimeout = 0.5\n')
    cfg = drain_env.config(extra=extra + "[drain]\nnotify_timeout = 2\n", workload=wl)
    report = drain_env.drainer(cfg).run(spot())
    notify = report.step("notify")
    assert notify.state == "failed" and "webhook" in notify.reason and "gave up" in notify.reason
    assert "sent SIGTERM" in notify.reason  # the signal still went out
    assert report.step("wait").state == "ok"  # the hook exited (with 3): that ends the wait
    assert report.step("snapshot").state == "ok" and report.ok
    assert report.lifecycle_completed


class _Webhook(BaseHTTPRequestHandler):
    bodies: list = []
    fail_first = 2

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append((body, self.headers.get("X-Token")))
        code = 503 if len(type(self).bodies) <= type(self).fail_first else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_webhook_is_retried_until_it_answers(drain_env):
    _Webhook.bodies = []
    server = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wl = (f'wait = "none"\n[drain.workload.webhook]\nurl = "http://127.0.0.1:{server.server_port}/drain"\n'
              'headers = { X-Token = "s3cret" }\n')
        report = drain_env.drainer(drain_env.config(workload=wl)).run(spot())
    finally:
        server.shutdown()
    assert report.step("notify").state == "ok", report.steps
    assert "attempt 3" in report.step("notify").reason
    body, token = _Webhook.bodies[-1]
    assert token == "s3cret"
    assert body["event"]["kind"] == "spot-interruption" and body["instance_id"] == drain_env.identity.instance_id
    assert body["deadline"] > time.time()


def test_twenty_seconds_left_still_snapshots(drain_env):
    drain_env.start_workload("--ignore-sigterm")
    cfg = drain_env.config(workload=f'pidfile = "{drain_env.pidfile}"\nwait = "process"\ncheckpoint_timeout = 60\n')
    started = time.time()
    report = drain_env.drainer(cfg).run(spot(20))
    elapsed = time.time() - started
    assert report.step("snapshot").state == "ok" and len(drain_env.snapshots()) == 1
    # 10 s usable, 7 s reserved (snapshot 5, lifecycle 2): notify and wait share 3 s, wait is cut short
    assert report.step("wait").state == "cut"
    assert report.step("wait").seconds < 4
    assert report.lifecycle_completed
    assert elapsed < 20 and report.margin_seconds > 0


def test_hibernate_snapshots_before_telling_the_workload(drain_env):
    drain_env.start_workload()
    report = drain_env.drainer(drain_env.config()).run(spot(action="hibernate"))
    assert [s.name for s in report.steps][:2] == ["snapshot", "upload"]
    [snap] = drain_env.snapshots()
    assert report.ok
    # the marker (written on SIGTERM) came after the snapshot request
    assert os.stat(drain_env.marker).st_mtime >= snap["StartTime"].timestamp() - 1


def test_rebalance_takes_an_early_snapshot_and_leaves_the_workload_running(drain_env):
    proc = drain_env.start_workload()
    now = time.time()
    report = drain_env.drainer(drain_env.config()).early(Event("rebalance-recommendation", "", None, "rebalance:1", now))
    assert report.step("snapshot").state == "ok"
    assert [s.name for s in report.steps] == ["snapshot", "upload", "retention"]
    assert proc.poll() is None
    assert not lifecycle_calls("CompleteLifecycleAction")
    assert len(drain_env.snapshots()) == 1


def test_a_termination_during_an_early_checkpoint_takes_over(drain_env):
    started = threading.Event()
    drain_env.host.sim.on_snapshot.append(lambda sid, vid: started.set())
    drain_env.host.sim.snapshot_delay = 1.5
    # instant moto has no per-volume snapshot rate: no spacing (tests/integration/test_drain_strict.py has it)
    drainer = drain_env.drainer(drain_env.config(workload='wait = "none"\n', extra="[drain]\nsnapshot_spacing = 0\n"))
    early = {}
    t = threading.Thread(target=lambda: early.update(report=drainer.early(
        Event("rebalance-recommendation", "", None, "rebalance:2", time.time()))))
    try:
        t.start()
        assert started.wait(10)
        report = drainer.run(spot())
        t.join(20)
    finally:
        drain_env.host.sim.snapshot_delay = 0.0
    assert report.ok and report.step("snapshot").state == "ok"
    assert early["report"].step("snapshot").state == "ok"
    assert early["report"].step("retention").state == "skipped"
    assert "termination" in early["report"].step("retention").reason
    assert len(drain_env.snapshots()) == 2
    assert writable(drain_env.mnt)


def test_systemd_unit_is_signalled_with_systemctl_kill(drain_env, tmp_path):
    # systemd is not PID 1 here, so a stand-in `systemctl` (first on PATH for the agent's Runner)
    # answers MainPID and delivers the signal the way `systemctl kill --kill-whom=main` would.
    from agent.runner import Runner

    proc = drain_env.start_workload()
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {log}
case "$1" in
  show) cat {drain_env.pidfile} ;;
  kill) sig=$(echo "$2" | sed 's/--signal=//'); kill -s "${{sig#SIG}}" "$(cat {drain_env.pidfile})" ;;
esac
""")
    fake.chmod(0o755)
    runner = Runner(env={"PATH": f"{fake.parent}:{os.environ['PATH']}"})
    cfg = drain_env.config(workload='unit = "train.service"\nwait = "process"\ncheckpoint_timeout = 20\n')
    report = drain_env.drainer(cfg, runner=runner).run(spot())
    assert report.step("notify").state == "ok", report.steps
    assert report.step("wait").state == "ok"  # the unit's main process exited
    assert proc.wait(5) == 0
    calls = log.read_text().splitlines()
    assert "show -p MainPID --value train.service" in calls
    assert "kill --signal=SIGTERM --kill-whom=main train.service" in calls


def test_metrics_record_the_drain(drain_env):
    from agent import metrics

    def value(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("spot_agent_snapshots_created_total", volume="ckpt"),
              value("spot_agent_lifecycle_actions_completed_total"), value("spot_agent_drains_total", result="success"))
    report = drain_env.drainer(drain_env.config(workload='wait = "none"\n')).run(spot())
    assert report.ok
    assert value("spot_agent_snapshots_created_total", volume="ckpt") == before[0] + 1
    assert value("spot_agent_lifecycle_actions_completed_total") == before[1] + 1
    assert value("spot_agent_drains_total", result="success") == before[2] + 1
    assert 0 < value("spot_agent_last_freeze_duration_seconds", volume="ckpt") < 10
    assert value("spot_agent_drain_step_duration_seconds_count", step="snapshot") >= 1
    assert value("spot_agent_drain_margin_seconds") > 100
