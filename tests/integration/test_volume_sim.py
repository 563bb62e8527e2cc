"""The local EC2 host itself: volumes are real devices, snapshots copy data, cleanup leaves nothing."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

pytestmark = pytest.mark.root


def _attach(aws, sim, vid, iid, dev="/dev/sdf"):
    aws.ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device=dev)
    return sim.loop_device(vid)


def test_snapshot_copies_data_and_a_volume_from_it_starts_with_it(aws, blockdevs, instance):
    az, iid = instance.availability_zone, instance.instance_id
    vid = aws.ec2.create_volume(AvailabilityZone=az, Size=1)["VolumeId"]
    loop = _attach(aws, blockdevs, vid, iid)
    link = os.path.join(blockdevs.dev_root, "disk", "by-id", "nvme-Amazon_Elastic_Block_Store_" + vid.replace("-", ""))
    assert os.path.realpath(link) == loop
    with open(os.path.join(blockdevs.sys_root, "block", os.path.basename(loop), "device", "serial")) as fh:
        assert fh.read().strip() == vid.replace("-", "")
    with open(loop, "r+b") as fh:
        fh.write(b"before-snapshot")
        fh.flush()
        os.fsync(fh.fileno())
    sid = aws.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    with open(loop, "r+b") as fh:
        fh.write(b"AFTER")
        os.fsync(fh.fileno())
    new = aws.ec2.create_volume(AvailabilityZone=az, SnapshotId=sid, Size=2)["VolumeId"]
    loop2 = _attach(aws, blockdevs, new, iid, "/dev/sdg")
    with open(loop2, "rb") as fh:
        assert fh.read(15) == b"before-snapshot"
    assert os.path.getsize(blockdevs.volume_file(new)) == 800 << 20  # 2 GiB at 400 MiB per GiB
    aws.ec2.detach_volume(VolumeId=new, InstanceId=iid)
    assert blockdevs.loop_device(new) is None
    assert not os.path.lexists(os.path.join(blockdevs.dev_root, os.path.basename(loop2)))


def test_snapshot_delay_copies_at_the_end_of_the_call(aws, blockdevs, instance):
    vid = aws.ec2.create_volume(AvailabilityZone=instance.availability_zone, Size=1)["VolumeId"]
    loop = _attach(aws, blockdevs, vid, instance.instance_id)
    blockdevs.snapshot_delay = 0.5
    in_flight = threading.Event()
    blockdevs.on_snapshot.append(lambda sid, v: in_flight.set())

    def write_while_in_flight():
        in_flight.wait(10)
        with open(loop, "r+b") as fh:
            fh.write(b"written-during-the-call")
            os.fsync(fh.fileno())

    t = threading.Thread(target=write_while_in_flight)
    t.start()
    sid = aws.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    t.join()
    with open(blockdevs.snapshot_file(sid), "rb") as fh:
        # Not frozen, so the write made while the call was in flight is in the snapshot: a drain
        # that thaws before CreateSnapshot returns would be caught by this.
        assert fh.read(23) == b"written-during-the-call"
    assert blockdevs.snapshot_log[-1]["snapshot_id"] == sid


def test_client_token_and_cleanup(aws, scratch_dir, instance):
    from agent.sim.blockdevs import LocalBlockDevices

    sim = LocalBlockDevices(os.path.join(scratch_dir, "f"), os.path.join(scratch_dir, "d"), os.path.join(scratch_dir, "s")).install()
    try:
        a = aws.ec2.create_volume(AvailabilityZone=instance.availability_zone, Size=1, ClientToken="t-1")["VolumeId"]
        b = aws.ec2.create_volume(AvailabilityZone=instance.availability_zone, Size=1, ClientToken="t-1")["VolumeId"]
        assert a == b
        assert os.path.getsize(sim.volume_file(a)) == 512 << 20  # the default size cap
        loop = _attach(aws, sim, a, instance.instance_id)
        disks = sim.add_instance_store(1)
    finally:
        sim.cleanup()
    listed = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert sim.volume_file(a) not in listed and loop and disks
    assert os.listdir(os.path.join(scratch_dir, "d", "disk", "by-id")) == []


def test_standalone_server_gives_real_devices_and_cleans_up_on_sigterm(scratch_dir):
    """`python -m agent.sim.blockdevs`: moto and the patch in their own process, for the demo."""
    import signal
    import sys

    from agent.aws import make_clients
    from agent.config import AWSSection

    d = {k: os.path.join(scratch_dir, k) for k in ("files", "dev", "sys")}
    proc = subprocess.Popen([sys.executable, "-m", "agent.sim.blockdevs", "--port", "0", "--root", d["files"],
                             "--dev-root", d["dev"], "--sys-root", d["sys"]],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        ec2 = make_clients(AWSSection(endpoint_url=url), "us-east-1").ec2
        inst = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
        vid = ec2.create_volume(AvailabilityZone=inst["Placement"]["AvailabilityZone"], Size=1)["VolumeId"]
        ec2.attach_volume(VolumeId=vid, InstanceId=inst["InstanceId"], Device="/dev/sdf")
        link = os.path.join(d["dev"], "disk", "by-id", "nvme-Amazon_Elastic_Block_Store_" + vid.replace("-", ""))
        loop = os.path.realpath(link)
        assert loop.startswith("/dev/loop")
        assert os.path.join(d["files"], f"{vid}.img") in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert os.path.join(d["files"], f"{vid}.img") not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
