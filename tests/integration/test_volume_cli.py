"""`spot-agent volumes up|list|down` as a separate process: IMDS from the simulator, EC2 from moto over
HTTP, whose EBS volumes are real loop devices (the LocalBlockDevices patch lives in moto's process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


@pytest.fixture
def imds(host):
    from agent.sim.imds_server import Identity, IMDSSimulator

    sim = IMDSSimulator(port=0, identity=Identity(instance_id=host.identity.instance_id, instance_type="m5.large",
                                                  availability_zone=host.identity.availability_zone, region="us-east-1")).start()
    yield sim
    sim.stop()


def _config(host, imds, body: str) -> str:
    path = os.path.join(host.root, "agent.toml")
    with open(path, "w") as fh:
        fh.write(f'[agent]\nstate_dir = "{host.root}/state"\n[imds]\nendpoint = "{imds.url}"\n'
                 f'[aws]\nendpoint_url = "{host.aws.url}"\n'
                 f'[host]\ndev_root = "{host.sim.dev_root}"\nsys_root = "{host.sim.sys_root}"\n'
                 f'fstab = "{host.root}/fstab"\nunit_dir = "{host.root}/units"\n{body}')
    os.chmod(path, 0o600)
    return path


def _cli(*args: str):
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=env, timeout=180)


def test_up_list_down_by_hand(host, imds):
    vid = host.aws.ec2.create_volume(AvailabilityZone=host.identity.availability_zone, Size=1)["VolumeId"]
    mnt = host.mnt("ckpt")
    cfg = _config(host, imds, f'[[volumes]]\nname = "ckpt"\nmount = "{mnt}"\nfs = "ext4"\nvolume_id = "{vid}"\nformat_existing = "if-never-written"\n'
                              f'[[volumes]]\nname = "scratch"\nmount = "{host.mnt("scratch")}"\ncreate = {{ size_gib = 1 }}\n')
    up = _cli("volumes", "up", "ckpt", "--config", cfg)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"ckpt: ok ({vid} " in up.stdout and "formatted" in up.stdout
    assert "attaching" in up.stderr  # progress lines
    assert os.path.ismount(mnt) and not os.path.ismount(host.mnt("scratch"))

    ls = _cli("volumes", "list", "--json", "--config", cfg)
    assert ls.returncode == 0, ls.stderr
    rows = {r["name"]: r for r in json.loads(ls.stdout)}
    assert rows["ckpt"]["mounted"] and rows["ckpt"]["volume_id"] == vid and rows["ckpt"]["fs"] == "ext4"
    assert rows["ckpt"]["device"] == host.sim.loop_device(vid) and rows["ckpt"]["size_bytes"] > 300 << 20
    assert not rows["scratch"]["mounted"]
    table = _cli("volumes", "list", "--config", cfg).stdout
    assert table.splitlines()[0].split() == ["NAME", "VOLUME", "DEVICE", "MOUNT", "FS", "SIZE", "USED", "STATUS"]

    bad = _cli("volumes", "up", "nope", "--config", cfg)
    assert bad.returncode == 2 and "no [[volumes]] named nope" in bad.stderr

    down = _cli("volumes", "down", "--json", "--config", cfg)
    assert down.returncode == 0, down.stdout + down.stderr
    results = {r["name"]: r for r in json.loads(down.stdout)}
    assert "unmounted" in results["ckpt"]["actions"] and "detached" in results["ckpt"]["actions"]
    assert not os.path.ismount(mnt) and host.sim.loop_device(vid) is None
    vol = host.aws.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
    assert vol["State"] == "available"


def test_up_exits_1_when_a_volume_fails(host, imds):
    cfg = _config(host, imds, f'[[volumes]]\nname = "x"\nmount = "{host.mnt("x")}"\nvolume_id = "vol-0123456789abcdef0"\n')
    up = _cli("volumes", "up", "--config", cfg)
    assert up.returncode == 1 and "x: FAILED: volume vol-0123456789abcdef0 does not exist" in up.stdout
