"""Thaw on every path, and retention's choice, without root.

fsfreeze needs root and a real filesystem, which unit tests may not use: a recording runner stands in
for the host commands here (the real freeze is exercised in tests/integration/test_drain_*.py).
"""

from __future__ import annotations

import os
from typing import List

import pytest

from agent.drain import freeze
from agent.drain.snapshots import MANAGED, choose_deletions, notice_tag, snapshot_tags
from agent.runner import Result
from agent.state import StateStore


class RecordingRunner:
    """Stands in for fsfreeze/sync, which cannot run without root."""

    def __init__(self, fail: tuple = ()) -> None:
        self.calls: List[List[str]] = []
        self.fail = fail
        self.seen_state: List[dict] = []
        self.state: StateStore = None  # type: ignore[assignment]

    def run(self, argv, timeout=60.0, check=True, input=None):
        self.calls.append(list(argv))
        if self.state is not None:
            self.seen_state.append(self.state.get("drain", {}).get("frozen", {}))
        rc = 1 if tuple(argv[:2]) in self.fail else 0
        return Result(list(argv), rc, "", "boom" if rc else "", 0.0)


@pytest.fixture
def state(tmp_path):
    return StateStore(str(tmp_path / "state.json"))


def test_records_before_freezing_and_thaws_after(state, tmp_path):
    runner = RecordingRunner()
    runner.state = state
    res = freeze.frozen_call([("ckpt", "/mnt/ckpt")], lambda: "snap-1", runner=runner, state=state,
                             freeze_timeout=5, budget=10)
    assert res.value == "snap-1" and res.frozen == ["/mnt/ckpt"]
    assert [c[:2] for c in runner.calls] == [["sync", "-f"], ["fsfreeze", "-f"], ["fsfreeze", "-u"]]
    # at the moment fsfreeze -f ran, the mount point was already in the state file
    assert "/mnt/ckpt" in runner.seen_state[1]
    assert state.get("drain")["frozen"] == {}


def test_thaws_when_the_call_raises(state):
    runner = RecordingRunner()

    def boom():
        raise RuntimeError("API down")

    with pytest.raises(RuntimeError, match="API down"):
        freeze.frozen_call([("ckpt", "/mnt/ckpt")], boom, runner=runner, state=state, freeze_timeout=5, budget=10)
    assert runner.calls[-1] == ["fsfreeze", "-u", "/mnt/ckpt"]
    assert state.get("drain")["frozen"] == {}


def test_thaws_before_a_hung_call_returns(state):
    import threading

    runner = RecordingRunner()
    release = threading.Event()
    thawed_while_hung = []

    def hung():
        release.wait(5)
        return "snap-late"

    def watch():
        # the call is still hung when the thaw happens
        while ["fsfreeze", "-u", "/mnt/ckpt"] not in runner.calls:
            pass
        thawed_while_hung.append(not release.is_set())
        release.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    res = freeze.frozen_call([("ckpt", "/mnt/ckpt")], hung, runner=runner, state=state, freeze_timeout=0.2, budget=10)
    assert thawed_while_hung == [True]
    assert res.value == "snap-late" and not res.in_window
    assert any("crash-consistent" in w for w in res.warnings)


def test_freeze_failure_still_snapshots_unfrozen(state):
    runner = RecordingRunner(fail=(("fsfreeze", "-f"),))
    res = freeze.frozen_call([("ckpt", "/mnt/ckpt")], lambda: "snap-2", runner=runner, state=state,
                             freeze_timeout=5, budget=10)
    assert res.value == "snap-2" and res.frozen == []
    assert ["fsfreeze", "-u", "/mnt/ckpt"] not in runner.calls
    assert any("not frozen" in w for w in res.warnings)
    assert state.get("drain")["frozen"] == {}


def test_never_freezes_the_state_directory(state, tmp_path):
    runner = RecordingRunner()
    res = freeze.frozen_call([("ckpt", str(tmp_path))], lambda: "snap-3", runner=runner, state=state,
                             freeze_timeout=5, budget=10, never_freeze=str(tmp_path))
    assert res.value == "snap-3"
    assert not any(c[0] == "fsfreeze" for c in runner.calls)


def test_thaw_leftovers_thaws_recorded_mounts_of_this_boot_only(state):
    state.update("drain", frozen={
        "/": {"volume": "root", "since": 1.0, "boot_id": freeze.boot_id()},
        "/nonexistent-mount": {"volume": "gone", "since": 1.0, "boot_id": freeze.boot_id()},
        "/proc": {"volume": "other-boot", "since": 1.0, "boot_id": "not-this-boot"},
    })
    runner = RecordingRunner()
    assert freeze.thaw_leftovers(state, runner) == ["/"]
    assert runner.calls == [["fsfreeze", "-u", "/"]]
    assert state.get("drain")["frozen"] == {}


def test_thaw_leftovers_keeps_a_record_it_could_not_thaw(state, monkeypatch):
    monkeypatch.setattr(freeze.time, "sleep", lambda s: None)
    state.update("drain", frozen={"/": {"volume": "root", "since": 1.0, "boot_id": freeze.boot_id()}})
    runner = RecordingRunner(fail=(("fsfreeze", "-u"),))
    assert freeze.thaw_leftovers(state, runner) == []
    assert "/" in state.get("drain")["frozen"]


def snap(i, state="completed", managed=True, start=None):
    tags = [{"Key": MANAGED, "Value": "true"}] if managed else []
    return {"SnapshotId": f"snap-{i}", "State": state, "StartTime": start or f"2026-01-{i:02d}T00:00:00Z", "Tags": tags}


def test_retention_keeps_the_newest_n():
    snaps = [snap(i) for i in range(1, 8)]
    assert sorted(choose_deletions(snaps, 3)) == ["snap-1", "snap-2", "snap-3", "snap-4"]


def test_retention_never_deletes_the_newest_completed():
    snaps = [snap(1), snap(2), snap(3, "pending"), snap(4, "error")]
    out = choose_deletions(snaps, 2)
    assert "snap-2" not in out  # newest completed survives although outside the newest 2
    assert out == ["snap-1"]


def test_retention_deletes_only_ours():
    snaps = [snap(1, managed=False), snap(2, managed=False), snap(3), snap(4)]
    assert choose_deletions(snaps, 1) == ["snap-3"]


def test_retention_leaves_pending_for_later():
    snaps = [snap(1, "pending"), snap(2), snap(3)]
    assert choose_deletions(snaps, 1) == ["snap-2"]


def test_tags_name_the_notice_and_are_filter_safe():
    tags = snapshot_tags("i-1", "ckpt", "", "spot-interruption", 0.0, "spot:2026-01-01T00:00:00Z*?")
    assert tags[MANAGED] == "true" and tags["spot-agent:run"] == "i-1"
    assert tags["spot-agent:notice-key"] == notice_tag("i-1", "spot:2026-01-01T00:00:00Z*?")
    assert all(c in "0123456789abcdef" for c in tags["spot-agent:notice-key"])
    assert notice_tag("i-1", "k") != notice_tag("i-2", "k")
    assert os.path.basename(tags["Name"]) == "ckpt"
