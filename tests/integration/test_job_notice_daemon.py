"""The notice where a job can see it, from the real daemon against the IMDS simulator: notice.json
appears for a scheduled event that is not due yet (not terminal) and disappears when the event is
cancelled; a spot notice publishes a terminal one before the workload's signal; the status socket's
``notice`` request and ``status`` answer with the same document."""

import json
import os
import socket
import stat
import time

from tests.daemon_harness import AgentProcess, wait_file


def ask(path: str, request: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(request)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data)


def wait_for(pred, timeout=15.0, what=""):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def read_notice(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def test_notice_file_follows_the_notices(tmp_path, imds_sim):
    run = tmp_path / "run"
    marker = tmp_path / "job.out"
    job = tmp_path / "job.sh"
    # the "workload" is a hook here: it records whether notice.json was already there when it ran
    job.write_text(f'#!/bin/sh\ncat {run}/notice.json >> {marker} 2>/dev/null || echo missing >> {marker}\n')
    job.chmod(0o755)
    cfg = f'''
[agent]
state_dir = "{tmp_path}/state"
socket = "{run}/agent.sock"
[imds]
endpoint = "{imds_sim.url}"
poll_interval = 0.2
slow_poll_interval = 0.3
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
on = ["spot-interruption"]
command = ["{job}"]
timeout = 10
'''
    a = AgentProcess(tmp_path, cfg)
    try:
        a.wait_ready()
        path = str(run / "notice.json")
        assert read_notice(path) is None
        ev = imds_sim.control("scheduled", {"code": "instance-stop", "in": 3600})
        doc = wait_for(lambda: read_notice(path), what="the scheduled notice")
        assert doc["kind"] == "scheduled-maintenance" and doc["terminal"] is False
        assert 3500 < doc["seconds_left"] <= 3600
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == os.geteuid()
        assert ask(str(run / "agent.sock"), b"notice\n")["notice"] == doc
        assert ask(str(run / "agent.sock"), b"status\n")["notice"] == doc
        imds_sim.control("scheduled", {"event_id": ev["event_id"], "state": "canceled", "in": 3600})
        wait_for(lambda: not os.path.exists(path), what="the withdrawal")
        assert ask(str(run / "agent.sock"), b"notice\n") == {"notice": None}

        imds_sim.control("spot", {"action": "terminate", "in": 110})
        seen = wait_file(str(marker), timeout=20)
        doc = json.loads(seen.splitlines()[0])  # the hook saw the file: it was written before it ran
        assert doc["kind"] == "spot-interruption" and doc["terminal"] is True and doc["action"] == "terminate"
        assert 90 < doc["seconds_left"] <= 110 and doc["save_by"] <= doc["deadline"]
    finally:
        a.stop()
