"""A real Slurm (Debian's slurmctld, two slurmd, munge, on 127.0.0.1) and the real agent daemon.

A batch job spans both nodes; its script traps the signal and each node writes its checkpoint and a
commit file. A spot notice on n1's agent (IMDS simulator) drains n1 in Slurm with a reason naming the
notice, signals the job on both nodes (scancel --signal=USR1 --full), waits for both commit files,
uploads n1's checkpoint to S3 (moto), and requeues the job; sinfo and squeue show it.
"""

from __future__ import annotations

import json
import os
import time

from agent.sim.imds_server import IMDSSimulator
from tests.daemon_harness import AgentProcess, wait_file
from tests.engines.slurm_cluster import agent_config

JOB = r"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --job-name=gang
# The batch shell gets the signal too (--full): it only waits for the steps.
trap 'echo "batch shell got USR1"' USR1
srun --kill-on-bad-exit=0 bash -c '
  node=$SLURMD_NODENAME
  ck=ROOT/ckpt/$node; mkdir -p $ck ROOT/commit/$SLURM_JOB_ID
  step=0
  save() {
    mkdir -p $ck/step-$step
    echo "node $node step $step" > $ck/step-$step/state.txt
    touch $ck/step-$step/DONE
    touch ROOT/commit/$SLURM_JOB_ID/$node.done
    echo "saved step $step on $node"
  }
  trap save USR1
  echo running > ROOT/running-$node
  while true; do step=$((step+1)); sleep 0.2 & wait $!; done
' &
wait $!
wait $!
"""


def wait_for(fn, timeout=30.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_spot_notice_on_one_node_drains_it_signals_the_job_on_both_and_requeues(slurm_fresh, local_aws, aws, tmp_path):
    slurm = slurm_fresh
    root = str(tmp_path)
    script = os.path.join(root, "job.sh")
    with open(script, "w") as fh:
        fh.write(JOB.replace("ROOT", root))
    aws.s3.create_bucket(Bucket="gang")
    job_id = slurm.sbatch(script, "-o", os.path.join(root, "job-%j.out"))
    wait_for(lambda: os.path.exists(f"{root}/running-n1") and os.path.exists(f"{root}/running-n2"), 30, "the job on both nodes")

    sim = IMDSSimulator(port=0).start()
    state_dir = os.path.join(root, "state")
    config = agent_config(root, sim.url, local_aws.url) + f"""
