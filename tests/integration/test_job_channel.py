"""The files between the agent and the job on a real filesystem, with the job as a real unprivileged
uid: the notice file, the env file, the helper's acknowledgement (and hostile ones), and the commit
rule on step directories (a half-written step never counts).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from agent.config import parse
from agent.drain.workload import Workload, committed_step
from agent.events import Event
from agent.runner import Runner

pytestmark = pytest.mark.root
HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "agent", "jobhelper")
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # a Python the unprivileged uid can run (the venvs live under /root)


@pytest.fixture
def tmp_path():
    """A test directory the unprivileged job can reach (pytest's own is under a 0700 directory)."""
    import pathlib

    d = tempfile.mkdtemp(prefix="spot-agent-job-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def workload(tmp_path, text: str = "") -> Workload:
    run = tmp_path / "run"
    run.mkdir(mode=0o755, exist_ok=True)
    c = parse(f'[agent]\nsocket = "{run}/agent.sock"\n[drain.workload]\n{text}')
    return Workload(c.drain.workload, c.hooks, Runner(), socket_path=c.agent.socket)


def as_nobody(code: str, env: dict) -> subprocess.CompletedProcess:
    def demote() -> None:
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run([SYSTEM_PYTHON, "-c", code], env={"PYTHONPATH": HELPER, **env}, preexec_fn=demote,
                          capture_output=True, text=True, timeout=30)


def test_notice_file_env_file_and_ack_from_an_unprivileged_job(tmp_path):
    os.chmod(tmp_path, 0o755)
    wl = workload(tmp_path, 'profile = "torchrun"\n')
    assert wl.prepare() == []
    run = tmp_path / "run"
    env_text = (run / "workload.env").read_text()
    assert 'TORCH_ELASTIC_SHUTDOWN_TIMEOUT="61"' in env_text and f'PYTHONPATH="{HELPER}"' in env_text
    ack_dir = run / "ack"
    assert stat.S_IMODE(os.lstat(ack_dir).st_mode) == 0o1733 and os.lstat(ack_dir).st_uid == 0

    ev = Event("spot-interruption", "terminate", time.time() + 120, "spot:7", time.time())
    assert wl.publish(ev, ev.deadline, time.time() + 60) is None
    st = os.stat(run / "notice.json")
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0
    env = {"SPOT_AGENT_NOTICE_FILE": str(run / "notice.json"), "SPOT_AGENT_ACK_DIR": str(ack_dir)}
    out = as_nobody("import spot_agent_job as s; n = s.notice(); print(n['kind'], n['key'], round(s.seconds_left()));"
                    "print(s.checkpoint_saved('/mnt/ckpt/step-3', step=3))", env)
    assert out.returncode == 0, out.stderr
    kind, key, left, saved = out.stdout.split()
    assert (kind, key, saved) == ("spot-interruption", "spot:7", "True") and 100 < int(left) <= 120
    acks = wl.channel.acks("spot:7", time.time() - 10, job_uid=NOBODY)
    assert [(a.path, a.step, a.uid) for a in acks] == [("/mnt/ckpt/step-3", 3, NOBODY)]
    # the same file from a uid that is not the workload's is refused
    assert wl.channel.acks("spot:7", time.time() - 10, job_uid=1234) == []
    assert any("not the workload's uid" in r for r in wl.channel.refused)
    # an ack for another notice does not count; withdrawing removes the file
    assert wl.channel.acks("spot:8", time.time() - 10) == []
    wl.withdraw()
    assert not (run / "notice.json").exists()
    out = as_nobody("import spot_agent_job as s; print(s.notice(), s.wait_for_notice(0.2), s.seconds_left())", env)
    assert out.stdout.split() == ["None", "None", "None"], out.stderr


def test_hostile_acks_are_refused(tmp_path):
    os.chmod(tmp_path, 0o755)
    wl = workload(tmp_path)
    wl.prepare()
    ack_dir = tmp_path / "run" / "ack"
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"format": 1, "path": "/x", "time": time.time(), "pid": 1}))
    os.symlink(secret, ack_dir / "ack-0.json")  # a link: never followed
    fifo = ack_dir / f"ack-{NOBODY}.json"
    os.mkfifo(fifo)  # would block a plain open()
    os.chown(fifo, NOBODY, NOBODY, follow_symlinks=False)
    liar = ack_dir / "ack-1000.json"  # named for uid 1000, owned by nobody
    liar.write_text(json.dumps({"format": 1, "path": "/x", "time": time.time(), "pid": 1}))
    os.chown(liar, NOBODY, NOBODY)
    big = ack_dir / "ack-1001.json"
    big.write_text(" " * 5000)
    os.chown(big, 1001, 1001)
    t0 = time.monotonic()
    assert wl.channel.acks("", time.time() - 10) == []
    assert time.monotonic() - t0 < 5
    refused = " | ".join(wl.channel.refused)
    assert "ack-0.json: cannot open" in refused and "not a regular file" in refused
    assert "owned by uid 65534, not 1000" in refused and "larger than" in refused
    # a new notice clears what an earlier one left (links removed, never followed)
    wl.publish(Event("manual", "drain", None, "m:1", time.time()), None)
    assert os.listdir(ack_dir) == [] and secret.exists()


