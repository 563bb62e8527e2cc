"""The daemon end to end against the simulator: notices run hooks, SIGTERM drains, config safety."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.daemon_harness import AgentProcess, wait_file


def config(tmp_path, imds_url, hook, extra=""):
    return f'''
[agent]
state_dir = "{tmp_path}/state"
socket = "{tmp_path}/state/agent.sock"
[imds]
endpoint = "{imds_url}"
poll_interval = 0.2
slow_poll_interval = 0.5
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:9"
[metrics]
enabled = false
[drain.lifecycle]
enabled = false
[fleet]
launch_lifecycle = false
[[hooks]]
on = ["spot-interruption", "rebalance-recommendation", "scheduled-maintenance", "asg-termination", "shutdown"]
command = ["{hook}"]
timeout = 10
{extra}
'''


@pytest.fixture
def hook(tmp_path):
    out = tmp_path / "hook.out"
    path = tmp_path / "hook.sh"
    path.write_text(f'#!/bin/sh\necho "$SPOT_AGENT_EVENT|$SPOT_AGENT_ACTION|$SPOT_AGENT_DEADLINE|$SPOT_AGENT_DEADLINE_ISO" >> {out}\n')
    path.chmod(0o755)
    return str(path), str(out)


@pytest.fixture
def agent(tmp_path, imds_sim, hook):
    procs = []

    def start(extra="", **kw):
        p = AgentProcess(tmp_path, config(tmp_path, imds_sim.url, hook[0], extra), **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def lines(path):
    with open(path) as fh:
        return [line.split("|") for line in fh.read().splitlines()]


def test_spot_notice_runs_the_hook_with_the_deadline(agent, imds_sim, hook):
    a = agent(watchdog_usec=2_000_000)
    a.wait_ready()
    assert a.notify.wait_for("WATCHDOG=1")
    assert a.notify.wait_for("STATUS=ready")
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    wait_file(hook[1], contains="spot-interruption")
    (row,) = lines(hook[1])
    assert row[0] == "spot-interruption" and row[1] == "terminate"
    assert abs(int(row[2]) - imds_sim.state.spot["time"]) <= 1
    assert row[3].endswith("Z")
    # The notice stays up; it must not run again.
    time.sleep(1.0)
    assert len(lines(hook[1])) == 1
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    assert a.notify.wait_for("STOPPING=1")
    # Once per termination: the shutdown after a completed spot drain does not drain again.
    assert [r[0] for r in lines(hook[1])] == ["spot-interruption"]


def test_sigterm_drains_when_the_config_asks(agent, hook):
    # Outside systemd a SIGTERM only stops the agent unless [drain] on_sigterm = "drain" (a rehearsal);
    # tests/integration/test_daemon_operators.py covers what SIGTERM means under systemd.
    a = agent(extra='[drain]\nshutdown_budget = 45\non_sigterm = "drain"\n')
    a.wait_ready()
    before = time.time()
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    (row,) = lines(hook[1])
    assert row[0] == "shutdown"
    assert before + 40 <= int(row[2]) <= time.time() + 46


def test_rebalance_then_spot_each_once(agent, imds_sim, hook):
    a = agent()
    a.wait_ready()
    imds_sim.control("rebalance", {})
    wait_file(hook[1], contains="rebalance-recommendation")
    imds_sim.control("spot", {"action": "stop", "in": 100})
    wait_file(hook[1], contains="spot-interruption")
    time.sleep(0.8)
    assert sorted(r[0] for r in lines(hook[1])) == ["rebalance-recommendation", "spot-interruption"]


def test_restart_does_not_fire_a_handled_notice_again(agent, imds_sim, hook):
    a = agent()
    a.wait_ready()
    imds_sim.control("asg", {"state": "Terminated"})
    wait_file(hook[1], contains="asg-termination")
    a.proc.kill()
    a.proc.wait()
    b = agent()
    b.wait_ready()
    time.sleep(1.5)
    assert [r[0] for r in lines(hook[1])] == ["asg-termination"]


def test_reload_applies_new_hooks_and_keeps_old_on_error(agent, imds_sim, hook, tmp_path):
    a = agent()
    a.wait_ready()
    other = tmp_path / "other.out"
    new_hook = tmp_path / "new.sh"
    new_hook.write_text(f"#!/bin/sh\necho $SPOT_AGENT_EVENT >> {other}\n")
    new_hook.chmod(0o755)
    text = open(a.config_path).read()
    with open(a.config_path, "w") as fh:
        fh.write(text.replace("timeout = 10\n", "timeout = \"ten\"\n"))
    a.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "keeping the old config" not in a.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "hooks[0].timeout" in a.log()
    with open(a.config_path, "w") as fh:
        fh.write(text.replace(hook[0], str(new_hook)))
    a.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reloaded" not in a.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.notify.wait_for("RELOADING=1")
    imds_sim.control("rebalance", {})
    assert wait_file(str(other), contains="rebalance").strip() == "rebalance-recommendation"
    assert not os.path.exists(hook[1])


def test_imds_disabled_at_start_is_reported_and_shutdown_still_works(agent, imds_sim, hook, tmp_path):
    imds_sim.control("fault", {"kind": "403"})
    a = agent(extra='[drain]\non_sigterm = "drain"\n')
    a.wait_ready()
    assert "IMDS DISABLED" in " ".join(a.notify.lines)
    status = wait_file(str(tmp_path / "state" / "status.json"), contains='"disabled": true')
    assert '"ready": true' in status
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    assert lines(hook[1])[0][0] == "shutdown"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def test_bad_config_is_refused_with_the_key_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[hooks]]\non = ["shutdown"]\ncommand = ["/bin/true"]\n[[hooks]]\non = ["shutdown"]\ncommand = ["/bin/true"]\ntimeout = -3\n')
    path.chmod(0o644)
    r = run_cli("run", "--config", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "hooks[1].timeout: must be >= 0.1" in r.stderr
    r = run_cli("check-config", "--config", str(path))
    assert r.returncode == 2 and "hooks[1].timeout" in r.stderr
    r = run_cli("check-config", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read config" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="permission rules apply to a root agent")
def test_writable_config_or_hook_is_refused(tmp_path, hook):
    path = tmp_path / "agent.toml"
    path.write_text(f'[[hooks]]\non = ["shutdown"]\ncommand = ["{hook[0]}"]\n')
    path.chmod(0o666)
    r = run_cli("check-config", "--config", str(path))
    assert r.returncode == 2 and "writable by group or others" in r.stderr and str(path) in r.stderr
    path.chmod(0o644)
    os.chmod(hook[0], 0o777)
    r = run_cli("check-config", "--config", str(path))
    assert r.returncode == 2 and "hooks[0].command[0]: refusing an unsafe hook executable" in r.stderr
    os.chmod(hook[0], 0o755)
    assert run_cli("check-config", "--config", str(path)).returncode == 0


def test_cli_basics():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("spot-agent ")
    r = run_cli("--help")
    assert r.returncode == 0 and "simulate" in r.stdout and "check-config" in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli("simulate", "serve", "--listen", "nope")
    assert r.returncode == 2 and "--listen must be HOST:PORT" in r.stderr


def test_restarted_after_a_drain_does_not_drain_again_at_shutdown(agent, imds_sim, hook, tmp_path):
    a = agent(extra='[drain]\non_sigterm = "drain"\n')
    a.wait_ready()
    imds_sim.control("spot", {"action": "terminate", "in": 60})
    wait_file(hook[1], contains="spot-interruption")
    wait_file(str(tmp_path / "state" / "status.json"), contains='"state": "drained"')
    a.proc.kill()  # e.g. systemd restarted it after the drain finished
    a.proc.wait()
    b = agent(extra='[drain]\non_sigterm = "drain"\n')
    b.wait_ready()
    wait_file(str(tmp_path / "state" / "status.json"), contains='"state": "drained"')
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    # The shutdown is the same termination: no second drain, only the shutdown kind's own hooks.
    assert [r[0] for r in lines(hook[1])] == ["spot-interruption", "shutdown"]
    assert "drain plan for" not in b.log()
