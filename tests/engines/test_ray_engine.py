"""A real Ray cluster (head + worker on 127.0.0.1, from .venv-ray) and the real agent daemon on the worker.

A spot notice on the worker node's agent drains that node through Ray's own API: the GCS shows it
DRAINING, with the preemption reason and a deadline about the notice's seconds left from now.
"""

from __future__ import annotations

import json
import os
import time

from agent.sim.imds_server import IMDSSimulator
from tests.daemon_harness import AgentProcess, wait_file
from tests.engines.ray_cluster import LAUNCHER, PYTHON, start_busy_driver
from tests.engines.slurm_cluster import agent_config


def test_spot_notice_on_the_worker_drains_it_in_ray_with_the_preemption_reason_and_deadline(ray_cluster, tmp_path):
    driver = start_busy_driver(ray_cluster, os.path.join(str(tmp_path), "driver.log"))
    sim = IMDSSimulator(port=0).start()
    root = str(tmp_path)
    state_dir = os.path.join(root, "state")
    config = agent_config(root, sim.url) + f"""
[slurm]
enabled = false
[ray]
enabled = true
command = ["{PYTHON}", "{LAUNCHER}"]
python = "{PYTHON}"
address = "{ray_cluster.address}"
node_name = "worker"
"""
    agent = AgentProcess(tmp_path, config, env={"RAY_USAGE_STATS_ENABLED": "0"})
    try:
        agent.wait_ready(60)
        sim.control("spot", {"action": "terminate", "in": 120})
        noticed = time.time()
        wait_file(os.path.join(state_dir, "status.json"), 90, contains='"state": "drained"')
        status = json.load(open(os.path.join(state_dir, "status.json")))
        steps = {s["name"]: s for s in status["drain"]["steps"]}
        assert steps["scheduler"]["state"] == "ok", (steps, agent.log())
        assert "draining (preemption" in steps["scheduler"]["reason"]
        nodes = {n["node_name"]: n for n in ray_cluster.nodes()}
        worker, head = nodes["worker"], nodes["head"]
        assert worker["state"] == "ALIVE" and worker["draining"], worker
        assert head["state"] == "ALIVE" and not head["draining"], head
        # the raylet that got the drain says which reason, which message and which deadline
        requests = ray_cluster.drain_requests()
        assert len(requests) == 1, requests
        req = requests[0]
        assert req["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
        assert req["message"].startswith("spot-agent: spot-interruption/terminate, ") and req["message"].endswith("s left")
        assert abs(req["deadline_ms"] / 1000 - (noticed + 120)) < 15, (req, noticed)
    finally:
        agent.stop()
        sim.stop()
        driver.kill()
        driver.wait()
