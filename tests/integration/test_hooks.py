"""Hooks: environment, output to the log, timeouts that kill the whole process group, users."""

import logging
import os
import time

from agent.config import HookSection
from agent.events import SPOT_INTERRUPTION, Event
from agent.hooks import run_hook, run_hooks

EVENT = Event(SPOT_INTERRUPTION, "terminate", 1796000000.0, "spot:terminate", 1795999880.0, {})


def script(tmp_path, name, body):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[1][0] != "Z"


def test_environment_and_output_logged(tmp_path, caplog):
    out = tmp_path / "env"
    cmd = script(tmp_path, "h.sh", f'env > {out}\necho "saving step 7"\n')
    caplog.set_level(logging.INFO, logger="agent.hooks")
    (r,) = run_hooks([HookSection(on=[SPOT_INTERRUPTION], command=[cmd, "--fast"], env={"EXTRA": "1"})], EVENT)
    assert r.ok and r.returncode == 0
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert env["SPOT_AGENT_EVENT"] == "spot-interruption"
    assert env["SPOT_AGENT_ACTION"] == "terminate"
    assert env["SPOT_AGENT_DEADLINE"] == "1796000000"
    assert env["SPOT_AGENT_DEADLINE_ISO"] == "2026-11-30T00:53:20Z"
    assert env["EXTRA"] == "1"
    assert any("saving step 7" in rec.getMessage() for rec in caplog.records)


def test_only_matching_hooks_run(tmp_path):
    marker = tmp_path / "ran"
    cmd = script(tmp_path, "h.sh", f"touch {marker}\n")
    assert run_hooks([HookSection(on=["shutdown"], command=[cmd])], EVENT) == []
    assert not marker.exists()


def test_timeout_kills_the_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    cmd = script(tmp_path, "slow.sh", f"sleep 300 &\necho $! > {pidfile}\nsleep 300\n")
    started = time.monotonic()
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd], timeout=0.5), 0, EVENT)
    assert r.timed_out and r.returncode is None and not r.ok
    assert time.monotonic() - started < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the hook's child outlived the timeout"


def test_budget_caps_the_timeout(tmp_path):
    cmd = script(tmp_path, "slow.sh", "sleep 30\n")
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd], timeout=60), 0, EVENT, budget=0.3)
    assert r.timed_out and r.seconds < 5


def test_failure_and_missing_executable(tmp_path):
    cmd = script(tmp_path, "fail.sh", "exit 3\n")
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd]), 0, EVENT)
    assert r.returncode == 3 and not r.ok
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[str(tmp_path / "nope")]), 2, EVENT)
    assert not r.ok and r.error.startswith("hooks[2].command:")


def test_runs_as_user():
    import pathlib
    import shutil
    import tempfile

    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="spot-agent-hook-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)  # pytest's tmp dirs are root-only; "nobody" must reach the script
    # ... and write its answer, but not next to the script: a hook in a writable directory is refused.
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path / "out", 0o777)
    out = tmp_path / "out" / "uid"
    cmd = script(tmp_path, "who.sh", f"id -u > {out}\n")
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd], user="nobody"), 0, EVENT)
    assert r.ok, r
    assert out.read_text().strip() == str(__import__("pwd").getpwnam("nobody").pw_uid)
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd], user="no-such-user-x"), 0, EVENT)
    assert "no such user" in r.error
    shutil.rmtree(tmp_path)


def test_output_that_is_not_utf8_does_not_hang_the_hook(tmp_path, caplog):
    """A strict decoder died on the first bad byte, nobody read the pipe any more, and the hook blocked
    writing until its timeout, inside the drain. Decoded with replacement, it runs to the end."""
    cmd = script(tmp_path, "bin.sh", "printf 'bad \\377 byte\\n'\nhead -c 300000 /dev/zero | tr '\\0' a\necho\n"
                                     "echo 'after the bad byte'\n")
    caplog.set_level(logging.INFO, logger="agent.hooks")
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd], timeout=20), 0, EVENT)
    assert r.ok and not r.timed_out, r
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("bad \ufffd byte" in m for m in messages)
    assert any("after the bad byte" in m for m in messages)


def test_nul_in_an_event_field_still_runs_the_hook_with_it_escaped(tmp_path):
    """exec refuses a NUL in the environment: the hook did not run at all (and nothing said so)."""
    from agent.events import SCHEDULED_MAINTENANCE

    out = tmp_path / "env"
    cmd = script(tmp_path, "h.sh", f'printf "%s" "$SPOT_AGENT_ACTION" > {out}\n')
    event = Event(SCHEDULED_MAINTENANCE, "instance-stop\x00evil", None, "scheduled:e1", 1795999880.0, {})
    (r,) = run_hooks([HookSection(on=[SCHEDULED_MAINTENANCE], command=[cmd])], event)
    assert r.ok, r
    assert out.read_text() == "instance-stop\\x00evil"


def test_nul_in_argv_is_a_reported_failure_not_a_silent_one(tmp_path):
    """The schema refuses a NUL in the config; a HookSection built in code must still fail loudly."""
    cmd = script(tmp_path, "h.sh", "exit 0\n")
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd, "a\x00b"]), 4, EVENT)
    assert not r.ok and r.error.startswith("hooks[4].command:") and "null" in r.error


def test_a_deadline_no_date_can_hold_still_runs_the_hook(tmp_path):
    """deadline_iso raised for a year past 9999 inside the hook thread: the hook silently did not run."""
    out = tmp_path / "iso"
    cmd = script(tmp_path, "h.sh", f'printf "%s" "$SPOT_AGENT_DEADLINE_ISO" > {out}\n')
    event = Event(SPOT_INTERRUPTION, "terminate", 1e15, "spot:terminate", 1795999880.0, {})
    r = run_hook(HookSection(on=[SPOT_INTERRUPTION], command=[cmd]), 0, event)
    assert r.ok, r
    assert out.read_text() == ""
