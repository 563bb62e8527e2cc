"""How `spot-agent status` renders the daemon's status document, and the listen-address parser."""

from __future__ import annotations

import pytest

from agent.http_server import parse_listen
from agent.status_view import duration, render, render_not_running, size, when

NOW = 1_800_000_000.0


def full_status() -> dict:
    return {
        "state": "draining", "pid": 4321, "version": "0.1.0", "started_at": NOW - 3 * 3600 - 720,
        "updated_at": NOW - 1, "ready": True, "status_line": "snapshotting data (fsfreeze)",
        "instance": {"instance_id": "i-0123456789abcdef0", "instance_type": "g5.xlarge",
                     "availability_zone": "us-east-1a", "region": "us-east-1", "life_cycle": "spot"},
        "imds": {"up": True, "disabled": False, "last_success": NOW - 2},
        "notices": [{"kind": "spot-interruption", "action": "terminate", "deadline": NOW + 100,
                     "deadline_iso": "2027-01-15T08:01:40Z", "detected_at": NOW - 20}],
        "deadline": NOW + 100,
        "mounts": [{"name": "data", "volume_id": "vol-0abc1234def567890", "device": "/dev/nvme1n1",
                    "mountpoint": "/data", "fs": "xfs"}],
        "datasets": [{"source": "s3://bucket/imagenet/", "dest": "/data/imagenet", "state": "syncing",
                      "bytes_done": 3 * 2**30, "bytes_total": 4 * 2**30, "files_done": 1200,
                      "files_total": 3000, "errors": 2}],
        "last_checkpoint": {"dir": "/data/ckpt", "s3": "s3://bucket/ckpt/", "checkpoint_id": "step-1200",
                            "committed_at": NOW - 300},
        "last_snapshot": {"volume": "data", "snapshot_id": "snap-0123456789abcdef0", "created_at": NOW - 5},
        "drain": {"state": "running", "steps": [
            {"name": "notify-workload", "state": "done", "seconds": 0.25, "reason": ""},
            {"name": "snapshot", "state": "failed", "seconds": 1.5, "reason": "fsfreeze timed out"}]},
    }


