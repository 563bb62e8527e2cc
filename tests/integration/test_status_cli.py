"""`spot-agent status` as a real subprocess against a real status socket and state file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from agent.state import atomic_write
from agent.status_socket import StatusServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def setup(tmp_path):
    sock_path = tmp_path / "run" / "agent.sock"
    state_dir = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{state_dir}"\nsocket = "{sock_path}"\n')
    return str(config), str(sock_path), str(state_dir / "status.json")


def status_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "status", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def daemon_status() -> dict:
    now = time.time()
    return {
        "state": "draining", "pid": os.getpid(), "version": "0.1.0", "started_at": now, "updated_at": now,
        "ready": True, "status_line": "uploading checkpoint ckpt",
        "instance": {"instance_id": "i-0abc", "instance_type": "p4d.24xlarge", "availability_zone": "us-west-2b",
                     "region": "us-west-2", "life_cycle": "spot"},
        "imds": {"up": True, "disabled": False, "last_success": now},
        "notices": [{"kind": "spot-interruption", "action": "terminate", "deadline": now + 90,
                     "deadline_iso": "whatever", "detected_at": now - 30}],
        "deadline": now + 90,
        "mounts": [{"name": "scratch", "volume_id": "vol-0123456789abcdef0", "device": "/dev/nvme2n1",
                    "mountpoint": "/scratch", "fs": "ext4"}],
        "datasets": [{"source": "s3://data/wiki/", "dest": "/scratch/wiki", "state": "done", "bytes_done": 2048,
                      "bytes_total": 2048, "files_done": 2, "files_total": 2, "errors": 0}],
        "last_checkpoint": {"dir": "/scratch/ckpt", "s3": "s3://data/ckpt/", "checkpoint_id": "000042",
                            "committed_at": now - 60},
        "last_snapshot": {"volume": "scratch", "snapshot_id": "snap-0fedcba9876543210", "created_at": now - 3},
        "drain": {"state": "running", "steps": [{"name": "snapshot", "state": "done", "seconds": 2.5, "reason": ""}]},
    }


def test_not_running_exits_3_and_says_so(setup) -> None:
    config, sock_path, state_file = setup
    result = status_cli("--config", config)
    assert result.returncode == 3, result
    assert result.stdout.startswith("spot-agent is not running:")
    assert sock_path in result.stdout and "no state file" in result.stdout
    result = status_cli("--config", config, "--json")
    assert result.returncode == 3
    doc = json.loads(result.stdout)
    assert doc["running"] is False and doc["last"] is None and sock_path in doc["reason"]


def test_json_matches_the_daemons_status(setup) -> None:
    config, sock_path, state_file = setup
    status = daemon_status()
    with StatusServer(sock_path, lambda: status):
        result = status_cli("--config", config, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == status


def test_human_output_shows_state_notices_mounts_datasets_checkpoint_snapshot(setup) -> None:
    config, sock_path, state_file = setup
    status = daemon_status()
    with StatusServer(sock_path, lambda: status):
        result = status_cli("--config", config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("DRAINING", "uploading checkpoint ckpt", "spot-interruption terminate", "deadline",
                     "vol-0123456789abcdef0", "-> /scratch (ext4)", "s3://data/wiki/ -> /scratch/wiki: done 100%",
                     "000042", "snap-0fedcba9876543210 of scratch", "snapshot               done 2.5s"):
        assert expected in out, f"{expected!r} not in:\n{out}"


def test_falls_back_to_the_state_file_of_a_live_daemon(setup) -> None:
    config, sock_path, state_file = setup
    status = daemon_status()  # written by this (live) process
    atomic_write(state_file, json.dumps(status).encode())
    result = status_cli("--config", config)
    assert result.returncode == 0, result.stderr
    assert "DRAINING" in result.stdout and "from the state file" in result.stdout
    result = status_cli("--config", config, "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == status


def test_a_finished_daemon_shows_its_last_state_and_exits_3(setup) -> None:
    config, sock_path, state_file = setup
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    status = daemon_status()
    status.update(state="drained", pid=gone.pid, status_line="drain done; waiting for termination")
    atomic_write(state_file, json.dumps(status).encode())
    result = status_cli("--config", config)
    assert result.returncode == 3
    assert "not running" in result.stdout and "last known state: drained" in result.stdout
    assert "waiting for termination" in result.stdout
    result = status_cli("--config", config, "--json")
    assert result.returncode == 3 and json.loads(result.stdout)["last"]["state"] == "drained"


def test_socket_and_state_file_flags_override_the_config(setup, tmp_path) -> None:
    config, _, _ = setup
    other = str(tmp_path / "elsewhere.sock")
    with StatusServer(other, lambda: {"state": "ready", "pid": 1}):
        result = status_cli("--config", config, "--socket", other, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["state"] == "ready"


def test_a_bad_config_is_exit_2_with_the_key_path(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nsocket = "relative.sock"\n')
    result = status_cli("--config", str(bad))
    assert result.returncode == 2
    assert "agent.socket" in result.stderr and "absolute" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_explicit_config_is_exit_2(tmp_path) -> None:
    result = status_cli("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "cannot read config" in result.stderr
