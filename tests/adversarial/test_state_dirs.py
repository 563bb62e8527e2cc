"""The job user plants a state directory (or a socket directory) for the root agent: a drain record
there would be "resumed" as root. The agent must refuse to start, in one line naming the key, and
leave what it found untouched."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")

NOBODY = pwd.getpwnam("nobody")
PLANTED = {"drain": {"key": "spot:terminate", "steps": {"snapshot": "started"}, "boot_id": "planted"}}


def as_job(*argv: str) -> None:
    subprocess.run(list(argv), check=True, user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                   cwd="/", timeout=30)


@pytest.fixture
def base():
    path = tempfile.mkdtemp(prefix="spot-agent-adv-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def write_config(base: str, state_dir: str, socket_dir: str) -> str:
    path = os.path.join(base, "agent.toml")
    with open(path, "w") as fh:
        # IMDS on a closed port: an agent that did start would sit retrying, never exit 2 at once.
        fh.write(f'[agent]\nstate_dir = "{state_dir}"\nsocket = "{socket_dir}/agent.sock"\n'
                 '[imds]\nendpoint = "http://127.0.0.1:9"\n[metrics]\nenabled = false\n')
    os.chmod(path, 0o644)
    return path


def start(config: str, *args: str):
    try:
        return subprocess.run([sys.executable, "-m", "agent", *args, "--config", config],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the agent started on a directory the job controls (still running after 20 s)")


def plant(state_dir: str) -> str:
    """The job creates the directory and a drain record, with its own rights."""
    parent = os.path.dirname(state_dir)
    os.chmod(parent, 0o1777)  # a sticky, world-writable parent such as /tmp: the job can create there
    as_job("mkdir", "-m", "0755", state_dir)
    record = os.path.join(state_dir, "state.json")
    as_job("sh", "-c", f"printf '%s' '{json.dumps(PLANTED)}' > {record}")
    return record


@pytest.mark.parametrize("command", [["run"], ["drain", "--force"]])
def test_planted_state_dir_is_refused_and_left_alone(base, command):
    room = os.path.join(base, "shared")
    os.mkdir(room)
    state_dir = os.path.join(room, "state")
    record = plant(state_dir)
    before = os.stat(record)
    cfg = write_config(base, state_dir, os.path.join(base, "run"))
    r = start(cfg, *command)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0
    assert f"agent.state_dir: {state_dir} is owned by uid {NOBODY.pw_uid}, not root" in line
    after = os.stat(record)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)
    assert os.listdir(state_dir) == ["state.json"]


def test_state_dir_that_is_a_symlink_to_a_root_directory_is_refused(base):
    real = os.path.join(base, "real")
    os.mkdir(real, 0o700)
    link = os.path.join(base, "state")
    os.symlink(real, link)
    r = start(write_config(base, link, os.path.join(base, "run")), "run")
    assert r.returncode == 2 and f"agent.state_dir: {link} is a symlink" in r.stderr


def test_group_writable_state_dir_is_refused(base):
    state_dir = os.path.join(base, "state")
    os.mkdir(state_dir)
    os.chmod(state_dir, 0o770)
    r = start(write_config(base, state_dir, os.path.join(base, "run")), "run")
    assert r.returncode == 2 and f"agent.state_dir: {state_dir} is writable by group or others (mode 770)" in r.stderr


def test_socket_directory_owned_by_the_job_is_refused(base):
    sock_dir = os.path.join(base, "run")
    os.mkdir(sock_dir, 0o755)
    os.chown(sock_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    r = start(write_config(base, os.path.join(base, "state"), sock_dir), "run")
    assert r.returncode == 2 and f"agent.socket: {sock_dir} is owned by uid {NOBODY.pw_uid}" in r.stderr
    assert os.listdir(sock_dir) == []


def test_directories_root_creates_itself_are_fine(base):
    """Missing directories are created by the agent (0700 state, 0755 socket dir) and accepted, also
    below a sticky /tmp-like parent; a directory under a job-writable, non-sticky parent is not."""
    from agent.state import agent_dirs_problem, secure_dir
    from agent.trust import UntrustedPath

    state_dir = os.path.join(base, "a", "state")
    assert agent_dirs_problem(state_dir, os.path.join(base, "run", "agent.sock")) is None
    assert os.stat(state_dir).st_mode & 0o777 == 0o700
    tmp = tempfile.mkdtemp(dir="/tmp")  # a root-made tmp dir right below /tmp (1777)
    try:
        assert secure_dir(tmp) == tmp
    finally:
        os.rmdir(tmp)
    open_parent = os.path.join(base, "open")
    os.mkdir(open_parent)
    os.chmod(open_parent, 0o777)
    with pytest.raises(UntrustedPath) as exc:
        secure_dir(os.path.join(open_parent, "state"))
    assert f"directory {open_parent} is writable by group or others" in str(exc.value)
