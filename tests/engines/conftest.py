"""Real job schedulers for the multi-node tests, started once per session and stopped by PID.

- ``slurm``: munged, slurmctld and two slurmd (n1, n2) on 127.0.0.1 under a temp dir
  (tests/engines/slurm_cluster.py);
- ``ray_cluster``: a Ray head and a worker node on 127.0.0.1 only, from the .venv-ray that
  scripts/setup-test-env.sh makes (tests/engines/ray_cluster.py). Never ``ray stop``: it would kill
  every Ray on the machine.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from tests.engines import ray_cluster as ray_mod
from tests.engines import slurm_cluster


@pytest.fixture(scope="session")
def slurm():
    why = slurm_cluster.available()
    if why:
        pytest.fail(f"Slurm cannot run here: {why}")
    # munged wants every directory above its socket searchable by all: not pytest's 0700 tmp dirs.
    root = tempfile.mkdtemp(prefix="spot-agent-slurm-", dir="/tmp")
    cluster = slurm_cluster.SlurmCluster(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm_fresh(slurm):
    """The cluster with no jobs and both nodes back in service after the test."""
    yield slurm
    slurm.run(["scancel", "--full", "--user=root"], check=False)
    import time

    end = time.monotonic() + 30
    while time.monotonic() < end and slurm.jobs():
        time.sleep(0.2)
    for node in slurm.NODES:
        slurm.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False)
    slurm.wait_idle()


@pytest.fixture(scope="session")
def ray_cluster():
    why = ray_mod.available()
    if why:
        pytest.fail(f"Ray cannot run here: {why}")
    root = tempfile.mkdtemp(prefix="spot-agent-ray-", dir="/tmp")
    cluster = ray_mod.RayCluster(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
