"""The pure parts of issue 12: what a reload applies, the host facts, and one drain that takes in
every later terminal event (its hooks once per kind, an earlier deadline re-plans)."""

from __future__ import annotations

import threading
import time

from agent.clock import Clock
from agent.config import parse
from agent.daemon import LIVE_KEYS, _pattern, changed_keys
from agent.events import ASG_TERMINATION, SHUTDOWN, SPOT_INTERRUPTION, Event
from agent.hostfacts import HostFacts
from agent.runner import Result
from agent.supervisor import Supervisor


class StateRunner:
    def __init__(self, out: str, rc: int = 1) -> None:
        self.out, self.rc, self.calls = out, rc, []

    def run(self, argv, timeout=60.0, check=True, input=None):
        self.calls.append(list(argv))
        return Result(list(argv), self.rc, self.out, "", 0.0)


def test_host_facts_come_from_the_configured_roots(tmp_path):
    proc, run = tmp_path / "proc", tmp_path / "run"
    (proc / "sys/kernel/random").mkdir(parents=True)
    (proc / "sys/kernel/random/boot_id").write_text("b-42\n")
    runner = StateRunner("stopping\n")
    host = HostFacts(str(proc), str(run), "/opt/systemctl", runner)
    assert host.boot_id() == "b-42"
    assert not host.under_systemd() and host.system_state() == "" and not host.shutting_down()
    assert runner.calls == [], "without systemd nothing is asked"
    (run / "systemd/system").mkdir(parents=True)
    assert host.shutting_down()  # is-system-running exits non-zero for "stopping": the output counts
    assert runner.calls[-1] == ["/opt/systemctl", "is-system-running"]
    runner.out = "running\n"
    assert not host.shutting_down()
    assert HostFacts(str(tmp_path / "nothing")).boot_id() == ""


def test_a_reload_names_each_changed_key_and_classifies_it():
    base = '[[checkpoints]]\ndir = "/c"\ns3 = "s3://bucket/c/"\n[[hooks]]\non = ["shutdown"]\ncommand = ["/bin/true"]\n'
    old = parse(base)
    new = parse(base.replace('on = ["shutdown"]', 'on = ["manual"]') + '[imds]\npoll_interval = 2.0\nendpoint = "http://127.0.0.1:1"\n'
                '[aws]\nregion = "eu-west-1"\n[drain]\nmargin = 3.0\n[metrics]\nlisten = "127.0.0.1:1"\n')
    new.checkpoints[0].interval = 60.0
    new.checkpoints[0].keep = 9
    keys = changed_keys(old, new)
    assert set(keys) == {"hooks", "drain", "imds.poll_interval", "imds.endpoint", "aws.region", "metrics.listen",
                         "checkpoints[0].interval", "checkpoints[0].keep"}
    live = {k for k in keys if k in LIVE_KEYS or k.split(".")[0] in LIVE_KEYS or _pattern(k) in LIVE_KEYS}
    assert live == {"hooks", "drain", "imds.poll_interval", "metrics.listen", "checkpoints[0].interval"}
    assert changed_keys(old, parse(base)) == []


