"""What operators do to a running agent: stop, restart, reload, reboot, power off (issue 12).

The real daemon as a subprocess against the IMDS simulator. What it asks the host (the boot id,
whether systemd runs the machine, `systemctl is-system-running`) comes from a FakeHost directory the
test drives, because systemd cannot be PID 1 here; tests/system/test_nspawn_boot.py does the same
under a real systemd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.daemon_harness import AgentProcess, FakeHost, wait_file
from tests.integration.test_daemon import agent, config, hook, lines  # noqa: F401 - fixtures


@pytest.fixture
def fake(tmp_path):
    return FakeHost(tmp_path)


def status_file(tmp_path) -> str:
    return str(tmp_path / "state" / "status.json")


def drained(tmp_path, timeout: float = 20.0) -> dict:
    wait_file(status_file(tmp_path), timeout, contains='"state": "drained"')
    with open(status_file(tmp_path)) as fh:
        return json.load(fh)


def wait_log(proc, text: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while text not in proc.log():
        if time.monotonic() > end:
            raise AssertionError(f"{text!r} not in the log within {timeout}s:\n{proc.log()}")
        time.sleep(0.05)


def kinds(path):
    return [r[0] for r in lines(path)] if os.path.exists(path) else []


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("systemd,state,mode,drains,sig", [
    (True, "running", "auto", False, signal.SIGTERM),     # systemctl stop / restart spot-agent
    (True, "degraded", "auto", False, signal.SIGTERM),
    (True, "stopping", "auto", True, signal.SIGTERM),     # poweroff, reboot, ACPI shutdown, ASG scale-in without a hook
    (False, "stopping", "auto", False, signal.SIGTERM),   # no systemd (a laptop): SIGTERM only stops the agent
    (False, "running", "auto", False, signal.SIGINT),     # Ctrl-C too
    (False, "running", "drain", True, signal.SIGTERM),    # ... unless the config asks for the drain
    (True, "stopping", "exit", False, signal.SIGTERM),
])
def test_what_a_sigterm_means(agent, hook, tmp_path, systemd, state, mode, drains, sig):
    fake = FakeHost(tmp_path, systemd=systemd)
    fake.set_state(state)
    a = agent(fake.toml() + f'[drain]\nshutdown_budget = 45\non_sigterm = "{mode}"\n')
    a.wait_ready()
    before = time.time()
    a.signal(sig)
    assert a.wait_exit() == 0
    if drains:
        (row,) = lines(hook[1])
        assert row[0] == "shutdown"
        assert before + 40 <= int(row[2]) <= time.time() + 46
    else:
        assert kinds(hook[1]) == []
        assert "exiting without a drain" in a.log()
        assert a.notify.wait_for("STOPPING=1")


def test_restart_then_a_spot_notice_still_drains(agent, imds_sim, hook, tmp_path, fake):
    a = agent(fake.toml())
    a.wait_ready()
    a.signal(signal.SIGTERM)  # systemctl restart spot-agent: the stop half
    assert a.wait_exit() == 0
    assert kinds(hook[1]) == [], "a restart touched the workload"
    b = agent(fake.toml())
    b.wait_ready()
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    wait_file(hook[1], contains="spot-interruption")
    status = drained(tmp_path)
    assert status["drain"]["kind"] == "spot-interruption" and status["drain"]["ok"] is True
    # The poweroff that follows the notice is the same termination: no second drain.
    fake.set_state("stopping")
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    assert b.log().count("drain plan for") == 1, b.log()


def test_reload_then_the_termination_drain_runs_the_new_hooks(agent, imds_sim, hook, tmp_path, fake):
    a = agent(fake.toml())
    a.wait_ready()
    other = tmp_path / "other.out"
    new_hook = tmp_path / "new.sh"
    new_hook.write_text(f"#!/bin/sh\necho $SPOT_AGENT_EVENT >> {other}\n")
    new_hook.chmod(0o755)
    with open(a.config_path) as fh:
        text = fh.read()
    with open(a.config_path, "w") as fh:
        fh.write(text.replace(hook[0], str(new_hook)) + '[drain.workload]\ncheckpoint_timeout = 7\n')
    a.signal(signal.SIGHUP)
    wait_log(a, "reloaded")
    assert "needs a restart" not in a.log()
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    assert wait_file(str(other), contains="spot").strip() == "spot-interruption"
    status = drained(tmp_path)
    assert status["drain"]["kind"] == "spot-interruption"
    assert not os.path.exists(hook[1]), "the drain ran the hooks of the old config"
    assert "2. wait          7.0 s  planned  until the hooks exit" in a.log()  # the new budget


def test_reload_names_what_needs_a_restart_and_keeps_it(agent, tmp_path, fake):
    a = agent(fake.toml())
    a.wait_ready()
    with open(a.config_path) as fh:
        text = fh.read()
    with open(a.config_path, "w") as fh:
        fh.write(text.replace("timeout = 10\n", "timeout = 11\n").replace('region = "us-east-1"', 'region = "eu-west-1"')
                 .replace("poll_interval = 0.2", "poll_interval = 0.3"))
    a.signal(signal.SIGHUP)
    wait_log(a, "reloaded")
    line = next(l for l in a.log().splitlines() if "reloaded" in l)
    assert "hooks" in line and "imds.poll_interval" in line
    assert "needs a restart, old value kept: aws.region" in line


def test_an_asg_terminated_after_the_spot_notice_runs_the_asg_hooks_once(agent, imds_sim, hook, tmp_path, fake):
    a = agent(fake.toml())
    a.wait_ready()
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    wait_file(hook[1], contains="spot-interruption")
    drained(tmp_path)
    imds_sim.control("asg", {"state": "Terminated"})  # what AWS does a few seconds later
    wait_file(hook[1], contains="asg-termination")
    time.sleep(1.0)
    assert kinds(hook[1]) == ["spot-interruption", "asg-termination"]
    assert a.log().count("drain plan for") == 1, "the drain itself runs once"
    # A restarted agent (same boot, both notices still up) runs neither kind's hooks again.
    a.proc.kill()
    a.proc.wait()
    b = agent(fake.toml())
    b.wait_ready()
    time.sleep(1.5)
    assert kinds(hook[1]) == ["spot-interruption", "asg-termination"]


def test_a_later_notice_with_an_earlier_deadline_replans_the_running_drain(agent, imds_sim, hook, tmp_path, fake):
    a = agent(fake.toml() + f'[drain]\nmargin = 2\n[drain.workload]\nmarker = "{tmp_path}/never"\n'
              'wait = "marker"\ncheckpoint_timeout = 300\n')
    a.wait_ready()
    imds_sim.control("scheduled", {"code": "instance-stop", "in": 400})
    wait_log(a, "drain step notify")  # the drain is waiting for a marker that never comes
    spot_at = time.time()
    imds_sim.control("spot", {"action": "terminate", "in": 20})
    status = drained(tmp_path, timeout=30)
    finished = time.time()
    assert finished < spot_at + 20, "the drain outlived the spot notice's deadline"
    assert "re-planned" in a.log()
    wait = next(s for s in status["drain"]["steps"] if s["name"] == "wait")
    assert wait["state"] == "cut" and wait["seconds"] < 20
    assert "spot-interruption" in kinds(hook[1])


def test_a_stop_notice_on_the_next_boot_drains_again(agent, imds_sim, hook, tmp_path, fake):
    a = agent(fake.toml())
    a.wait_ready()
    imds_sim.control("spot", {"action": "stop", "in": 120})
    wait_file(hook[1], contains="spot-interruption")
    drained(tmp_path)
    a.proc.kill()  # the instance stopped ...
    a.proc.wait()
    os.unlink(status_file(tmp_path))
    fake.set_boot("boot-2")  # ... and was started again: its next `stop` notice has the same key
    b = agent(fake.toml())
    b.wait_ready()
    end = time.monotonic() + 10
    while kinds(hook[1]).count("spot-interruption") < 2 and time.monotonic() < end:
        time.sleep(0.05)
    assert kinds(hook[1]) == ["spot-interruption", "spot-interruption"]
    assert drained(tmp_path)["drain"]["kind"] == "spot-interruption"


def test_the_drain_guard_drains_only_at_shutdown_and_once(agent, hook, tmp_path, fake):
    a = agent(fake.toml())
    a.wait_ready()
    # Stopping the guard by hand (or a package removal) is not a shutdown.
    r = cli("drain", "--shutdown", "--config", a.config_path)
    assert r.returncode == 0 and "not draining" in r.stdout and "not shutting down" in r.stdout
    assert kinds(hook[1]) == []
    fake.set_state("stopping")
    r = cli("drain", "--shutdown", "--config", a.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "drain shutdown done" in r.stdout
    assert kinds(hook[1]) == ["shutdown"]  # it returned after the drain: the workload may stop now
    assert a.proc.poll() is None, "the agent keeps running until its own SIGTERM"
    a.signal(signal.SIGTERM)  # later in the shutdown, after the workloads stopped
    assert a.wait_exit() == 0
    assert kinds(hook[1]) == ["shutdown"] and a.log().count("drain plan for") == 1


def test_the_guard_with_no_daemon_running_lets_the_shutdown_go_on(tmp_path, fake, agent):
    a = agent(fake.toml())
    a.wait_ready()
    a.proc.kill()
    a.proc.wait()
    r = cli("drain", "--shutdown", "--config", a.config_path)
    assert r.returncode == 0 and "nothing to drain" in r.stdout


@pytest.fixture
def frozen_fs(loopdev, scratch_dir):
    dev = loopdev(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = os.path.join(scratch_dir, "ckpt")
    os.makedirs(mnt)
    subprocess.run(["mount", dev, mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True)
        subprocess.run(["umount", mnt], capture_output=True)


def freeze(mnt: str, state_dir: str, boot: str) -> None:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "state.json")
    data = {}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
    data.setdefault("drain", {})["frozen"] = {mnt: {"volume": "ckpt", "since": time.time(), "boot_id": boot}}
    with open(path, "w") as fh:
        json.dump(data, fh)
    subprocess.run(["fsfreeze", "-f", mnt], check=True)


def writer(mnt: str) -> threading.Thread:
    def write() -> None:
        with open(os.path.join(mnt, "after-thaw"), "w") as fh:
            fh.write("x")
            fh.flush()
            os.fsync(fh.fileno())

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def test_a_frozen_filesystem_is_thawed_while_imds_is_down(tmp_path, fake, hook, frozen_fs):
    freeze(frozen_fs, str(tmp_path / "state"), "boot-1")
    stuck = writer(frozen_fs)
    stuck.join(0.5)
    assert stuck.is_alive(), "the filesystem is not frozen"
    # IMDS never answers (a closed port): the identity call retries forever.
    a = AgentProcess(tmp_path, config(tmp_path, "http://127.0.0.1:9", hook[0], fake.toml()))
    try:
        stuck.join(10)
        assert not stuck.is_alive(), "the writer is still blocked: the agent did not thaw while IMDS was down:\n" + a.log()
        wait_log(a, "thawed " + frozen_fs)
        wait_log(a, "IMDS not answering")
        assert not a.notify.wait_for("READY=1", 0.1)
    finally:
        a.stop()
    # The unit's ExecStopPost= does the same after an agent is SIGKILLed inside the freeze window.
    freeze(frozen_fs, str(tmp_path / "state"), "boot-1")
    stuck = writer(frozen_fs)
    stuck.join(0.3)
    assert stuck.is_alive()
    r = cli("thaw", "--config", a.config_path)
    assert r.returncode == 0 and f"thawed {frozen_fs}" in r.stdout, r.stdout + r.stderr
    stuck.join(5)
    assert not stuck.is_alive()
    # A record from an earlier boot is dropped, not thawed (a reboot thawed everything).
    fake.set_boot("boot-2")
    freeze(frozen_fs, str(tmp_path / "state"), "boot-1")
    try:
        r = cli("thaw", "--config", a.config_path)
        assert r.returncode == 0 and "thawed" not in r.stdout
    finally:
        subprocess.run(["fsfreeze", "-u", frozen_fs], capture_output=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_reload_rebinds_the_metrics_listener_or_keeps_the_old_one(imds_sim, hook, tmp_path, fake):
    old, new = free_port(), free_port()
    text = config(tmp_path, imds_sim.url, hook[0], fake.toml()).replace(
        "[metrics]\nenabled = false", f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{old}"')
    b = AgentProcess(tmp_path, text)
    try:
        b.wait_ready()
        assert answers(old)
        with open(b.config_path, "w") as fh:
            fh.write(text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}"))
        b.signal(signal.SIGHUP)
        wait_log(b, "reloaded")
        assert answers(new) and not answers(old)
        assert "metrics.listen" in next(l for l in b.log().splitlines() if "reloaded" in l)
        # A listener that cannot bind (the port is taken): the old one stays, and the log says so.
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            with open(b.config_path, "w") as fh:
                fh.write(text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{taken.getsockname()[1]}"))
            b.signal(signal.SIGHUP)
            wait_log(b, "needs a restart, old value kept: metrics")
            assert answers(new)
        finally:
            taken.close()
    finally:
        b.stop()
