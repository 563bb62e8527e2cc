"""Fixtures for tests on real loop devices: a local EC2 host (moto + LocalBlockDevices), an instance,
and a VolumeManager factory. Every mount and loop device made under the test's directory is undone in
teardown, even when the test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, List

import pytest

MiB = 1024 * 1024


def _mounts_under(root: str) -> List[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4]
            if mp.startswith(root + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def _loops_backed_by(root: str) -> List[str]:
    res = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n", "-l"], capture_output=True, text=True)
    out = []
    for line in res.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(root + "/"):
            out.append(parts[0])
    return out


def release_everything(root: str) -> None:
    """Unmount (then lazily) everything under ``root`` and detach loops backed by files under it."""
    for mp in _mounts_under(root):
        subprocess.run(["fsfreeze", "--unfreeze", mp], capture_output=True)
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
    for loop in _loops_backed_by(root):
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@pytest.fixture
def scratch_dir():
    root = tempfile.mkdtemp(prefix="spot-vol-", dir="/tmp")
    try:
        yield root
    finally:
        release_everything(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def loopdev(scratch_dir) -> Callable[..., str]:
    """Make a loop device over a sparse file under the scratch dir; detached in teardown."""
    made: List[str] = []

    def make(size: int = 400 * MiB, name: str = "") -> str:
        path = os.path.join(scratch_dir, name or f"raw-{len(made)}.img")
        with open(path, "wb") as fh:
            fh.truncate(size)
        loop = subprocess.run(["losetup", "--find", "--show", path], capture_output=True, text=True, check=True).stdout.strip()
        made.append(loop)
        return loop

    yield make
    for loop in made:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@pytest.fixture
def blockdevs(aws, scratch_dir):
    """LocalBlockDevices installed into the in-process moto server; torn down after the test."""
    from agent.sim.blockdevs import LocalBlockDevices

    sim = LocalBlockDevices(os.path.join(scratch_dir, "files"), os.path.join(scratch_dir, "dev"),
                            os.path.join(scratch_dir, "sys"), size_cap=1024 * MiB, bytes_per_gib=400 * MiB)
    sim.install()
    try:
        yield sim
    finally:
        release_everything(scratch_dir)
        sim.cleanup()


@pytest.fixture
def instance(aws):
    from agent.identity import InstanceIdentity

    inst = aws.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="m5.large")["Instances"][0]
    return InstanceIdentity(instance_id=inst["InstanceId"], instance_type="m5.large",
                            availability_zone=inst["Placement"]["AvailabilityZone"], region="us-east-1")


@dataclass
class Host:
    aws: Any
    sim: Any
    identity: Any
    root: str

    def manager(self, volumes, state_name: str = "state.json", clients: Any = "default"):
        from agent.config import HostSection
        from agent.runner import Runner
        from agent.state import StateStore
        from agent.volumes.manager import VolumeManager

        host = HostSection(dev_root=self.sim.dev_root, sys_root=self.sim.sys_root,
                           fstab=os.path.join(self.root, "fstab"), unit_dir=os.path.join(self.root, "units"))
        state = StateStore(os.path.join(self.root, state_name))
        return VolumeManager(volumes, host, self.aws if clients == "default" else clients, self.identity, state, Runner())

    def mnt(self, name: str) -> str:
        return os.path.join(self.root, "mnt", name)


@pytest.fixture
def host(aws, blockdevs, instance, scratch_dir) -> Host:
    return Host(aws, blockdevs, instance, scratch_dir)


def device_sha256(device: str) -> str:
    """Hash of every byte of a device (or file): "untouched" means this did not change."""
    import hashlib

    h = hashlib.sha256()
    with open(device, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def volume(name: str, mount: str, **kw: Any):
    """A VolumeSection built through the real config parser (so defaults and validation apply)."""
    from agent.config import Config, parse

    lines = [f'name = "{name}"', f'mount = "{mount}"']
    for k, v in kw.items():
        lines.append(f"{k} = {_toml(v)}")
    cfg: Config = parse("[[volumes]]\n" + "\n".join(lines) + "\n")
    return cfg.volumes[0]


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(x)}' for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(v)
