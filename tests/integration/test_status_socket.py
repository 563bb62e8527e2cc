"""The status socket and its client over a real Unix socket; the state-file fallback with real pids."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from agent.state import atomic_write
from agent.status_socket import (DaemonNotRunning, StatusServer, fetch_status, pid_is_writer, query_socket,
                                 read_status)


def sample_status(pid: int = 0, started_at: float = 0.0) -> dict:
    now = time.time()
    return {
        "state": "ready", "pid": pid or os.getpid(), "version": "0.1.0", "started_at": started_at or now,
        "updated_at": now, "ready": True, "status_line": "watching IMDS",
        "instance": {"instance_id": "i-0abc", "instance_type": "m5.large", "availability_zone": "us-east-1a",
                     "region": "us-east-1", "life_cycle": "spot"},
        "imds": {"up": True, "disabled": False, "last_success": now},
        "notices": [], "deadline": None, "mounts": [], "datasets": [],
        "last_checkpoint": None, "last_snapshot": None, "drain": {"state": "none", "steps": []},
    }


@pytest.fixture
def paths(tmp_path):
    return str(tmp_path / "run" / "agent.sock"), str(tmp_path / "state" / "status.json")


def test_socket_is_mode_0600_and_round_trips_json(paths) -> None:
    sock_path, state_file = paths
    status = sample_status()
    status["notices"] = [{"kind": "spot-interruption", "action": "terminate", "deadline": 1.5e9, "deadline_iso": "x", "detected_at": 1.4e9}]
    with StatusServer(sock_path, lambda: status):
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        got, source = fetch_status(sock_path, state_file)
        assert got == status and source == "socket"
        assert read_status(sock_path, state_file) == status
    assert not os.path.exists(sock_path), "stop() removes the socket"


def test_the_provider_is_asked_on_every_request(paths) -> None:
    sock_path, state_file = paths
    calls = []

    def provider() -> dict:
        calls.append(1)
        return {"state": "ready", "n": len(calls)}

    with StatusServer(sock_path, provider):
        assert [query_socket(sock_path)["n"] for _ in range(3)] == [1, 2, 3]


def test_a_failing_provider_is_reported_not_hung(paths) -> None:
    sock_path, state_file = paths

    def provider() -> dict:
        raise RuntimeError("boom")

    with StatusServer(sock_path, provider):
        with pytest.raises(ValueError, match="status provider failed: boom"):
            query_socket(sock_path)
        # The server survives and the client falls back: this process is alive, so the file counts.
        atomic_write(state_file, json.dumps(sample_status()).encode())
        got, source = fetch_status(sock_path, state_file)
        assert source == "state-file" and got["state"] == "ready"


def test_unknown_requests_and_silent_clients(paths) -> None:
    sock_path, _ = paths
    with StatusServer(sock_path, lambda: {"state": "ready"}):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"reboot\n")
        answer = json.loads(s.makefile("rb").read())
        s.close()
        assert "unknown request" in answer["error"]
        # A client that connects and closes without a word does not break the server.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.close()
        assert query_socket(sock_path) == {"state": "ready"}


def test_a_stale_socket_from_a_crash_is_replaced(paths) -> None:
    sock_path, _ = paths
    os.makedirs(os.path.dirname(sock_path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens
    with StatusServer(sock_path, lambda: {"state": "ready"}):
        assert query_socket(sock_path) == {"state": "ready"}


def test_a_live_socket_is_not_stolen(paths) -> None:
    sock_path, _ = paths
    with StatusServer(sock_path, lambda: {"state": "first"}):
        with pytest.raises(OSError, match="another spot-agent is answering"):
            StatusServer(sock_path, lambda: {"state": "second"}).start()
        assert query_socket(sock_path) == {"state": "first"}


def test_a_regular_file_at_the_socket_path_is_refused(paths) -> None:
    sock_path, _ = paths
    os.makedirs(os.path.dirname(sock_path))
    with open(sock_path, "w") as fh:
        fh.write("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        StatusServer(sock_path, dict).start()
    assert open(sock_path).read() == "not a socket"


def test_not_running_without_socket_or_state_file(paths) -> None:
    sock_path, state_file = paths
    with pytest.raises(DaemonNotRunning, match="no such socket.*no state file") as info:
        read_status(sock_path, state_file, timeout=0.5)
    assert info.value.last is None


def test_state_file_of_a_live_daemon_is_the_fallback(paths) -> None:
    sock_path, state_file = paths
    status = sample_status()
    atomic_write(state_file, json.dumps(status).encode())
    got, source = fetch_status(sock_path, state_file, timeout=0.5)
    assert source == "state-file" and got == status


def test_state_file_of_a_dead_daemon_means_not_running(paths) -> None:
    sock_path, state_file = paths
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    status = sample_status(pid=proc.pid)
    status["state"] = "drained"
    atomic_write(state_file, json.dumps(status).encode())
    with pytest.raises(DaemonNotRunning, match=f"pid {proc.pid} from .* is gone") as info:
        read_status(sock_path, state_file, timeout=0.5)
    assert info.value.last == status


def test_a_reused_pid_is_not_the_daemon(paths) -> None:
    sock_path, state_file = paths
    # The pid is alive, but that process was created after the daemon that wrote the file started:
    # the pid was reused, the daemon is gone.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = sample_status(pid=child.pid, started_at=time.time() - 86400)  # written by an older process
        atomic_write(state_file, json.dumps(stale).encode())
        with pytest.raises(DaemonNotRunning):
            read_status(sock_path, state_file, timeout=0.5)
        assert pid_is_writer(child.pid, time.time())
    finally:
        child.kill()
        child.wait(timeout=30)
    assert not pid_is_writer(child.pid, time.time())
    assert not pid_is_writer("12", None) and not pid_is_writer(-1, None)


def test_a_torn_state_file_counts_as_absent(paths) -> None:
    sock_path, state_file = paths
    os.makedirs(os.path.dirname(state_file))
    with open(state_file, "w") as fh:
        fh.write('{"state": "rea')
    with pytest.raises(DaemonNotRunning, match="no state file"):
        read_status(sock_path, state_file, timeout=0.5)


def test_a_socket_that_never_answers_times_out(paths) -> None:
    sock_path, state_file = paths
    os.makedirs(os.path.dirname(sock_path))
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(sock_path)
    mute.listen(1)  # accepts into the backlog, never answers
    try:
        with pytest.raises(DaemonNotRunning, match="timed out"):
            read_status(sock_path, state_file, timeout=0.3)
    finally:
        mute.close()


def test_a_client_that_never_finishes_its_request_still_gets_the_status(paths) -> None:
    sock_path, _ = paths
    with StatusServer(sock_path, lambda: {"state": "ready"}):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sock_path)
        # Sends nothing at all: after the request timeout the server answers the default request.
        answer = json.loads(s.makefile("rb").read())
        s.close()
        assert answer == {"state": "ready"}
        assert query_socket(sock_path) == {"state": "ready"}
