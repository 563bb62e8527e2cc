"""Boot the installed package under a real systemd (PID 1 in systemd-nspawn) and watch it work.

Each test boots a fresh overlay of the debootstrap root with the .deb installed, the shipped example
workload unit enabled, and a oneshot driver unit (`spot-agent-test.service`) that acts inside the
booted system, writes what it saw to /var/lib/spot-agent-test/results.json, and powers the container
off (SuccessAction/FailureAction). The container shares the host network, so the agent polls the IMDS
simulator running on the host's loopback. After the container is gone, the test reads the results,
the workload's event log and the container's persistent journal (structured fields and all).

Every wait is bounded: the driver's own waits, the unit's TimeoutStartSec, and the boot's timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from agent.events import MESSAGE_IDS
from tests.system.conftest import REPO, run

BOOT_TIMEOUT = 120
READY_MESSAGE_ID = "5c0f6e1e8b7d4c6f9a4f1d2a7e3b0c10"

HOOK = r"""#!/bin/sh
# Test hook: what the agent passed, and whether the workload was still running at that moment.
d=/var/lib/spot-agent-test
mkdir -p "$d"
{
  echo "time=$(date +%s.%N)"
  env | grep '^SPOT_AGENT_' | sort
  echo "workload=$(systemctl is-active workload.service)"
} > "$d/hook-$SPOT_AGENT_EVENT.log"
"""

DRIVER = r'''#!/usr/bin/python3
"""Acts inside the booted container; the host asserts on what it writes."""
import json, os, subprocess, sys, time

scenario, sim = sys.argv[1], sys.argv[2]
out = {"scenario": scenario, "steps": []}
D = "/var/lib/spot-agent-test"
os.makedirs(D, exist_ok=True)

def sh(*argv, timeout=130, env=None):
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else dict(os.environ, **env))
    out["steps"].append({"argv": list(argv), "rc": r.returncode, "out": r.stdout[-2000:], "err": r.stderr[-2000:], "time": time.time()})
    return r

def show(unit):
    props = "ActiveState,SubState,StatusText,MainPID,Type,NRestarts,ActiveEnterTimestampMonotonic,ExecMainStartTimestampMonotonic,InactiveEnterTimestampMonotonic,Result"
    r = subprocess.run(["systemctl", "show", "-p", props, unit], capture_output=True, text=True, timeout=10)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

def wait_for(pred, seconds):
    end = time.time() + seconds
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False

def save():
    with open(D + "/results.json.tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(D + "/results.json.tmp", D + "/results.json")

try:
    out["agent_ready"] = wait_for(lambda: show("spot-agent.service").get("SubState") == "running", 60)
    out["workload_started"] = wait_for(lambda: show("workload.service").get("SubState") == "running", 30)
    out["agent"] = show("spot-agent.service")
    out["workload"] = show("workload.service")
    out["guard"] = show("spot-agent-drain.service")
    if scenario == "stop":
        conf = "/etc/spot-agent/agent.toml"
        good = open(conf).read()
        with open(conf, "a") as fh:
            fh.write('\n[[hooks]]\non = ["rebalance-recommendation"]\ncommand = ["/usr/local/bin/spot-test-hook"]\n')
        out["reload_time"] = time.time()
        sh("systemctl", "reload", "spot-agent.service", timeout=30)
        time.sleep(1)
        out["agent_after_reload"] = show("spot-agent.service")
        # A broken config: the agent keeps the old one and says why.
        with open(conf, "w") as fh:
            fh.write(good + "\n[imds]\npoll_interval = -1\n")
        out["bad_reload_time"] = time.time()
        sh("systemctl", "reload", "spot-agent.service", timeout=30)
        time.sleep(1)
        out["agent_after_bad_reload"] = show("spot-agent.service")
        with open(conf, "w") as fh:
            fh.write(good)
        # systemctl stop: a plain stop, not a termination. The workload and the guard keep running.
        out["stop_time"] = time.time()
        sh("systemctl", "stop", "spot-agent.service")
        out["agent_after_stop"] = show("spot-agent.service")
        time.sleep(2)
        out["workload_after_stop"] = show("workload.service")
        out["guard_after_stop"] = show("spot-agent-drain.service")
        sh("systemctl", "start", "spot-agent.service", timeout=90)
        out["agent_after_start"] = show("spot-agent.service")
        out["poweroff_time"] = time.time()
        # then the driver ends and the machine powers off: that drains, once
    elif scenario == "spot":
        # A restart (after a config edit) and an upgrade with try-restart leave the workload alone.
        sh("systemctl", "restart", "spot-agent.service", timeout=90)
        out["agent_after_restart"] = show("spot-agent.service")
        out["workload_after_restart"] = show("workload.service")
        before = out["agent_after_restart"]["MainPID"]
        sh("dpkg", "-i", "/var/lib/spot-agent-test/spot-agent.deb", timeout=120, env={"SPOT_AGENT_RESTART_ON_UPGRADE": "1"})
        wait_for(lambda: show("spot-agent.service").get("MainPID") not in ("0", before)
                 and show("spot-agent.service").get("SubState") == "running", 60)
        out["agent_after_upgrade"] = show("spot-agent.service")
        out["workload_after_upgrade"] = show("workload.service")
        out["trigger_time"] = time.time()
        sh("spot-agent", "simulate", "trigger", "spot", "--action", "terminate", "--in", "120", "--endpoint", sim, timeout=30)
        out["hook_ran"] = wait_for(lambda: os.path.exists(D + "/hook-spot-interruption.log"), 20)
        out["checkpointed"] = wait_for(lambda: os.path.exists("/var/lib/workload/checkpoint.done"), 20)
        time.sleep(1)
        out["agent_after_notice"] = show("spot-agent.service")
    elif scenario == "reboot":
        # A spot `stop` notice on every boot: the same notice key each time.
        out["trigger_time"] = time.time()
        sh("spot-agent", "simulate", "trigger", "spot", "--action", "stop", "--in", "120", "--endpoint", sim, timeout=30)
        out["hook_ran"] = wait_for(lambda: os.path.exists(D + "/hook-spot-interruption.log"), 20)
        out["checkpointed"] = wait_for(lambda: "checkpoint" in open("/var/lib/workload/events.log").read(), 20)
        time.sleep(1)
    # scenario "poweroff": nothing more; the shutdown itself is the test.
except Exception as exc:  # the host reports it
    out["error"] = repr(exc)
save()
'''

TEST_UNIT = """[Unit]
Description=spot-agent boot test driver
After=workload.service spot-agent-drain.service
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/local/bin/spot-test-driver {scenario} {sim}
TimeoutStartSec=150
StandardOutput=journal

