"""Kill the agent at every point of a drain, restart it, and check the end state: exactly one snapshot,
the filesystem thawed, the lifecycle action completed exactly once, the workload's final checkpoint
on the volume.

The drain runs as a real subprocess (`python -m agent drain`), against moto over HTTP and the IMDS
simulator, on a real loop-device filesystem. The kill is the test seam SPOT_AGENT_TEST_CRASH_AFTER
(agent/drain/crashpoint.py), which exits with os._exit(137) at the named point: no finally blocks run,
exactly like SIGKILL. "frozen" and "snapshot-call" kill the agent while the filesystem is frozen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.sim.imds_server import Identity, IMDSSimulator
from agent.sim.localaws import lifecycle_calls
from tests.integration.drain_helpers import REPO, drain_env, writable  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.slow]

POINTS = ["notify", "wait", "frozen", "snapshot-call", "snapshot", "upload", "retention", "lifecycle"]


@pytest.fixture
def imds(drain_env):
    ident = drain_env.identity
    sim = IMDSSimulator(port=0, identity=Identity(instance_id=ident.instance_id, instance_type=ident.instance_type,
                                                  availability_zone=ident.availability_zone, region=ident.region))
    sim.start()
    yield sim
    sim.stop()


def _drain(config: str, *args: str, crash: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SPOT_AGENT_TEST_CRASH_AFTER", None)
    if crash:
        env["SPOT_AGENT_TEST_CRASH_AFTER"] = crash
    return subprocess.run([sys.executable, "-m", "agent", "drain", "--config", config, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("point", POINTS)
def test_killed_at_each_point_resumes_to_one_snapshot_one_completion(drain_env, imds, point):
    proc = drain_env.start_workload()
    config = drain_env.write_config(imds=imds.url)
    first = _drain(config, "--kind", "spot-interruption", "--deadline-in", "120", crash=point)
    assert first.returncode == 137, first.stderr[-2000:]
    with open(drain_env.state_path) as fh:
        run = json.load(fh)["drain"]["run"]
    assert not run["finished"]
    if point in ("frozen", "snapshot-call"):
        assert drain_env.mnt in drain_env.frozen_records()  # killed while frozen: the record says so
    second = _drain(config, "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout)
    assert report["resumed"] is True and report["ok"] is True, report
    snaps = drain_env.snapshots()
    assert len(snaps) == 1, snaps
    assert report["snapshots"] == {"ckpt": snaps[0]["SnapshotId"]}
    assert len(lifecycle_calls("CompleteLifecycleAction")) == 1
    assert report["lifecycle_completed"] is True
    assert drain_env.frozen_records() == {}
    assert writable(drain_env.mnt)
    assert proc.wait(10) == 0
    assert os.path.exists(drain_env.marker)
    # and a third start finds nothing pending: it drains anew only if asked
    with open(drain_env.state_path) as fh:
        assert json.load(fh)["drain"]["run"]["finished"] is True


def test_dry_run_prints_the_plan_and_touches_nothing(drain_env):
    config = drain_env.write_config()
    out = _drain(config, "--dry-run", "--kind", "spot-interruption", "--deadline-in", "120")
    assert out.returncode == 0, out.stderr
    assert "drain plan for spot-interruption (terminate)" in out.stdout
    assert "snapshot" in out.stdout and "reserved for persistence" in out.stdout
    assert drain_env.snapshots() == []
    assert not lifecycle_calls()


def test_bad_config_is_one_clear_line(drain_env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[drain]\nmargin = -1\n")
    bad.chmod(0o600)
    out = _drain(str(bad), "--dry-run")
    assert out.returncode == 2
    assert "drain.margin" in out.stderr and len(out.stderr.strip().splitlines()) == 1
