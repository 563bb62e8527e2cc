"""End-to-end scenarios beyond the spot notice: each runs the real daemon on a simulated instance.

ASG scale-in (no spot notice), a scheduled instance-stop, hibernate with no lead time, IMDS flapping
during the drain, the agent killed in the middle of a drain and restarted, and a dataset with hostile
keys. The restart is done by the test acting as the agent's supervisor (what systemd's
Restart=on-failure does): systemd is not PID 1 on the CI machines, so systemd-run is not available.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]


def boot_and_train(new_instance, steps: int = 12, **kw):
    inst = new_instance(**kw)
    inst.boot(timeout=60)
    inst.start_workload()
    inst.wait_step(steps)
    return inst


def completions(instance_id: str):
    from agent.sim.localaws import lifecycle_calls

    return [c for c in lifecycle_calls("CompleteLifecycleAction") if c["instance_id"] == instance_id]


def steps_of(rec):
    return {name: entry["state"] for name, entry in (rec.get("steps") or {}).items()}


def writable(path: str, timeout: float = 3.0) -> bool:
    """Can a write on ``path`` finish within ``timeout``? If not (frozen), thaw it so the writer ends."""
    import subprocess

    done = threading.Event()

    def write() -> None:
        with open(os.path.join(path, ".probe"), "w") as fh:
            fh.write("x")
            fh.flush()
            os.fsync(fh.fileno())
        done.set()

    threading.Thread(target=write, daemon=True).start()
    ok = done.wait(timeout)
    if not ok:
        subprocess.run(["fsfreeze", "--unfreeze", path], capture_output=True)
        done.wait(10)
    return ok


def test_asg_scale_in_with_lifecycle_hook_and_no_spot_notice(cloud, new_instance):
    inst = boot_and_train(new_instance)
    inst.imds.control("asg", {"state": "Terminated"})
    rec = inst.wait_drain("run", timeout=60)
    assert rec["kind"] == "asg-termination"
    states = steps_of(rec)
    assert states["notify"] == "ok" and states["wait"] == "ok", states
    assert states["snapshot"] == "ok" and states["lifecycle"] == "ok", states
    assert rec["report"]["ok"] is True
    assert inst.final_step() and inst.final_step() > 0
    assert len(cloud.snapshots("asg-termination")) == 1
    assert not cloud.snapshots("spot-interruption")
    [call] = completions(inst.instance_id)
    assert call["result"] == "CONTINUE" and call["hook"] == "drain-before-terminate"
    kinds = {n["kind"] for n in inst.status()["notices"]}
    assert "spot-interruption" not in kinds and "asg-termination" in kinds


def test_scheduled_instance_stop_drains_before_not_before(cloud, new_instance):
    inst = boot_and_train(new_instance)
    asked = time.time()
    inst.imds.control("scheduled", {"code": "instance-stop", "in": 45, "event_id": "instance-event-0123456789abcdef0"})
    rec = inst.wait_drain("run", timeout=60)
    assert rec["kind"] == "scheduled-maintenance"
    assert rec["event"]["action"] == "instance-stop"
    # IMDS gives NotBefore to the second: the drain's deadline is that time
    assert abs(rec["event"]["deadline"] - (asked + 45)) < 2.0
    states = steps_of(rec)
    assert states["notify"] == "ok" and states["wait"] == "ok" and states["snapshot"] == "ok", states
    assert rec["report"]["ok"] is True
    assert inst.wait_workload_exit(5) == 0 and inst.final_step() > 0
    assert len(cloud.snapshots("scheduled-maintenance")) == 1
    assert rec["report"]["margin_seconds"] > 30


def test_hibernate_with_no_lead_time_snapshots_first(cloud, new_instance):
    inst = boot_and_train(new_instance)
    inst.imds.control("spot", {"action": "hibernate", "time": time.time()})
    rec = inst.wait_drain("run", timeout=60)
    assert rec["event"]["action"] == "hibernate"
    order = [s["name"] for s in rec["plan"]["steps"]]
    assert order.index("snapshot") < order.index("notify"), order
    states = steps_of(rec)
    assert states["snapshot"] == "ok", rec["steps"]
    assert rec["report"]["ok"] is True
    [snap] = cloud.snapshots("spot-interruption")
    assert rec["report"]["snapshots"]["ckpt"] == snap["SnapshotId"]
    from agent.demo.story import step_starts

    starts = step_starts(inst.notify_messages(), rec["started"] - 0.5)
    assert "snapshot" in starts, starts
    # told afterwards (its memory survives hibernation), or not at all when no second was left
    assert rec["steps"]["notify"]["state"] == "skipped" or starts["notify"] >= starts["snapshot"]
    assert len(completions(inst.instance_id)) == 1


def test_imds_flapping_during_the_drain(cloud, new_instance):
    from agent.demo.agent_config import DemoSettings

    cloud.blockdevs.snapshot_delay = 2.0  # a slow CreateSnapshot keeps the drain going while IMDS flaps
    inst = boot_and_train(new_instance, settings=DemoSettings(imds_backoff_max=0.5))
    sim = inst.imds
    sim.control("fault", {"kind": "429", "count": 8})
    sim.control("spot", {"action": "terminate", "in": 40})
    stop = threading.Event()
    injected = {"429": 8, "5xx": 0}

    def flap() -> None:
        while not stop.is_set():
            sim.control("fault", {"kind": "5xx", "count": 4, "code": 503})
            injected["5xx"] += 4
            stop.wait(0.4)
            sim.control("fault", {"kind": "429", "count": 4})
            injected["429"] += 4
            stop.wait(0.4)

    inst.wait_drain_step("notify", "ok", timeout=40)
    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        rec = inst.wait_drain("run", timeout=60)
    finally:
        stop.set()
        flapper.join(5)
    end = time.monotonic() + 20  # the watcher keeps polling (backing off at most 0.5 s) until all are met
    while (sim.state.fault_429 or sim.state.fault_5xx) and time.monotonic() < end:
        time.sleep(0.1)
    assert sim.state.fault_429 == 0 and sim.state.fault_5xx == 0, "the agent did not meet the injected faults"
    assert injected["5xx"] >= 4 and injected["429"] >= 12
    assert rec["kind"] == "spot-interruption" and rec["report"]["ok"] is True, rec["steps"]
    assert len(cloud.snapshots("spot-interruption")) == 1
    assert len(completions(inst.instance_id)) == 1
    assert inst.agent.alive(), inst.agent.log_tail()
    status = inst.status()
    assert status["state"] == "drained"
    assert "spot-interruption" in {n["kind"] for n in status["notices"]}  # flapping did not withdraw it
    assert inst.agent.log().count("drain plan for spot-interruption") == 1


@contextlib.contextmanager
def create_snapshot_answers_late(seconds: float):
    """CreateSnapshot (on the in-process moto) takes effect at once, snapshot and tags, as on AWS, but
    its answer comes ``seconds`` later: a kill in that window leaves a snapshot the agent never heard
    of. (blockdevs' ``snapshot_delay`` would instead show the snapshot untagged for the delay, because
    moto adds TagSpecifications after the backend call; AWS applies them atomically.)"""
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore

    original = ElasticBlockStore.create_snapshot

    def late(self):
        result = original(self)
        time.sleep(seconds)
        return result

    ElasticBlockStore.create_snapshot = late
    try:
        yield
    finally:
        ElasticBlockStore.create_snapshot = original


def test_agent_killed_mid_drain_and_restarted_by_its_supervisor(cloud, new_instance):
    from agent.demo.environment import CHECKPOINT_PREFIX

    inst = boot_and_train(new_instance, s3_checkpoints=True)
    with create_snapshot_answers_late(3.0):  # the kill lands with the filesystem frozen
        inst.imds.control("spot", {"action": "terminate", "in": 40})
        inst.wait_drain_step("snapshot", "running", timeout=40)
        end = time.monotonic() + 10
        while not (inst.drain_record().get("snapshot_requested") or {}).get("ckpt") and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.3)  # inside the frozen window, the CreateSnapshot call still unanswered
        first = inst.agent
        first.kill()
    assert first.proc.returncode == -9
    rec = inst.drain_record()
    assert not rec.get("finished") and rec["steps"]["snapshot"]["state"] == "running"
    assert rec["snapshot_requested"]["ckpt"] and not rec["snapshots"]
    assert len(cloud.snapshots("spot-interruption")) == 1  # taken, but the agent never heard the answer

    second = inst.start_agent()  # the supervisor restarts it (systemd: Restart=on-failure)
    rec = inst.wait_drain("run", timeout=60)
    assert rec["report"]["resumed"] is True
    assert steps_of(rec)["snapshot"] == "ok" and rec["report"]["ok"] is True, rec["steps"]
    snaps = cloud.snapshots("spot-interruption")
    assert len(snaps) == 1, [s["SnapshotId"] for s in snaps]
    assert rec["report"]["snapshots"]["ckpt"] == snaps[0]["SnapshotId"]
    assert len(completions(inst.instance_id)) == 1
    assert writable(inst.paths.volume_mount), "the checkpoint volume was left frozen"
    # the upload came after the restart: one committed S3 checkpoint, holding the final one
    [cid] = rec["report"]["checkpoint_ids"].values()
    manifests = [k for k in cloud.s3_keys(CHECKPOINT_PREFIX) if "/manifests/" in k]
    assert manifests == [f"{CHECKPOINT_PREFIX}manifests/{cid}.json"], manifests
    final = f"ckpt-{inst.final_step():08d}.bin"
    assert any(k.endswith(final) for k in cloud.s3_keys(CHECKPOINT_PREFIX))
    assert second.alive()
    assert "resuming" in second.log()


def test_dataset_with_hostile_keys_is_refused_without_writing_outside(cloud, new_instance):
    from agent.demo.environment import BUCKET, DATASET_PREFIX, tree_hashes

    hostile = {"../escape.txt": b"escaped", "sub/../../up.txt": b"up", "/abs.txt": b"abs", "a//b.txt": b"b",
               "back\\slash.txt": b"bs"}
    cloud.seed_dataset(extra=hostile)
    keys = set(cloud.s3_keys(DATASET_PREFIX))
    assert {DATASET_PREFIX + k for k in hostile} <= keys, "moto did not store the hostile keys verbatim"
    inst = new_instance()
    with pytest.raises(RuntimeError, match="before READY"):
        inst.boot(timeout=60)
    assert inst.agent.proc.returncode == 1
    status = inst.status()
    assert status["state"] == "failed" and not status["ready"]
    error = status["error"]
    assert f"s3://{BUCKET}/{DATASET_PREFIX}" in error and "error(s)" in error, error
    assert "../escape.txt" in error or "up.txt" in error or "abs.txt" in error, error
    for dirpath, _dirs, files in os.walk(cloud.workdir):
        for name in ("escape.txt", "up.txt", "abs.txt"):
            assert name not in files, f"{name} written at {dirpath}"
    assert not os.path.exists(os.path.join(os.path.dirname(inst.paths.data_dir), "escape.txt"))
    got = tree_hashes(inst.paths.data_dir)
    assert {k: got.get(k) for k in cloud.dataset_hashes} == cloud.dataset_hashes  # the safe keys still came