[Install]
WantedBy=multi-user.target
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "serve", "--listen", f"127.0.0.1:{port}",
                             "--instance-id", "i-0abc1234567890def"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("IMDS simulator did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def agent_config(sim: str) -> str:
    # aws.endpoint_url: a closed local port, so nothing can reach real AWS from the test.
    return f"""
[agent]
state_dir = "/var/lib/spot-agent"

[imds]
endpoint = "{sim}"
poll_interval = 0.5

[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:9"

[metrics]
enabled = false

[drain.workload]
unit = "workload.service"
signal = "SIGUSR1"
marker = "/var/lib/workload/checkpoint.done"
wait = "marker"
checkpoint_timeout = 20

[drain.lifecycle]
enabled = false

[[hooks]]
on = ["spot-interruption", "shutdown"]
command = ["/usr/local/bin/spot-test-hook"]
timeout = 20
"""


def write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, 0, 0)
    path.chmod(mode)


def prepare(root: Path, scenario: str, sim: str, deb: Path = None) -> None:
    write(root / "etc/spot-agent/agent.toml", agent_config(sim), 0o640)
    if deb is not None:  # the upgrade: the same package again, installed inside the booted machine
        # not /tmp: the booted container mounts a fresh tmpfs there
        (root / "var/lib/spot-agent-test").mkdir(parents=True, exist_ok=True)
        run(["cp", str(deb), str(root / "var/lib/spot-agent-test/spot-agent.deb")])
    write(root / "usr/local/bin/spot-test-hook", HOOK, 0o755)
    write(root / "usr/local/bin/spot-test-driver", DRIVER, 0o755)
    etc = root / "etc/systemd/system"
    # The shipped example, unmodified.
    write(etc / "workload.service", (root / "usr/share/spot-agent/examples/workload.service").read_text(), 0o644)
    write(etc / "spot-agent-test.service", TEST_UNIT.format(scenario=scenario, sim=sim), 0o644)
    for unit in ("workload.service", "spot-agent-test.service"):
        link = etc / "multi-user.target.wants" / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    # Nothing else in the minimal root should slow the boot or touch the network.
    (etc / "systemd-networkd-wait-online.service").unlink(missing_ok=True)