[drain]
margin = 5
[drain.workload]
checkpoint_timeout = 30
[slurm]
node = "n1"
conf = "{slurm.conf}"
bin_dir = "/usr/bin"
signal = "USR1"
commit_file = "{root}/commit/{{job_id}}/{{node}}.done"
requeue = true
[[checkpoints]]
dir = "{root}/ckpt/n1"
s3 = "s3://gang/run-1/"
marker = "DONE"
interval = 0
restore = false
"""
    agent = AgentProcess(tmp_path, config)
    try:
        agent.wait_ready(30)
        sim.control("spot", {"action": "terminate", "in": 120})
        wait_file(os.path.join(state_dir, "status.json"), 60, contains='"state": "drained"')
        status = json.load(open(os.path.join(state_dir, "status.json")))
        steps = {s["name"]: s for s in status["drain"]["steps"]}
        assert [s["name"] for s in status["drain"]["steps"]][:3] == ["scheduler", "notify", "wait"], agent.log()
        assert steps["scheduler"]["state"] == "ok", steps
        assert f"SIGUSR1 to job {job_id} on n1,n2" in steps["scheduler"]["reason"]
        assert steps["wait"]["state"] == "ok" and "2 commit file(s) of 1 job(s) written" in steps["wait"]["reason"], steps
        assert steps["upload"]["state"] == "ok", steps
        assert steps["requeue"]["state"] == "ok" and f"job {job_id} requeued" in steps["requeue"]["reason"], steps
    finally:
        agent.stop()
        sim.stop()

    # both nodes checkpointed the step they were at when the signal came
    for node in ("n1", "n2"):
        assert os.path.exists(f"{root}/commit/{job_id}/{node}.done")
        assert any(os.path.exists(os.path.join(root, "ckpt", node, d, "DONE")) for d in os.listdir(f"{root}/ckpt/{node}"))
    # n1 is drained in Slurm, with a reason naming the notice and its deadline (sinfo shows it)
    info = slurm.node_info("n1")
    assert "DRAIN" in info["State"], info
    assert info["Reason"].startswith("spot-agent: spot-interruption/terminate, deadline 20"), info
    sinfo = slurm.run(["sinfo", "--Node", "--noheader", "--format=%N %T %E"]).stdout
    assert any(line.startswith("n1 drain") and "spot-interruption" in line for line in sinfo.splitlines()), sinfo
    # the job was requeued (squeue shows it pending again, restarted once)
    jobs = {str(j["job_id"]): j for j in slurm.jobs()}
    assert jobs[job_id]["job_state"] in ("PENDING", "REQUEUED", "CONFIGURING"), jobs[job_id]["job_state"]
    assert jobs[job_id]["restart_cnt"] == 1
    # n1's checkpoint is committed in S3
    keys = [o["Key"] for o in aws.s3.list_objects_v2(Bucket="gang", Prefix="run-1/").get("Contents", [])]
    assert any(k.startswith("run-1/manifests/") for k in keys) and any(k.endswith("/state.txt") for k in keys), keys


def test_rebalance_drains_the_node_only_and_resumes_it_when_no_interruption_follows(slurm_fresh, tmp_path):
    from agent.clock import SYSTEM_CLOCK
    from agent.config import parse
    from agent.runner import Runner
    from agent.schedulers import Schedulers
    from agent.state import StateStore

    slurm = slurm_fresh
    cfg = parse(f'[slurm]\nnode = "n2"\nconf = "{slurm.conf}"\nbin_dir = "/usr/bin"\n'
                f'rebalance_drain = true\nrebalance_resume_after = 0.5\n')
    s = Schedulers(cfg, Runner(), StateStore(str(tmp_path / "state.json")), SYSTEM_CLOCK).prepare()
    assert s.active() == ["slurm"]
    assert s.rebalance("rebalance-recommendation") == ["slurm: node n2 drained"]
    info = slurm.node_info("n2")
    assert "DRAIN" in info["State"] and info["Reason"].startswith("spot-agent: rebalance recommendation"), info
    wait_for(lambda: "DRAIN" not in slurm.node_info("n2")["State"], 15, "n2 resumed after the quiet period")
    assert slurm.node_states()["n2"].startswith("IDLE")
    s.close()


LIGHTNING_JOB = r"""#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --job-name=lightning
trap 'echo "batch shell got USR1"' USR1
srun PYTHON JOB ROOT &
wait $!
wait $!
"""


def test_lightning_slurm_auto_requeue_under_the_agent(slurm_fresh, local_aws, aws, tmp_path):
    """The realistic case: a real Lightning fit (its Slurm auto-requeue on SIGUSR1) under the agent.
    The notice drains the job's node and signals the job; Lightning saves hpc_ckpt_1.ckpt and requeues
    itself ([slurm] requeue = false: left to the job); the agent waits for the commit, uploads the
    checkpoint, and the requeued job resumes from it on the other node at the saved step."""
    from tests.engines.ray_cluster import REPO

    torch_python = os.path.join(REPO, ".venv-torch", "bin", "python")
    assert os.path.exists(torch_python), "scripts/setup-test-env.sh makes .venv-torch (torch 2.13.0 + lightning)"
    slurm = slurm_fresh
    root = str(tmp_path)
    script = os.path.join(root, "job.sh")
    with open(script, "w") as fh:
        fh.write(LIGHTNING_JOB.replace("PYTHON", torch_python).replace("JOB", os.path.join(REPO, "tests", "engines", "lightning_job.py"))
                 .replace("ROOT", root))
    aws.s3.create_bucket(Bucket="lightning")
    job_id = slurm.sbatch(script, "-o", os.path.join(root, "job.out"))
    wait_for(lambda: os.path.exists(f"{root}/training"), 120, "Lightning training")
    node = {str(j["job_id"]): j for j in slurm.jobs()}[job_id]["batch_host"]
    other = "n2" if node == "n1" else "n1"
    sim = IMDSSimulator(port=0).start()
    state_dir = os.path.join(root, "state")
    config = agent_config(root, sim.url, local_aws.url) + f"""
[slurm]
node = "{node}"
conf = "{slurm.conf}"
bin_dir = "/usr/bin"
commit_file = "{root}/commit/{{job_id}}/{{node}}.done"
[[checkpoints]]
dir = "{root}/lightning"
s3 = "s3://lightning/run/"
interval = 0
restore = false
"""
    agent = AgentProcess(tmp_path, config)
    try:
        agent.wait_ready(30)
        sim.control("spot", {"action": "terminate", "in": 120})
        wait_file(os.path.join(state_dir, "status.json"), 90, contains='"state": "drained"')
        steps = {s["name"]: s for s in json.load(open(os.path.join(state_dir, "status.json")))["drain"]["steps"]}
        assert steps["scheduler"]["state"] == "ok" and steps["wait"]["state"] == "ok", (steps, agent.log())
        assert steps["upload"]["state"] == "ok" and "requeue" not in steps, steps
    finally:
        agent.stop()
        sim.stop()
    keys = [o["Key"] for o in aws.s3.list_objects_v2(Bucket="lightning", Prefix="run/").get("Contents", [])]
    assert any(k.endswith("/hpc_ckpt_1.ckpt") for k in keys), keys
    saved = torch_step(torch_python, os.path.join(root, "lightning", "hpc_ckpt_1.ckpt"))
    # Lightning requeued its own job; it starts again on the other node (ours is drained), at the saved step
    wait_for(lambda: {str(j["job_id"]): j for j in slurm.jobs()}.get(job_id, {}).get("restart_cnt") == 1, 30, "the requeue")
    # a requeued job waits ~120 s for its BeginTime: start it now (test time only)
    wait_for(lambda: os.path.exists(f"{root}/start-1")
             or slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False).returncode == 0,
             60, "the requeued job to be pending")
    wait_for(lambda: os.path.exists(f"{root}/start-1"), 180, "the requeued job to start")
    with open(f"{root}/start-1") as fh:
        assert int(fh.read()) == saved
    assert {str(j["job_id"]): j for j in slurm.jobs()}[job_id]["batch_host"] == other
    assert "DRAIN" in slurm.node_info(node)["State"]


def torch_step(python: str, path: str) -> int:
    import subprocess

    out = subprocess.run([python, "-c", f"import torch; print(torch.load({path!r}, weights_only=False)['global_step'])"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())