class FakeDrainer:
    """Records what the supervisor asks; the drain blocks until released (a drain in progress)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.runs, self.tightened = [], []

    def run(self, event):
        self.runs.append(event.kind)
        self.release.wait(10)
        return type("R", (), {"ok": True, "steps": []})()

    def tighten(self, event):
        self.tightened.append(event.deadline)
        return True


def hooks_config(tmp_path):
    out = tmp_path / "hooks.out"
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\necho $SPOT_AGENT_EVENT >> {out}\n")
    script.chmod(0o755)
    cfg = parse(f'[[hooks]]\non = ["spot-interruption", "asg-termination", "shutdown"]\ncommand = ["{script}"]\n')
    return cfg, out


def wait_lines(path, n, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().split()) >= n:
            break
        time.sleep(0.02)
    return path.read_text().split() if path.exists() else []


def test_later_terminal_kinds_run_their_hooks_once_and_tighten_the_drain(tmp_path):
    cfg, out = hooks_config(tmp_path)
    drainer = FakeDrainer()
    sup = Supervisor(cfg, Clock(), drainer)
    recorded = []
    sup.on_hooks = recorded.append
    now = time.time()
    assert sup.dispatch(Event(SPOT_INTERRUPTION, "terminate", now + 120, "spot:terminate", now)) == "drain"
    # ASG's Terminated a few seconds later: its hooks, not a second drain.
    assert sup.dispatch(Event(ASG_TERMINATION, "terminate", None, "asg:Terminated", now)) == "hooks"
    assert sup.dispatch(Event(ASG_TERMINATION, "terminate", None, "asg:Terminated", now)) == "already-draining"
    # A notice with an earlier deadline re-plans the running drain.
    sup.dispatch(Event(SHUTDOWN, "shutdown", now + 30, "shutdown", now))
    assert drainer.tightened == [now + 30]
    drainer.release.set()
    assert sup.wait(10)
    assert drainer.runs == [SPOT_INTERRUPTION]
    # The drain's own kind is run by its notify step (not here); the others once each.
    assert sorted(wait_lines(out, 2)) == ["asg-termination", "shutdown"]
    assert recorded[-1] == [SPOT_INTERRUPTION, ASG_TERMINATION, SHUTDOWN]


def test_an_earlier_runs_drain_and_hooks_are_not_repeated(tmp_path):
    cfg, out = hooks_config(tmp_path)
    sup = Supervisor(cfg, Clock(), FakeDrainer())
    sup.mark_drained(SPOT_INTERRUPTION, [ASG_TERMINATION])
    now = time.time()
    assert sup.dispatch(Event(ASG_TERMINATION, "terminate", None, "asg:Terminated", now)) == "already-draining"
    assert sup.dispatch(Event(SHUTDOWN, "shutdown", now + 90, "shutdown", now)) == "hooks"
    sup.wait(10)
    assert wait_lines(out, 1) == ["shutdown"]


def test_a_spot_notice_back_after_a_hibernation_is_a_new_notice():
    """Hibernate and resume keep the boot id (and the process): the notice that comes after the
    resume is new, keyed by its own time; a short 404 between polls is still the same notice."""
    from agent.imds.parse import SpotNotice
    from agent.notices import NoticeTracker

    now = 1_900_000_000.0
    t = NoticeTracker()
    [first] = t.spot(SpotNotice("hibernate", now + 120), now)
    assert t.spot(None, now + 121) == [] and t.spot(SpotNotice("hibernate", now + 120), now + 122) == []
    assert t.spot(None, now + 130) == []  # hibernated ... resumed, no notice for a long time
    assert t.spot(None, now + 3000) == []
    [second] = t.spot(SpotNotice("hibernate", now + 3100), now + 3001)
    assert second.key != first.key and second.key == f"spot:hibernate@{int(now + 3100)}"
    assert t.spot(SpotNotice("hibernate", now + 3100), now + 3002) == []
    # A fresh boot has no latches: the first notice keeps the plain key.
    assert NoticeTracker().spot(SpotNotice("stop", now), now - 100)[0].key == "spot:stop"


def test_a_terminal_notice_after_the_instance_outlived_its_drain_drains_again(tmp_path):
    cfg, out = hooks_config(tmp_path)
    clock = type("C", (Clock,), {"t": 1_900_000_000.0, "time": lambda self: self.t})()
    drainer = FakeDrainer()
    drainer.release.set()
    sup = Supervisor(cfg, clock, drainer)
    sup.dispatch(Event(SPOT_INTERRUPTION, "hibernate", clock.t + 120, "spot:hibernate", clock.t))
    assert sup.wait(10)
    clock.t += 60  # still inside the first termination: the same one
    assert sup.dispatch(Event(ASG_TERMINATION, "terminate", None, "asg:Terminated", clock.t)) == "hooks"
    clock.t += 3000  # resumed long after the first deadline
    later = Event(SPOT_INTERRUPTION, "hibernate", clock.t + 120, "spot:hibernate@1", clock.t)
    assert sup.dispatch(later) == "drain"
    assert sup.wait(10)
    assert drainer.runs == [SPOT_INTERRUPTION, SPOT_INTERRUPTION]
