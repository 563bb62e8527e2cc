"""Benchmark: from "device present" to "mounted", for a blank volume (mkfs included) and one that
already holds a filesystem, on ext4 and xfs.

The volume is attached through moto first (LocalBlockDevices makes it a real loop device over a sparse
file), so the clock starts with the block device present and covers what ``VolumeManager.up`` does
from there: EC2 describe calls, device resolution (by-id symlink + serial), settle, ``blkid -p``,
mkfs (blank only), mount by UUID, growth checks. Needs root.

    sudo .venv/bin/python bench/volumes_bench.py [--runs 5] [--size-gib 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-gib", type=int, default=1, help="volume size (1 GiB = 1 GiB of sparse file)")
    args = parser.parse_args()

    from agent.aws import make_clients
    from agent.config import AWSSection, HostSection, VolumeSection
    from agent.identity import InstanceIdentity
    from agent.runner import Runner
    from agent.sim.blockdevs import LocalBlockDevices
    from agent.sim.localaws import LocalAWS
    from agent.state import StateStore
    from agent.volumes.manager import VolumeManager

    root = tempfile.mkdtemp(prefix="spot-vol-bench-")
    server = LocalAWS().start()
    sim = LocalBlockDevices(f"{root}/files", f"{root}/dev", f"{root}/sys", size_cap=args.size_gib << 30).install()
    results = {}
    try:
        aws = make_clients(AWSSection(endpoint_url=server.url), "us-east-1")
        inst = aws.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]
        ident = InstanceIdentity(inst["InstanceId"], "m5.large", inst["Placement"]["AvailabilityZone"], "us-east-1")
        host = HostSection(dev_root=sim.dev_root, sys_root=sim.sys_root, fstab=f"{root}/fstab", unit_dir=f"{root}/units")
        for fs in ("ext4", "xfs"):
            for kind in ("blank", "existing"):
                samples = []
                for i in range(args.runs):
                    vid = aws.ec2.create_volume(AvailabilityZone=ident.availability_zone, Size=args.size_gib)["VolumeId"]
                    mnt = f"{root}/mnt/{fs}-{kind}-{i}"
                    # The bench creates the volume itself, so spot-agent has no create-nonce for it:
                    # a blank one is formatted under format_existing = "if-never-written" (its zero
                    # probe is part of the figure).
                    vol = VolumeSection(name=f"v{i}", mount=mnt, fs=fs, volume_id=vid, format_existing="if-never-written")
                    if kind == "existing":
                        pre = VolumeManager([vol], host, aws, ident, StateStore(f"{root}/pre-{fs}-{i}.json"), Runner())
                        assert pre.up()[0].ok
                        subprocess.run(["umount", mnt], check=True)
                    else:
                        aws.ec2.attach_volume(VolumeId=vid, InstanceId=ident.instance_id, Device="/dev/sdf")
                    assert sim.loop_device(vid), "device not present"
                    mgr = VolumeManager([vol], host, aws, ident, StateStore(f"{root}/s-{fs}-{kind}-{i}.json"), Runner())
                    t0 = time.perf_counter()
                    [res] = mgr.up()
                    samples.append(time.perf_counter() - t0)
                    assert res.ok, res.error
                    assert ("formatted" in res.actions) == (kind == "blank"), res.actions
                    mgr.down()
                    aws.ec2.delete_volume(VolumeId=vid)
                results[(fs, kind)] = samples
    finally:
        for line in open("/proc/self/mountinfo"):
            mp = line.split()[4]
            if mp.startswith(root + "/"):
                subprocess.run(["umount", "-l", mp])
        sim.cleanup()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}, "
          f"python {platform.python_version()}; volume {args.size_gib} GiB sparse file on a loop device; runs={args.runs}")
    print("| fs | volume | median s | min s | max s |")
    print("|---|---|---|---|---|")
    for (fs, kind), s in results.items():
        print(f"| {fs} | {kind}{' (mkfs included)' if kind == 'blank' else ''} | {statistics.median(s):.3f} | {min(s):.3f} | {max(s):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