def test_every_part_of_the_status_is_shown() -> None:
    text = render(full_status(), NOW)
    for expected in (
        "spot-agent 0.1.0", "pid 4321", "DRAINING", "up 3h 12m", "snapshotting data (fsfreeze)",
        "i-0123456789abcdef0", "g5.xlarge", "us-east-1a", "spot",
        "imds        up, last answer", "(2s ago)",
        "spot-interruption terminate: due", "(in 1m 40s)", "seen", "(20s ago)",
        "deadline", "vol-0abc1234def567890", "/dev/nvme1n1", "-> /data (xfs)",
        "s3://bucket/imagenet/ -> /data/imagenet: syncing 75%", "3.0 GiB of 4.0 GiB", "1200/3000 files", "2 errors",
        "step-1200", "committed", "(5m 00s ago)", "snap-0123456789abcdef0 of data",
        "drain       running", "notify-workload", "done 0.2s", "failed 1.5s (fsfreeze timed out)",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert "state file" not in text


def test_errors_and_the_drain_kind_are_shown() -> None:
    status = full_status()
    status["error"] = "required volume(s) failed: data: no such volume"
    status["drain"]["kind"] = "spot-interruption"
    text = render(status, NOW)
    assert "  error: required volume(s) failed: data: no such volume" in text
    assert "drain       running (spot-interruption)" in text


def test_a_status_from_the_state_file_says_so() -> None:
    text = render(full_status(), NOW, source="state-file")
    assert "from the state file, updated" in text and "(1s ago)" in text


def test_a_fresh_agent_with_nothing_yet() -> None:
    text = render({"state": "starting", "pid": 1, "version": "0.1.0", "last_checkpoint": None,
                   "last_snapshot": None, "notices": [], "mounts": [], "datasets": [],
                   "drain": {"state": "none", "steps": []}}, NOW)
    assert "STARTING" in text
    for expected in ("notices     none", "drain       none", "mounts      none", "datasets    none",
                     "checkpoint  none committed yet", "snapshot    none taken yet"):
        assert expected in text
    assert "deadline" not in text


def test_missing_or_wrongly_typed_fields_never_crash() -> None:
    text = render({"notices": [None, {"kind": "manual"}], "datasets": "nope", "mounts": [{}],
                   "imds": {"up": False}, "deadline": "soon", "drain": None, "started_at": "x"}, NOW)
    assert "manual: due no deadline given" in text
    assert "UNREACHABLE" in text
    assert render({}, NOW).startswith("spot-agent ?  pid ?  UNKNOWN")


def test_imds_disabled_is_spelled_out() -> None:
    text = render({"imds": {"up": True, "disabled": True, "last_success": 0}}, NOW)
    assert "DISABLED (403)" in text and "last answer never" in text


def test_dataset_done_without_totals_reads_100_percent() -> None:
    text = render({"datasets": [{"source": "s3://b/x/", "dest": "/d", "state": "done"}]}, NOW)
    assert "done 100%" in text and "1 error" not in text


def test_a_passed_deadline() -> None:
    text = render({"deadline": NOW - 30}, NOW)
    assert "passed 30s ago" in text


def test_not_running_shows_the_last_known_state() -> None:
    text = render_not_running("no answer on /run/x.sock", {"state": "drained", "pid": 9, "updated_at": NOW - 130,
                                                           "status_line": "drain done"}, NOW)
    assert text.startswith("spot-agent is not running: no answer on /run/x.sock")
    assert "last known state: drained (pid 9, updated" in text and "(2m 10s ago)" in text and "drain done" in text
    assert render_not_running("gone", None, NOW) == "spot-agent is not running: gone\n"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (61, "1m 01s"), (3600, "1h 00m"),
                                           (90061, "1d 1h"), (-100, "1m 40s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_sizes_and_times() -> None:
    assert size(512) == "512 B" and size(1536) == "1.5 KiB" and size(5 * 2**40) == "5.0 TiB" and size(None) == "?"
    assert when(0, NOW) == "never" and when(None, NOW) == "never"
    assert when(NOW + 5, NOW).endswith("(in 5s)")


@pytest.mark.parametrize("listen, expected", [
    ("0.0.0.0:8947", ("0.0.0.0", 8947)), ("127.0.0.1:0", ("127.0.0.1", 0)), (":8947", ("0.0.0.0", 8947)),
    ("[::]:8947", ("::", 8947)), ("[::1]:9", ("::1", 9)), ("localhost:80", ("localhost", 80)),
])
def test_parse_listen(listen: str, expected: tuple) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8947", "host:", "host:port", "1.2.3.4:70000"])
def test_parse_listen_refuses_bad_addresses(listen: str) -> None:
    with pytest.raises(ValueError, match=r"\[metrics\] listen must be HOST:PORT"):
        parse_listen(listen)


def test_a_restore_that_fell_back_is_shown() -> None:
    status = dict(full_status(), restore_fallbacks=[
        {"dir": "/data/ckpt", "s3": "s3://bucket/ckpt/", "checkpoint_id": "20261201T201518.405336Z-e44e8d",
         "rejected_manifests": [{"id": "20261201T211518.405336Z-abcdef", "reason": "files[0]: expected an object, got str"}]},
        {"dir": "/data/other", "checkpoint_id": None, "rejected_manifests": "garbage"}])
    lines = [line for line in render(status, NOW).splitlines() if line.startswith("restore ")]
    assert lines == [
        "restore     /data/ckpt: restored 20261201T201518.405336Z-e44e8d; 1 newer manifest(s) did not verify "
        "(newest 20261201T211518.405336Z-abcdef: files[0]: expected an object, got str)"]
    status["restore_fallbacks"][0]["checkpoint_id"] = None
    assert "restore     /data/ckpt: restored nothing; 1 newer" in render(status, NOW)
