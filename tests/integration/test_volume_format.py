"""The formatting rule end to end, and finding the right device (real loop devices, real blkid, mkfs and
mount, moto over HTTP with LocalBlockDevices).

A blank-looking volume is formatted only when spot-agent created it empty (recorded in the state, a
crash between CreateVolume and the record included) or when the config allows formatting one that
reads as never written. Just before mkfs the device is held with O_EXCL and probed again. The device
of a volume is the one whose serial matches, read under the kernel name; a wrong device seen first is
waited past, not taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from agent.runner import Runner
from agent.state import StateStore
from tests.blockdev_fixtures import device_sha256 as _sha256
from tests.blockdev_fixtures import volume

pytestmark = pytest.mark.root

MiB = 1024 * 1024


def _blank(device: str) -> bool:
    return subprocess.run(["blkid", "-p", device], capture_output=True).returncode == 2


def _new_volume(host) -> str:
    return host.aws.ec2.create_volume(AvailabilityZone=host.identity.availability_zone, Size=1, VolumeType="gp3")["VolumeId"]


class RecordingRunner(Runner):
    """The real runner, keeping every argv (to prove mkfs never ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def run(self, argv, *a, **kw):
        self.calls.append(list(argv))
        return super().run(argv, *a, **kw)

    def mkfs_calls(self):
        return [c for c in self.calls if c[0].startswith("mkfs")]


def test_a_blank_volume_spot_agent_did_not_create_is_refused_by_default(host):
    vid = _new_volume(host)
    mgr = host.manager([volume("data", host.mnt("data"), fs="ext4", volume_id=vid)])
    mgr.runner = runner = RecordingRunner()
    [res] = mgr.up()
    loop = host.sim.loop_device(vid)
    assert not res.ok and "formatted" not in res.actions
    assert "\n" not in res.error
    assert f"volume data ({vid}) on {loop} has no recognisable filesystem and spot-agent did not create it empty" in res.error
    assert 'format_existing = "if-never-written"' in res.error  # says how to allow it
    assert runner.mkfs_calls() == [] and _blank(loop)


def test_a_volume_spot_agent_created_is_formatted_and_the_licence_is_spent(host):
    mnt = host.mnt("data")
    cfg = [volume("data", mnt, fs="ext4", create={"size_gib": 1})]
    mgr = host.manager(cfg)
    progress = []
    [res] = mgr.up(progress=progress.append)
    assert res.ok, res.error
    assert "created" in res.actions and "formatted" in res.actions
    assert any("spot-agent created this volume empty" in p for p in progress)
    rec = mgr.records()["data"]
    assert rec["created_empty"] == res.volume_id and rec["formatted"] == res.volume_id
    with open(os.path.join(mnt, "weights.bin"), "wb") as fh:
        fh.write(os.urandom(MiB))
    [down] = mgr.down()
    assert down.ok
    # The superblock is lost while detached (blkid then finds nothing): the same agent, same state, must not
    # format the volume again, because it now holds data even though it was created empty once.
    with open(host.sim.volume_file(res.volume_id), "r+b") as fh:
        fh.write(bytes(4096))
    mgr.runner = runner = RecordingRunner()
    [again] = mgr.up()
    assert not again.ok and "did not create it empty" in again.error
    assert runner.mkfs_calls() == []
    assert _blank(host.sim.loop_device(res.volume_id))


def test_a_crash_between_create_volume_and_its_record_still_knows_the_volume_is_ours(host, monkeypatch):
    from agent.volumes import attach as A

    cfg = [volume("data", host.mnt("data"), fs="ext4", create={"size_gib": 1})]
    real = A.create_volume
    made = []

    def create_then_crash(*a, **kw):
        made.append(real(*a, **kw))
        raise RuntimeError("the agent died here, before recording the volume id")

    monkeypatch.setattr(A, "create_volume", create_then_crash)
    [crashed] = host.manager(cfg).up()
    assert not crashed.ok and len(made) == 1
    rec = StateStore(os.path.join(host.root, "state.json")).get("volumes")["data"]
    assert rec["creating"] and rec["create_nonce"] and "volume_id" not in rec
    monkeypatch.setattr(A, "create_volume", real)

    # A state that lost the record (say, another state dir) has no claim on that volume: refused.
    [stranger] = host.manager(cfg, state_name="other.json").up()
    assert stranger.volume_id == made[0]
    assert not stranger.ok and "did not create it empty" in stranger.error

    # The restart with the state that recorded the call finds the volume by its tags, knows it made
    # it (the nonce in its creation tags), and formats it.
    [res] = host.manager(cfg).up()
    assert res.ok, res.error
    assert res.volume_id == made[0] and "created" not in res.actions and "formatted" in res.actions


def test_a_device_another_program_takes_after_the_probe_is_refused(host):
    """The race the O_EXCL re-probe closes: something (device-mapper, md, a mount, any exclusive
    opener) takes the device between the first probe and mkfs."""
    hold = ("import os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")

    class GrabAfterFirstProbe(RecordingRunner):
        holder = None

        def run(self, argv, *a, **kw):
            res = super().run(argv, *a, **kw)
            if argv[:2] == ["blkid", "-p"] and self.holder is None:
                self.holder = subprocess.Popen([sys.executable, "-c", hold, argv[-1]], stdout=subprocess.PIPE, text=True)
                assert self.holder.stdout.readline().strip() == "held"
            return res

    mgr = host.manager([volume("data", host.mnt("data"), fs="ext4", create={"size_gib": 1})])
    mgr.runner = runner = GrabAfterFirstProbe()
    try:
        [res] = mgr.up()
    finally:
        if runner.holder is not None:
            runner.holder.kill()
            runner.holder.wait()
    loop = host.sim.loop_device(res.volume_id)
    assert runner.holder is not None
    assert not res.ok and f"{loop} is in use" in res.error and "refusing to format it" in res.error
    assert runner.mkfs_calls() == [] and _blank(loop)
    # Once released, the same volume (created empty by the agent) is formatted.
    [again] = host.manager([volume("data", host.mnt("data"), fs="ext4", create={"size_gib": 1})]).up()
    assert again.ok and "formatted" in again.actions, again.error


def _xen_disk(host, vid: str) -> str:
    """Make ``vid``'s loop device look like a Xen disk: no by-id link and no serial in sysfs."""
    loop = host.sim.loop_device(vid)
    os.unlink(os.path.join(host.sim.dev_root, "disk", "by-id", host.sim.by_id_name(vid)))
    os.unlink(os.path.join(host.sim.sys_root, "block", os.path.basename(loop), "device", "serial"))
    return loop


def test_xen_name_symlinked_to_another_volume_is_refused(host):
    host.sim.bytes_per_gib = 64 * MiB
    mine, other = _new_volume(host), _new_volume(host)
    iid = host.identity.instance_id
    host.aws.ec2.attach_volume(VolumeId=mine, InstanceId=iid, Device="/dev/sdf")
    host.aws.ec2.attach_volume(VolumeId=other, InstanceId=iid, Device="/dev/sdg")
    _xen_disk(host, mine)
    theirs = host.sim.loop_device(other)
    subprocess.run(["mkfs.ext4", "-q", theirs], check=True, stdin=subprocess.DEVNULL)
    before = _sha256(theirs)
    # /dev/xvdf is a link to the other volume's device; sysfs knows that device by its kernel name only.
    os.symlink(theirs, os.path.join(host.sim.dev_root, "xvdf"))
    [res] = host.manager([volume("mine", host.mnt("mine"), fs="ext4", volume_id=mine, attach_timeout=1)]).up()
    assert not res.ok, "took the other volume's filesystem for this one"
    assert f"whose serial is {other.replace('-', '')}" in res.error and "after waiting 1s" in res.error
    assert not os.path.ismount(host.mnt("mine")) and _sha256(theirs) == before


def test_a_stale_by_id_link_is_waited_past_until_the_right_device_appears(host):
    mine, other = _new_volume(host), _new_volume(host)
    iid = host.identity.instance_id
    host.aws.ec2.attach_volume(VolumeId=mine, InstanceId=iid, Device="/dev/sdf")
    host.aws.ec2.attach_volume(VolumeId=other, InstanceId=iid, Device="/dev/sdg")
    right, wrong = host.sim.loop_device(mine), host.sim.loop_device(other)
    link = os.path.join(host.sim.dev_root, "disk", "by-id", host.sim.by_id_name(mine))
    serial_file = os.path.join(host.sim.sys_root, "block", os.path.basename(right), "device", "serial")
    with open(serial_file) as fh:
        serial = fh.read()
    # Our device has not shown up yet and udev still has the link on the previous owner of the name.
    os.unlink(serial_file)
    os.unlink(link)
    os.symlink(wrong, link)

    def appear() -> None:
        time.sleep(1.0)
        with open(serial_file, "w") as fh:
            fh.write(serial)
        os.unlink(link)
        os.symlink(right, link)

    t = threading.Thread(target=appear)
    t.start()
    progress = []
    try:
        [res] = host.manager([volume("mine", host.mnt("mine"), fs="ext4", volume_id=mine, attach_timeout=20,
                                     format_existing="if-never-written")]).up(progress=progress.append)
    finally:
        t.join()
    assert res.ok, res.error
    assert res.device == right and _blank(wrong)
    assert any("waiting for the right device" in p and "stale symlink" in p for p in progress)
