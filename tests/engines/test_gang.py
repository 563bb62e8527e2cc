"""A gang of three agents (three simulated instances: three real daemons, three IMDS simulators, one
moto S3) saving one distributed checkpoint.

Each node's agent commits its shard under <s3>/shards/<k>/ through its normal offload; a spot notice
reaches node 0, whose drain commits its shard of the step the job saved at the notice; the step's
run-level manifest is written exactly once (S3 conditional write) by whichever agent saw all three
shards. A replacement restores its shard at the newest complete step; a step with one shard missing
is never restored, the previous complete step is.
"""

from __future__ import annotations

import json
import os
import time

from agent.sim.imds_server import IMDSSimulator
from tests.daemon_harness import AgentProcess, wait_file

BUCKET = "gang-run"
PREFIX = "llm-7/"


def config(root: str, sim_url: str, aws_url: str, ckpt_dir: str, marker: str = "") -> str:
    return f"""
[agent]
state_dir = "{root}/state"
socket = "{root}/agent.sock"
[imds]
endpoint = "{sim_url}"
poll_interval = 0.1
[aws]
endpoint_url = "{aws_url}"
region = "us-east-1"
[metrics]
enabled = false
[slurm]
enabled = false
[drain.lifecycle]
enabled = false
[drain.workload]
marker = "{marker or root + '/never'}"
checkpoint_timeout = 20
[[checkpoints]]
dir = "{ckpt_dir}"
s3 = "s3://{BUCKET}/{PREFIX}"
marker = "DONE"
interval = 0.5
keep = 3
gang = {{ size = 3, shard = "env" }}
"""


def save_step(ckpt_dir: str, step: int, node: int) -> None:
    d = os.path.join(ckpt_dir, f"step-{step}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "shard.bin"), "w") as fh:
        fh.write(f"node {node} step {step}\n")
    with open(os.path.join(d, "DONE"), "w") as fh:
        fh.write("")


def keys(s3, prefix: str):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + prefix).get("Contents", []))


def wait_key(s3, key: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if PREFIX + key in keys(s3, os.path.dirname(key)):
            return json.loads(s3.get_object(Bucket=BUCKET, Key=PREFIX + key)["Body"].read())
        time.sleep(0.2)
    raise AssertionError(f"{key} did not appear; have {keys(s3, '')}")


class Node:
    def __init__(self, tmp_path, k: int, aws_url: str, marker_step: int = 0, restore_into: str = "") -> None:
        self.k = k
        self.root = os.path.join(str(tmp_path), f"node{k}-{int(time.monotonic() * 1000)}")
        os.makedirs(self.root)
        self.ckpt = restore_into or os.path.join(self.root, "ckpt")
        os.makedirs(self.ckpt, exist_ok=True)
        self.sim = IMDSSimulator(port=0).start()
        marker = os.path.join(self.ckpt, f"step-{marker_step}", "DONE") if marker_step else ""
        self.agent = AgentProcess(self.root, config(self.root, self.sim.url, aws_url, self.ckpt, marker),
                                  env={"NODE_RANK": str(k)})

    def status(self):
        return json.load(open(os.path.join(self.root, "state", "status.json")))

    def stop(self):
        self.agent.stop()
        self.sim.stop()


def test_gang_of_three_one_notice_one_run_manifest_replacements_restore_complete_steps(local_aws, aws, tmp_path):
    s3 = aws.s3
    s3.create_bucket(Bucket=BUCKET)
    nodes = [Node(tmp_path, k, local_aws.url, marker_step=20 if k == 0 else 0) for k in range(3)]
    extra = []
    try:
        for n in nodes:
            n.agent.wait_ready(30)
        # the job saves step 10 on every node; their periodic offload completes the step
        for n in nodes:
            save_step(n.ckpt, 10, n.k)
        wait_key(s3, "gang/steps/000000000010.json")

        # the notice reaches node 0 only; the scheduler signalled the job, so every node saves step 20
        nodes[0].sim.control("spot", {"action": "terminate", "in": 120})
        time.sleep(0.5)
        for n in nodes:
            save_step(n.ckpt, 20, n.k)
        wait_file(os.path.join(nodes[0].root, "state", "status.json"), 60, contains='"state": "drained"')
        steps = {s["name"]: s for s in nodes[0].status()["drain"]["steps"]}
        assert steps["wait"]["state"] == "ok" and steps["upload"]["state"] == "ok", (steps, nodes[0].agent.log())
        run20 = wait_key(s3, "gang/steps/000000000020.json")
        assert run20["step"] == 20 and run20["size"] == 3 and sorted(run20["shards"]) == ["0", "1", "2"]
        assert keys(s3, "gang/shards/000000000020/") == [f"{PREFIX}gang/shards/000000000020/{k:05d}.json" for k in range(3)]
        # one run-level manifest per complete step, whoever wrote it (the conditional write)
        assert keys(s3, "gang/steps/") == [f"{PREFIX}gang/steps/000000000010.json", f"{PREFIX}gang/steps/000000000020.json"]
        for k in range(3):
            assert keys(s3, f"shards/{k:05d}/manifests/"), f"shard {k} committed nothing"

        # a replacement for node 0 restores its shard of step 20
        repl = Node(tmp_path, 0, local_aws.url)
        extra.append(repl)
        repl.agent.wait_ready(30)
        with open(os.path.join(repl.ckpt, "step-20", "shard.bin")) as fh:
            assert fh.read() == "node 0 step 20\n"
        repl.stop()

        # nodes 1 and 2 save step 30, but node 0 is gone: step 30 stays incomplete
        for n in nodes[1:]:
            save_step(n.ckpt, 30, n.k)
        wait_key(s3, "gang/shards/000000000030/00002.json")
        wait_key(s3, "gang/shards/000000000030/00001.json")
        time.sleep(1.5)  # more periodic commits of shards 1 and 2 (retention keeps what step 20 needs)
        assert PREFIX + "gang/steps/000000000030.json" not in keys(s3, "gang/steps/")
        # a replacement for node 1 restores step 20, the newest complete one, and not its own step 30
        repl1 = Node(tmp_path, 1, local_aws.url)
        extra.append(repl1)
        repl1.agent.wait_ready(30)
        assert sorted(os.listdir(repl1.ckpt)) == ["step-10", "step-20"]
        with open(os.path.join(repl1.ckpt, "step-20", "shard.bin")) as fh:
            assert fh.read() == "node 1 step 20\n"
        assert json.load(open(os.path.join(repl1.root, "state", "checkpoints", "ckpt.json")))["gang"]["restored_step"] == 20
    finally:
        for n in nodes + extra:
            n.stop()
