"""The drain against the strict local AWS: snapshot spacing, retries within budgets, a restart right
after CreateSnapshot, heartbeats through a long drain.

Real loop devices, ext4 and fsfreeze, the real Drainer, boto3 over HTTP to the strict middleware in
front of moto (StrictSettings.fast(): the same states and limits on a shorter time scale).
"""

from __future__ import annotations

import time

import pytest

from agent.drain import snapshots as snaps
from agent.drain.freeze import boot_id
from agent.events import Event
from agent.sim.localaws import lifecycle_calls
from tests.integration.drain_helpers import GROUP, HOOK, drain_env  # noqa: F401

pytestmark = pytest.mark.root

NO_WORKLOAD = 'wait = "none"\n'


@pytest.fixture
def aws(strict_aws):
    """Every fixture of drain_env (the instance, the volume, the manager) on the strict local AWS."""
    return strict_aws


@pytest.fixture
def server(strict_aws):
    return strict_aws.server


def spot(seconds: float = 60.0, key: str = "spot:1") -> Event:
    now = time.time()
    return Event("spot-interruption", "terminate", now + seconds, key, now)


def rebalance(key: str = "rebalance:1") -> Event:
    now = time.time()
    return Event("rebalance-recommendation", "", None, key, now)


def codes(server, action: str):
    return [c["code"] for c in server.strict.calls_by() if c["action"] == action]


def test_a_drain_right_after_a_rebalance_snapshot_waits_out_the_spacing(drain_env, server):
    server.strict.settings.snapshot_spacing_seconds = 4.0
    cfg = drain_env.config(workload=NO_WORKLOAD, extra="[drain]\nsnapshot_spacing = 4\n")
    drainer = drain_env.drainer(cfg)
    server.begin_termination(drain_env.identity.instance_id)
    early = drainer.early(rebalance())
    assert early.step("snapshot").state == "ok", early.steps
    t0 = time.monotonic()
    report = drainer.run(spot())
    step = report.step("snapshot")
    assert step.state == "ok", report.steps
    assert "waited" in step.reason and "one snapshot of a volume per 4 s" in step.reason, step.reason
    assert time.monotonic() - t0 >= 2.5
    assert "SnapshotCreationPerVolumeRateExceeded" not in codes(server, "CreateSnapshot")  # planned, not hit
    assert report.ok and report.lifecycle_completed


class CommittingStore:
    """A stand-in for the S3 checkpoint store (tested on its own elsewhere): this test is about the
    snapshot step's decision, and only needs an upload that commits."""

    name = "s3://bucket/ckpt/"

    def upload(self, deadline, reason, settled, **more):
        from types import SimpleNamespace

        return SimpleNamespace(committed=True, checkpoint_id="ck-1", files=1, bytes=1, error="")


def test_when_the_spacing_does_not_fit_the_snapshot_is_left_to_s3_and_says_so(drain_env, server):
    cfg = drain_env.config(workload=NO_WORKLOAD, extra="[drain]\nsnapshot_reserve = 3\nmargin = 1\nupload_reserve = 2\n")
    drainer = drain_env.drainer(cfg, stores=[CommittingStore()])
    drainer.early(rebalance())
    report = drainer.run(spot(seconds=8.0))
    step = report.step("snapshot")
    assert step.state == "skipped" and "ckpt" not in report.snapshots
    assert "snapshot skipped" in step.reason and "S3 upload carries the checkpoint" in step.reason, step.reason
    assert report.step("upload").state == "ok"
    assert codes(server, "CreateSnapshot") == [""]  # only the rebalance one: no refused second try


