"""The demo's story, asserted: a spot notice drains instance 1, the replacement resumes from its checkpoint.

The story runs once per module (in-process, on the session's moto, so the tests can query EC2 and the
recorded lifecycle calls afterwards); the CLI test runs `spot-agent demo --json` as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def story(strict_local_aws, tmp_path_factory):
    from agent.demo.story import StoryOptions, run_story

    import boto3

    from agent.demo.environment import BUCKET
    from agent.sim.localaws import ORACLE_KEY, lifecycle_calls
    from agent.sim.strict import StrictSettings

    strict_local_aws.reset()
    strict_local_aws.strict.settings = StrictSettings.fast()
    workdir = str(tmp_path_factory.mktemp("demo-story"))
    result = run_story(StoryOptions(workdir=workdir, keep=True, block_devices=True, aws=strict_local_aws))
    # what the cloud holds now (the truth, past the strict model), before a later test resets the shared moto
    keys = {"aws_access_key_id": ORACLE_KEY, "aws_secret_access_key": "x"}
    ec2 = boto3.client("ec2", endpoint_url=strict_local_aws.url, region_name="us-east-1", **keys)
    s3 = boto3.client("s3", endpoint_url=strict_local_aws.url, region_name="us-east-1", **keys)
    result["cloud"] = {
        "snapshots": ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"],
        "s3_keys": [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                    for o in page.get("Contents", [])],
        "lifecycle_calls": lifecycle_calls(),
    }
    try:
        yield result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_story_ran_and_every_check_held(story):
    assert story["error"] == "", story["error"]
    failed = [c for c in story["checks"] if c["ok"] is False]
    assert not failed, failed
    assert story["ok"] is True


def test_resumed_step_is_the_saved_step_and_not_zero(story):
    resumed = story["summary"]["resumed_step"]
    saved = story["drain"]["final_step"]
    assert resumed is not None and resumed > 0
    assert resumed == saved


def test_dataset_sha256_matches_on_both_instances(story):
    from agent.demo.environment import DATASET_FILES, dataset_bytes

    assert set(story["dataset_dirs"]) == {"instance-1", "instance-2"}
    for name, data_dir in story["dataset_dirs"].items():
        for rel, size in DATASET_FILES:
            with open(os.path.join(data_dir, rel), "rb") as fh:
                got = hashlib.sha256(fh.read()).hexdigest()
            assert got == hashlib.sha256(dataset_bytes(rel, size)).hexdigest(), f"{name}: {rel}"


def test_checkpoint_sha256_matches_after_restore(story):
    saved = story["checkpoint_files"]["saved"]
    restored = story["checkpoint_files"]["restored"]
    final = f"ckpt-{story['drain']['final_step']:08d}.json"
    assert final in saved, sorted(saved)
    assert {k: restored.get(k) for k in saved} == saved


def test_exactly_one_snapshot_per_drain(story):
    by_kind = {}
    for snap in story["cloud"]["snapshots"]:
        tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
        by_kind.setdefault(tags.get("spot-agent:notice-kind"), []).append(snap["SnapshotId"])
    assert len(by_kind.get("spot-interruption", [])) == 1, by_kind
    assert len(by_kind.get("rebalance-recommendation", [])) == 1, by_kind  # the early checkpoint
    assert story["drain"]["snapshots"]["ckpt"] == by_kind["spot-interruption"][0]
    assert story["summary"]["restored_from_snapshot"] == by_kind["spot-interruption"][0]


def test_lifecycle_action_completed_once(story):
    first = story["instances"][0]["instance_id"]
    calls = [c for c in story["cloud"]["lifecycle_calls"]
             if c["call"] == "CompleteLifecycleAction" and c["instance_id"] == first]
    assert len(calls) == 1, calls
    assert calls[0]["result"] == "CONTINUE"
    assert calls[0]["group"] == "demo-train-asg" and calls[0]["hook"] == "drain-before-terminate"


def test_drain_ran_in_order_before_the_deadline(story):
    drain = story["drain"]
    names = [s["name"] for s in drain["steps"]]
    assert names[:3] == ["notify", "wait", "snapshot"] and names[-1] == "lifecycle"
    starts = [s["start"] for s in drain["steps"]]
    assert starts == sorted(starts)
    assert drain["notice_at"] <= drain["detected_at"] < drain["finished_at"] < drain["deadline"]
    assert 0 < drain["margin_seconds"] < drain["window"]


def test_cli_json_and_svg_timeline(tmp_path):
    """`spot-agent demo --json --timeline` as a user runs it: own moto, exit 0, JSON, SVG, nothing left."""
    svg = tmp_path / "drain.svg"
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "agent", "demo", "--json", "--timeline", str(svg)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["summary"]["resumed_step"] > 0
    assert data["summary"]["seconds_to_spare"] > 0
    assert "+" in res.stderr and "READY" in res.stderr  # live progress went to stderr, not into the JSON
    text = svg.read_text()
    assert text.startswith("<svg") and "snapshot" in text and "to spare" in text
    assert not os.path.exists(data["workdir"]), "the work directory was not removed"
    with open("/proc/self/mountinfo") as fh:
        assert data["workdir"] not in fh.read()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert data["workdir"] not in loops


def test_cli_text_output_shows_resumed_step_and_margin(tmp_path):
    from agent.demo.output import render_report

    fake = {"simulated": ["x"], "started_at": 100.0,
            "timeline": [{"at": 101.0, "lane": "drain", "what": "drain snapshot: fsfreeze", "seconds": 0.2, "state": "ok"}],
            "summary": {"dataset": {"files": 6, "bytes": 3_800_000, "sha256_match": True},
                        "checkpoint": {"step": 41, "snapshots": {"ckpt": "snap-1"}, "frozen_seconds": {"ckpt": 0.05}},
                        "seconds_to_spare": 37.5, "notice_window": 40, "resumed_step": 41,
                        "restored_from_snapshot": "snap-1", "lifecycle_completed": True},
            "checks": [{"name": "resumed step > 0", "ok": True, "detail": "resumed at 41"}], "seconds": 12.0}
    text = render_report(fake)
    assert "step 41 on the replacement instance" in text
    assert "37.5 s left of the 40 s notice" in text
    assert "+  1.0s  drain" in text and "[ok] drain snapshot" in text


def test_ctrl_c_mid_story_stops_everything_and_releases_mounts_and_loops():
    """SIGINT while instance 1 trains (daemon up, volume mounted, trainer running): exit 130, nothing left."""
    import re
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "agent", "demo"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    workdir = ""
    try:
        for line in proc.stdout:
            out.append(line)
            m = re.search(r"(/tmp/spot-agent-demo-[^/\s]+)/", line)
            if m:
                workdir = m.group(1)
            if "trainer started" in line:
                break
        assert workdir, "".join(out)
        with open("/proc/self/mountinfo") as fh:
            assert workdir in fh.read(), "the volume was not mounted when the interrupt came"
        children = [p for p in psutil.process_iter(["cmdline"]) if workdir in " ".join(p.info["cmdline"] or [])]
        assert len(children) >= 2  # the agent and the trainer
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(out)
    assert "interrupted" in "".join(out)
    time.sleep(0.2)
    with open("/proc/self/mountinfo") as fh:
        assert workdir not in fh.read()
    assert workdir not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not os.path.exists(workdir)
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child


def test_a_failed_story_reports_why_and_still_releases_everything(strict_local_aws):
    """Instance 1 cannot become READY (a hostile key in the dataset) after its volume was mounted."""
    import boto3

    from agent.demo.environment import BUCKET, DATASET_PREFIX
    from agent.demo.story import StoryOptions, run_story

    strict_local_aws.reset()
    s3 = boto3.client("s3", endpoint_url=strict_local_aws.url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=DATASET_PREFIX + "../../etc/cron.d/evil", Body=b"* * * * * root true\n")
    result = run_story(StoryOptions(block_devices=True, aws=strict_local_aws))
    assert result["ok"] is False
    assert "exited with 1 before READY" in result["error"], result["error"]
    assert "../../etc/cron.d/evil" in result["error"]
    workdir = result["workdir"]
    assert any(line.startswith("unmounted ") for line in result["cleanup"]), result["cleanup"]
    with open("/proc/self/mountinfo") as fh:
        assert workdir not in fh.read()
    assert workdir not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not os.path.exists(workdir)


def test_s3_checkpoint_committed_by_the_drain_and_restored_on_the_replacement(story):
    from agent.demo.environment import CHECKPOINT_PREFIX

    assert story["s3_checkpoints"] is True
    [cid] = story["drain"]["checkpoint_ids"].values()
    assert story["summary"]["restored_s3_checkpoint"] == cid
    keys = [k for k in story["cloud"]["s3_keys"] if k.startswith(CHECKPOINT_PREFIX)]
    assert f"{CHECKPOINT_PREFIX}manifests/{cid}.json" in keys, keys
    final = f"ckpt-{story['drain']['final_step']:08d}.bin"
    assert any(cid in k for k in keys), keys
    assert any(k.endswith(final) for k in keys), f"the final checkpoint {final} is not in S3: {keys}"


def test_the_drain_planned_ec2s_snapshot_spacing_on_the_strict_local_aws(story):
    """The rebalance snapshot was seconds before the notice: the drain waited out EC2's 15 s instead of
    meeting SnapshotCreationPerVolumeRateExceeded (which botocore does not retry)."""
    [snap] = [s for s in story["drain"]["steps"] if s["name"] == "snapshot"]
    assert snap["state"] == "ok" and "waited" in snap["reason"] and "per 15 s" in snap["reason"], snap
    [check] = [c for c in story["checks"] if c["name"].startswith("snapshot spacing planned")]
    assert check["ok"] is True, check
    assert any("STRICT" in line for line in story["simulated"])


def test_aws_instant_is_plain_moto():
    from agent.demo.environment import DemoEnvironment

    env = DemoEnvironment(block_devices=False, aws_mode="instant").start()
    try:
        assert env.aws.mode == "instant" and not env.strict
        assert any("INSTANT" in line for line in env.simulated())
        vid = env.clients.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
        assert env.clients.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["State"] == "available"
    finally:
        env.close()
    res = subprocess.run([sys.executable, "-m", "agent", "demo", "--aws", "eventual"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--aws" in res.stderr