def boot(root: Path, tmp_path: Path) -> str:
    console = tmp_path / "console.log"
    # A machine name of its own: two test sessions may boot containers at the same time.
    cmd = f"systemd-nspawn --register=no --keep-unit --quiet --machine=sa-test-{os.getpid()}-{root.parent.name[-8:].replace('_', 'x').lower()} -D {root} -b"
    proc = subprocess.Popen(["script", "-qfec", cmd, str(console)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError(f"container did not power off within {BOOT_TIMEOUT}s; console:\n"
                             + console.read_text(errors="replace")[-6000:])
    return console.read_text(errors="replace") if console.exists() else ""


def journal(root: Path) -> List[Dict[str, str]]:
    res = run(["journalctl", "-D", str(root / "var/log/journal"), "-o", "json", "--no-pager"], check=False)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def unit_messages(entries: List[Dict[str, str]], unit: str) -> List[Dict[str, str]]:
    return [e for e in entries if e.get("_SYSTEMD_UNIT") == unit or e.get("UNIT") == unit]


def describe(entries: List[Dict[str, str]], unit: str = "spot-agent.service") -> str:
    """The unit's journal, with the structured fields, for failure messages."""
    keep = ("MESSAGE_ID", "EVENT_KIND", "DEADLINE", "PRIORITY")
    return "\n".join(f"{e.get('MESSAGE', '')!s} {{{', '.join(f'{k}={e[k]}' for k in keep if k in e)}}}"
                     for e in unit_messages(entries, unit))[-8000:]


def results(root: Path, console: str) -> Dict:
    path = root / "var/lib/spot-agent-test/results.json"
    assert path.exists(), "the driver wrote no results; console:\n" + console[-6000:]
    data = json.loads(path.read_text())
    assert "error" not in data, data
    return data


def workload_events(root: Path) -> List[tuple]:
    lines = (root / "var/lib/workload/events.log").read_text().splitlines()
    return [(float(l.split(" ", 1)[0]), l.split(" ", 1)[1]) for l in lines]


def first(events: List[tuple], prefix: str) -> float:
    times = [t for t, what in events if what.startswith(prefix)]
    assert times, f"no {prefix!r} in the workload's events: {events}"
    return times[0]


def hook_log(root: Path, kind: str) -> Dict[str, str]:
    text = (root / f"var/lib/spot-agent-test/hook-{kind}.log").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def assert_gated_start(res: Dict, entries: List[Dict[str, str]]) -> None:
    agent, workload = res["agent"], res["workload"]
    assert res["agent_ready"] and agent["Type"] == "notify" and agent["ActiveState"] == "active"
    assert agent["StatusText"], "the agent sends STATUS= lines"
    ready = [e for e in unit_messages(entries, "spot-agent.service") if e.get("MESSAGE_ID") == READY_MESSAGE_ID]
    assert ready, "no READY journal entry from the agent:\n" + describe(entries)
    # The workload's process started only after the agent became active, which for Type=notify is READY=1.
    assert res["workload_started"]
    assert int(workload["ExecMainStartTimestampMonotonic"]) >= int(agent["ActiveEnterTimestampMonotonic"]) > 0
    assert res["guard"]["ActiveState"] == "active"


def assert_drained_before_workload_stopped(root: Path, entries: List[Dict[str, str]], kind: str) -> None:
    events = workload_events(root)
    asked, saved, killed = first(events, "SIGUSR1"), first(events, "checkpoint"), first(events, "SIGTERM")
    assert asked < saved < killed, events
    hook = hook_log(root, kind)
    assert hook["SPOT_AGENT_EVENT"] == kind
    assert hook["workload"] == "active", "the drain ran after the workload was already being stopped"
    # The drain (asked for by the guard; the agent itself keeps running until after the workload)
    # was over before the workload got its SIGTERM.
    agent = unit_messages(entries, "spot-agent.service")
    done = [e for e in agent if e.get("DRAIN_STEP") == "done" and e.get("EVENT_KIND") == kind]
    assert done, "the agent never logged the end of its drain:\n" + describe(entries)
    assert int(done[-1]["__REALTIME_TIMESTAMP"]) / 1e6 <= killed, "the workload got SIGTERM before the drain finished"
    stopped = [e for e in agent if "spot-agent stopped" in e.get("MESSAGE", "")]
    assert stopped, "the agent never logged its exit"


@pytest.mark.slow
def test_reload_and_systemctl_stop_leave_the_workload_and_poweroff_drains(root: Path, simulator: str, tmp_path: Path):
    prepare(root, "stop", simulator)
    console = boot(root, tmp_path)
    res = results(root, console)
    entries = journal(root)
    assert_gated_start(res, entries)

    # systemctl reload: SIGHUP re-reads the config in the same process.
    reload_step = next(s for s in res["steps"] if s["argv"][:2] == ["systemctl", "reload"])
    assert reload_step["rc"] == 0, reload_step
    assert res["agent_after_reload"]["MainPID"] == res["agent"]["MainPID"]
    assert res["agent_after_reload"]["ActiveState"] == "active"
    reloaded = [e for e in unit_messages(entries, "spot-agent.service")
                if e.get("MESSAGE", "").startswith("reloaded") and int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= res["reload_time"]]
    assert reloaded and "hooks" in reloaded[0]["MESSAGE"], "no 'reloaded ...: hooks' journal entry:\n" + describe(entries)
    assert res["agent_after_bad_reload"]["MainPID"] == res["agent"]["MainPID"]
    assert res["agent_after_bad_reload"]["ActiveState"] == "active"
    kept = [e for e in unit_messages(entries, "spot-agent.service")
            if "keeping the old config" in e.get("MESSAGE", "") and int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= res["bad_reload_time"]]
    assert kept, "a bad config on reload was not reported:\n" + describe(entries)

    # systemctl stop: the agent exits without a drain; the workload and the drain guard keep running.
    stop_step = next(s for s in res["steps"] if s["argv"][:2] == ["systemctl", "stop"])
    assert stop_step["rc"] == 0, stop_step
    assert res["agent_after_stop"]["ActiveState"] == "inactive" and res["agent_after_stop"]["Result"] == "success"
    assert res["workload_after_stop"]["ActiveState"] == "active"
    assert res["workload_after_stop"]["MainPID"] == res["workload"]["MainPID"], "stopping the agent restarted the workload"
    assert res["guard_after_stop"]["ActiveState"] == "active", "a stop of the agent stopped the drain guard"
    assert res["agent_after_start"]["ActiveState"] == "active"
    events = workload_events(root)
    assert not [t for t, what in events if what.startswith("SIGUSR1") and t < res["poweroff_time"]], events
    agent = unit_messages(entries, "spot-agent.service")
    assert any("exiting without a drain" in e.get("MESSAGE", "") for e in agent), describe(entries)
    # The poweroff at the end drains, once, before the workload is stopped.
    assert_drained_before_workload_stopped(root, entries, "shutdown")
    assert_drained_once(entries, events)
    shutdown = [e for e in agent if e.get("EVENT_KIND") == "shutdown" and e.get("MESSAGE_ID") == MESSAGE_IDS["shutdown"]]
    assert shutdown, "no journal entry with EVENT_KIND=shutdown and its MESSAGE_ID:\n" + describe(entries)
    guard = [e.get("MESSAGE", "") for e in unit_messages(entries, "spot-agent-drain.service")]
    assert any("drain shutdown done" in m for m in guard), guard


@pytest.mark.slow
def test_restart_and_upgrade_leave_the_workload_and_a_spot_notice_still_drains(root: Path, simulator: str,
                                                                               tmp_path: Path, deb):
    run([sys.executable, "-m", "agent", "simulate", "trigger", "clear", "--endpoint", simulator])
    prepare(root, "spot", simulator, deb.path)
    console = boot(root, tmp_path)
    res = results(root, console)
    entries = journal(root)
    assert_gated_start(res, entries)

    # systemctl restart spot-agent, then an upgrade with SPOT_AGENT_RESTART_ON_UPGRADE=1 (try-restart):
    # a new agent each time, the same workload process, never asked to checkpoint.
    upgrade = next(s for s in res["steps"] if s["argv"][:2] == ["dpkg", "-i"])
    assert upgrade["rc"] == 0, upgrade
    pids = [res["agent"]["MainPID"], res["agent_after_restart"]["MainPID"], res["agent_after_upgrade"]["MainPID"]]
    assert len(set(pids)) == 3 and "0" not in pids, (pids, upgrade, describe(entries))
    assert res["agent_after_upgrade"]["ActiveState"] == "active"
    for key in ("workload_after_restart", "workload_after_upgrade"):
        assert res[key]["MainPID"] == res["workload"]["MainPID"] and res[key]["ActiveState"] == "active", res[key]
    events = workload_events(root)
    assert not [t for t, what in events if what.startswith("SIGUSR1") and t < res["trigger_time"]], events

    trigger = next(s for s in res["steps"] if "trigger" in s["argv"])
    assert trigger["rc"] == 0, trigger
    assert res["hook_ran"], "the spot-interruption hook did not run"
    hook = hook_log(root, "spot-interruption")
    assert hook["SPOT_AGENT_ACTION"] == "terminate"
    deadline = int(hook["SPOT_AGENT_DEADLINE"])
    assert abs(deadline - (res["trigger_time"] + 120)) < 5, (deadline, res["trigger_time"])
    assert hook["SPOT_AGENT_DEADLINE_ISO"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(deadline)))
    assert hook["workload"] == "active"

    # Structured journal fields for the notice.
    notices = [e for e in unit_messages(entries, "spot-agent.service")
               if e.get("EVENT_KIND") == "spot-interruption" and "MESSAGE_ID" in e]
    assert notices, "no journal entry with EVENT_KIND=spot-interruption"
    assert notices[0]["MESSAGE_ID"] == MESSAGE_IDS["spot-interruption"]
    assert notices[0]["DEADLINE"] == str(deadline)
    assert notices[0].get("EVENT_ACTION") == "terminate"

    # The drain asked the workload for its checkpoint (SIGUSR1, marker) long before the shutdown.
    assert res["checkpointed"]
    events = workload_events(root)
    assert first(events, "SIGUSR1") < first(events, "checkpoint") < first(events, "SIGTERM")
    assert_drained_once(entries, events)  # the poweroff after the notice is the same termination


@pytest.mark.slow
def test_poweroff_drains_before_the_workload_is_killed(root: Path, simulator: str, tmp_path: Path):
    run([sys.executable, "-m", "agent", "simulate", "trigger", "clear", "--endpoint", simulator])
    prepare(root, "poweroff", simulator)
    # Twice on the same disk: a stopped and restarted instance (or any reboot) keeps the agent's
    # state dir, and the next shutdown must drain again.
    for n in (1, 2):
        res, entries = boot_again(root, tmp_path, "shutdown")
        assert_drained_before_workload_stopped(root, entries, "shutdown")
        shutdown = [e for e in unit_messages(entries, "spot-agent.service")
                    if e.get("EVENT_KIND") == "shutdown" and e.get("MESSAGE_ID") == MESSAGE_IDS["shutdown"]]
        assert shutdown, f"boot {n}: no journal entry with EVENT_KIND=shutdown and its MESSAGE_ID:\n" + describe(entries)
        assert_drained_once(entries, workload_events(root))


@pytest.mark.slow
def test_a_stop_notice_on_each_boot_drains_each_boot_once(root: Path, simulator: str, tmp_path: Path):
    """A spot instance stopped and started again: the same root booted twice, a spot `stop` notice (the
    same notice key) on each boot. Latches and drain records belong to a boot, so each boot drains."""
    prepare(root, "reboot", simulator)
    boots = []
    for n in (1, 2):
        run([sys.executable, "-m", "agent", "simulate", "trigger", "clear", "--endpoint", simulator])
        res, entries = boot_again(root, tmp_path, "spot-interruption")
        assert res["hook_ran"] and res["checkpointed"], f"boot {n}: the stop notice did not drain:\n" + describe(entries)
        assert hook_log(root, "spot-interruption")["SPOT_AGENT_ACTION"] == "stop"
        events = workload_events(root)
        assert first(events, "SIGUSR1") < first(events, "checkpoint") < first(events, "SIGTERM")
        assert_drained_once(entries, events)
        boots.append({e["_BOOT_ID"] for e in unit_messages(entries, "spot-agent.service")})
    assert len(boots[0] | boots[1]) == 2, "not two boots"


def boot_again(root: Path, tmp_path: Path, hook_kind: str):
    """Boot the same root once more: this boot's results and journal entries only."""
    for f in [root / "var/lib/workload/events.log", root / f"var/lib/spot-agent-test/hook-{hook_kind}.log",
              root / "var/lib/spot-agent-test/results.json"]:
        f.unlink(missing_ok=True)
    since = time.time()
    console = boot(root, tmp_path)
    res = results(root, console)
    entries = [e for e in journal(root) if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= since]
    assert_gated_start(res, entries)
    return res, entries


def assert_drained_once(entries: List[Dict[str, str]], events: List[tuple]) -> None:
    """One drain in this boot: one plan in the agent's journal, one checkpoint request to the workload."""
    plans = [e for e in unit_messages(entries, "spot-agent.service") if e.get("MESSAGE", "").startswith("drain plan for")]
    assert len(plans) == 1, "expected one drain in this boot:\n" + describe(entries)
    assert [what for _, what in events].count("SIGUSR1") == 1, events