def test_a_notice_dir_others_can_write_is_refused(tmp_path):
    os.chmod(tmp_path, 0o755)
    wl = workload(tmp_path)
    os.chmod(tmp_path / "run", 0o777)
    problems = wl.prepare()
    assert any("writable by group or others" in p for p in problems)
    assert "writable by group or others" in (wl.publish(Event("manual", "drain", None, "m", time.time()), None) or "")
    assert not (tmp_path / "run" / "notice.json").exists()


def _step(root, name: str, commit: bool = True, files: int = 2):
    d = root / name
    d.mkdir()
    for i in range(files):
        (d / f"__{i}_0.distcp").write_bytes(os.urandom(64))
    if commit:
        (d / ".metadata").write_bytes(b"meta")
    return d


def test_commit_rule_on_step_directories(tmp_path):
    since = time.time()
    ck = tmp_path / "ckpt"
    ck.mkdir()
    old = _step(ck, "step-1")
    os.utime(old / ".metadata", (since - 100, since - 100))  # committed before the notice
    path, why = committed_step(str(ck), ".metadata", "", since, 0.0, time.time())
    assert path is None and "since the notice" in why
    _step(ck, "step-2", commit=False)  # half written: no .metadata yet
    assert committed_step(str(ck), ".metadata", "", since, 0.0, time.time())[0] is None
    _step(ck, "step-3")
    path, why = committed_step(str(ck), ".metadata", "", since, 5.0, time.time())
    assert path is None and "files changed" in why  # not settled yet
    assert committed_step(str(ck), ".metadata", "", since, 5.0, time.time() + 6)[0] == str(ck / "step-3")
    # a symlinked step directory or commit file never counts
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / ".metadata").write_bytes(b"x")
    os.symlink(other, ck / "step-9")
    hf = _step(ck, "step-4", commit=False)
    os.symlink(other / ".metadata", hf / ".metadata")
    assert committed_step(str(ck), ".metadata", "", since, 0.0, time.time() + 6)[0] == str(ck / "step-3")
    # an incomplete marker (the Trainer's JIT sentinel) holds a step back
    st = _step(ck, "checkpoint-5")
    (st / "checkpoint-is-incomplete.txt").write_text("in progress")
    path, why = committed_step(str(ck), ".metadata", "checkpoint-is-incomplete.txt", since, 0.0, time.time() + 6)
    assert path == str(ck / "step-3") or "incomplete" in why


def test_wait_any_ends_on_the_commit(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    wl = workload(tmp_path, f'profile = "torchrun"\ncommit_dir = "{ck}"\ncommit_settle = 0.2\n')
    wl.prepare()
    since = time.time()
    _step(ck, "step-12")
    res = wl.wait(wl.conditions("spot-interruption"), 5.0, since, None)
    assert res.met and res.checkpoint == str(ck / "step-12") and res.notes[0] == "commit done"
    # nothing commits: the budget runs out and says what it was waiting for
    res = wl.wait(["commit"], 0.5, time.time() + 10, None)
    assert not res.met and res.pending == ["commit"]


def test_a_step_committed_just_before_the_notice_is_not_the_answer(tmp_path):
    from agent.drain.workload import existing_commits

    ck = tmp_path / "ckpt"
    ck.mkdir()
    since = time.time()
    _step(ck, "step-5")  # within the mtime slack of the notice, but already there when told
    before = existing_commits(str(ck), ".metadata")
    assert before == {str(ck / "step-5"): os.stat(ck / "step-5" / ".metadata").st_mtime_ns}
    assert committed_step(str(ck), ".metadata", "", since, 0.0, time.time() + 5, before)[0] is None
    _step(ck, "step-10")
    assert committed_step(str(ck), ".metadata", "", since, 0.0, time.time() + 5, before)[0] == str(ck / "step-10")


def test_an_ack_outside_the_checkpoint_dirs_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    ck = tmp_path / "ckpt"
    ck.mkdir()
    c = parse(f'[agent]\nsocket = "{run}/agent.sock"\n[drain.workload]\ncomplete = ["ack"]\n')
    wl = Workload(c.drain.workload, [], Runner(), socket_path=c.agent.socket, checkpoint_dirs=[str(ck)])
    wl.prepare()
    wl.publish(Event("manual", "drain", None, "m:2", time.time()), None)
    env = {"SPOT_AGENT_NOTICE_FILE": str(run / "notice.json"), "SPOT_AGENT_ACK_DIR": str(run / "ack")}
    out = as_nobody("import spot_agent_job as s; print(s.checkpoint_saved('/elsewhere/step-1'))", env)
    assert out.stdout.strip() == "True", out.stderr
    res = wl.wait(["ack"], 5.0, time.time() - 5, None)
    assert res.met and res.checkpoint == "/elsewhere/step-1"
    assert any("outside the checkpoint dirs" in n for n in res.notes)
