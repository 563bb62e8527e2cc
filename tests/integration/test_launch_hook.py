"""The launching lifecycle hook through the real daemon and moto's Auto Scaling (with the local
CompleteLifecycleAction/RecordLifecycleActionHeartbeat): heartbeats while a slow pre-warm runs,
CONTINUE once READY, ABANDON when startup fails."""

from __future__ import annotations

import time

from agent.sim.imds_server import Identity, IMDSSimulator
from agent.sim.localaws import lifecycle_calls
from tests.daemon_harness import AgentProcess
from tests.integration.drain_helpers import asg_identity

GROUP = "train-launch"
HOOK = "warm-before-service"


def launched_instance(aws) -> str:
    return asg_identity(aws, GROUP, HOOK, "autoscaling:EC2_INSTANCE_LAUNCHING").instance_id


def config(tmp_path, sim, aws, dataset_bucket: str) -> str:
    return f'''
[agent]
state_dir = "{tmp_path}/state"
socket = "{tmp_path}/state/agent.sock"
[imds]
endpoint = "{sim.url}"
[aws]
region = "us-east-1"
endpoint_url = "{aws.url}"
[metrics]
enabled = false
[fleet]
launch_heartbeat_interval = 1
[transfer]
max_bandwidth = 1000000
[[datasets]]
source = "s3://{dataset_bucket}/corpus/"
dest = "{tmp_path}/data"
'''


def ours(instance_id, call):
    return [c for c in lifecycle_calls(call) if c["instance_id"] == instance_id and c["hook"] == HOOK]


def test_continue_at_ready_after_heartbeats_during_a_slow_prewarm(aws, tmp_path):
    iid = launched_instance(aws)
    aws.s3.create_bucket(Bucket="warm")
    for i in range(3):
        aws.s3.put_object(Bucket="warm", Key=f"corpus/shard-{i}.bin", Body=bytes([i]) * 1_000_000)
    sim = IMDSSimulator(port=0, identity=Identity(instance_id=iid)).start()
    a = AgentProcess(tmp_path, config(tmp_path, sim, aws, "warm"))
    try:
        a.wait_ready(timeout=40)
        end = time.monotonic() + 10
        while time.monotonic() < end and not ours(iid, "CompleteLifecycleAction"):
            time.sleep(0.1)
        [done] = ours(iid, "CompleteLifecycleAction")
        assert done["result"] == "CONTINUE" and done["group"] == GROUP
        beats = ours(iid, "RecordLifecycleActionHeartbeat")
        assert len(beats) >= 2, a.log()  # ~3 s of pre-warm at 1 MB/s, a heartbeat every second
        assert all(b["at"] <= done["at"] for b in beats)
        time.sleep(1.5)
        assert len(ours(iid, "RecordLifecycleActionHeartbeat")) == len(beats)  # heartbeats stop at READY
    finally:
        a.stop()
        sim.stop()


def test_abandon_when_startup_fails(aws, tmp_path):
    iid = launched_instance(aws)
    sim = IMDSSimulator(port=0, identity=Identity(instance_id=iid)).start()
    a = AgentProcess(tmp_path, config(tmp_path, sim, aws, "no-such-bucket"))
    try:
        assert a.wait_exit(timeout=40) == 1
        [done] = ours(iid, "CompleteLifecycleAction")
        assert done["result"] == "ABANDON"
    finally:
        a.stop()
        sim.stop()