def test_a_restart_right_after_create_snapshot_finds_it_and_takes_no_second(drain_env, server):
    """The crash came after CreateSnapshot reached EC2 and before the agent saved its id: the new
    snapshot is NotFound and untagged to describe calls for a moment, and the lookup by tag waits."""
    cfg = drain_env.config(workload=NO_WORKLOAD)
    ev = spot(key="spot:crashed")
    drainer = drain_env.drainer(cfg)
    rec = drainer._new_record(ev, early=False)
    rec["steps"]["snapshot"] = {"state": "running"}
    rec["snapshot_requested"]["ckpt"] = True
    drainer._save("run", rec)
    tags = snaps.snapshot_tags(drain_env.identity.instance_id, "ckpt", "", ev.kind, ev.detected_at, ev.key, boot_id())
    earlier = snaps.create_snapshot(drain_env.aws.ec2, drain_env.volume_id, tags, "just before the crash")
    report = drainer.run(ev)
    assert report.snapshots == {"ckpt": earlier}, report.steps
    time.sleep(server.strict.settings.tags_after_seconds)
    assert [s["SnapshotId"] for s in drain_env.snapshots()] == [earlier]
    assert codes(server, "CreateSnapshot") == [""]


def test_the_id_is_in_the_state_file_as_soon_as_create_snapshot_returns(drain_env):
    """While the filesystem is still frozen (before thaw), the state already names the snapshot."""
    seen = {}
    drainer = drain_env.drainer(drain_env.config(workload=NO_WORKLOAD))
    real_freeze = drainer.runner.run

    def run(argv, **kw):
        if argv[:2] == ["fsfreeze", "-u"]:
            seen["at_thaw"] = dict((drainer.state.get("drain") or {}).get("run", {}).get("snapshots", {}))
        return real_freeze(argv, **kw)

    drainer.runner.run = run
    report = drainer.run(spot())
    assert report.step("snapshot").state == "ok"
    assert seen["at_thaw"] == report.snapshots


def test_a_throttled_drain_still_completes_inside_its_budgets(drain_env, server):
    s = server.strict.settings
    s.buckets["CreateSnapshot"] = (0.0, 0.7)  # empty: the first try is refused, a token every ~1.4 s
    s.buckets["CompleteLifecycleAction"] = (0.0, 1.0)
    s.buckets["DescribeSnapshots"] = (1.0, 0.5)
    server.begin_termination(drain_env.identity.instance_id)
    ev = spot(seconds=40.0)
    report = drain_env.drainer(drain_env.config(workload=NO_WORKLOAD)).run(ev)
    assert report.ok and report.step("snapshot").state == "ok" and report.lifecycle_completed, report.steps
    assert "RequestLimitExceeded" in codes(server, "CreateSnapshot")
    assert "Throttling" in codes(server, "CompleteLifecycleAction")
    assert codes(server, "CompleteLifecycleAction")[-1] == ""
    assert all(c["at"] < ev.deadline for c in server.strict.calls_by())
    assert [c["result"] for c in lifecycle_calls("CompleteLifecycleAction")] == ["CONTINUE"]


def test_heartbeats_keep_the_lifecycle_action_through_a_drain_longer_than_its_timeout(drain_env, server):
    drain_env.aws.autoscaling.put_lifecycle_hook(AutoScalingGroupName=GROUP, LifecycleHookName=HOOK,
                                                 LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
                                                 HeartbeatTimeout=3, DefaultResult="ABANDON")
    server.begin_termination(drain_env.identity.instance_id)
    # a workload that never confirms its checkpoint: the wait step takes its whole 5 s
    cfg = drain_env.config(workload=f'marker = "{drain_env.marker}"\ncheckpoint_timeout = 5\n',
                           extra="[drain.lifecycle]\nheartbeat_interval = 1\n")
    report = drain_env.drainer(cfg).run(spot())
    assert report.step("wait").state == "cut"
    assert report.lifecycle_completed, report.steps
    assert not lifecycle_calls("LifecycleActionTimeout")
    assert len(lifecycle_calls("RecordLifecycleActionHeartbeat")) >= 3
    assert server.strict.lifecycle_state(drain_env.identity.instance_id).how == "completed"
