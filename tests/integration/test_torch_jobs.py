"""Real training jobs under the drain: torchrun with two CPU ranks (gloo on 127.0.0.1) saving with
torch.distributed.checkpoint, PyTorch Lightning and the Hugging Face Trainer, each from
.venv-torch (torch==2.13.0; scripts/setup-test-env.sh builds it). The agent side is the real
drain (loop-device volume, moto over HTTP, the checkpoint store); the job side imports
spot_agent_job through the PYTHONPATH of the env file the agent wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from typing import Dict, List

import pytest

from agent.config import CheckpointSection, TransferSection, parse
from agent.events import Event
from agent.transfer.checkpoints import CheckpointStore
from tests.integration.drain_helpers import REPO, drain_env  # noqa: F401

VENV = os.path.join(REPO, ".venv-torch")
JOBS = os.path.join(REPO, "tests", "jobs")


@pytest.fixture(scope="session")
def torch_venv() -> str:
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python):
        pytest.fail(f"{VENV} is missing: run scripts/setup-test-env.sh (it installs torch==2.13.0 there)")
    return VENV


def env_file(path: str) -> Dict[str, str]:
    """The agent's workload.env, read the way systemd's EnvironmentFile= reads it."""
    out = {}
    for line in open(path).read().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Jobs:
    def __init__(self, venv: str, tmp: str) -> None:
        self.venv, self.tmp, self.procs = venv, tmp, []  # type: ignore[var-annotated]

    def start(self, argv: List[str], env: Dict[str, str], log: str) -> subprocess.Popen:
        full = {"PATH": os.environ["PATH"], "HOME": self.tmp, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HOME": os.path.join(self.tmp, "hf"), "PYTHONUNBUFFERED": "1", **env}
        fh = open(os.path.join(self.tmp, log), "w")
        proc = subprocess.Popen(argv, env=full, stdout=fh, stderr=subprocess.STDOUT, cwd=self.tmp,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def torchrun(self, args: List[str], env: Dict[str, str], log: str = "torchrun.log",
                 script: str = os.path.join(JOBS, "ddp_job.py")) -> subprocess.Popen:
        return self.start([os.path.join(self.venv, "bin", "torchrun"), "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0",
                           script, *args], env, log)

    def python(self, script: str, args: List[str], env: Dict[str, str], log: str) -> subprocess.Popen:
        return self.start([os.path.join(self.venv, "bin", "python"), os.path.join(JOBS, script), *args], env, log)

    def log(self, name: str) -> str:
        with open(os.path.join(self.tmp, name)) as fh:
            return fh.read()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=30)


@pytest.fixture
def jobs(torch_venv, tmp_path):
    j = Jobs(torch_venv, str(tmp_path))
    try:
        yield j
    finally:
        j.stop()


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen = None, log=lambda: "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}:\n{log()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log()[-3000:]}")


def spot(seconds: float = 120.0, key: str = "spot:torch") -> Event:
    now = time.time()
    return Event("spot-interruption", "terminate", now + seconds, key, now)


def committed(ck: str) -> List[int]:
    return sorted(int(n[5:]) for n in os.listdir(ck) if n.startswith("step-") and os.path.exists(os.path.join(ck, n, ".metadata")))


def torch_drain(drain_env, workload: str, bucket: str, marker: str = ".metadata"):  # noqa: F811
    """The drain with a volume and an S3 checkpoint store whose marker rule is the job's commit file."""
    ck = os.path.join(drain_env.mnt, "ckpt")
    os.makedirs(ck, exist_ok=True)
    drain_env.aws.s3.create_bucket(Bucket=bucket)
    cfg = drain_env.config(
        extra=f'[[checkpoints]]\ndir = "{ck}"\ns3 = "s3://{bucket}/run/"\nmarker = "{marker}"\nsettle = 1\n',
        workload=workload)
    store = CheckpointStore(drain_env.aws.s3, cfg.checkpoints[0], cfg.transfer, os.path.join(drain_env.root, "ckstate"))
    drainer = drain_env.drainer(cfg, stores=[store])
    return ck, cfg, store, drainer


@pytest.mark.root
def test_torchrun_notice_commit_upload_restore_resume_bit_identical(drain_env, jobs, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    pidfile = os.path.join(drain_env.root, "torchrun.pid")
    ck, cfg, store, drainer = torch_drain(drain_env, f'profile = "torchrun"\npidfile = "{pidfile}"\ncommit_settle = 0.5\n',
                                          "torch-ckpt")
    env = env_file(os.path.join(drain_env.root, "workload.env"))
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "61" and env["SPOT_AGENT_CHECKPOINT_DIR"] == ck
    proc = jobs.torchrun(["--ckpt", ck, "--out", str(out)], env)
    with open(pidfile, "w") as fh:
        fh.write(str(proc.pid))  # torchrun itself: the profile signals the launcher, which forwards
    wait_for(lambda: (out / "rank0.pid").exists() and (out / "rank1.pid").exists(), 180, "both ranks", proc,
             lambda: jobs.log("torchrun.log"))
    time.sleep(1.0)  # a few steps
    report = drainer.run(spot())
    assert report.ok, report.steps
    wait = report.step("wait")
    assert wait.state == "ok" and "step-" in wait.reason, wait.reason
    # torchrun itself exits non-zero after a SIGTERM (SignalException), once its workers have ended. A
    # worker slow to exit on a loaded machine is waited for up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT (61 s
    # here) before torchrun kills it, so 60 s was not enough (seen once in a loaded CI run).
    proc.wait(120)
    assert "Received 15 death signal" in jobs.log("torchrun.log")
    saved = json.loads((out / "saved.json").read_text())
    name = f"step-{saved['step']:06d}"
    assert committed(ck) == [saved["step"]]
    assert report.snapshots and report.step("upload").state == "ok"
    files = {f["path"] for f in store.latest()["files"]}
    assert {f"{name}/.metadata", f"{name}/__0_0.distcp", f"{name}/__1_0.distcp"} <= files

    # a replacement instance: restore from S3 into an empty directory, resume there
    fresh = str(tmp_path / "replacement")
    os.makedirs(fresh)
    restored = CheckpointStore(drain_env.aws.s3, CheckpointSection(dir=fresh, s3="s3://torch-ckpt/run/"),
                               TransferSection(), str(tmp_path / "state2")).restore()
    assert restored.ok, restored.error
    proc2 = jobs.torchrun(["--ckpt", fresh, "--out", str(out), "--resume", "--steps", str(saved["step"])], env,
                          "resume.log")
    assert proc2.wait(180) == 0, jobs.log("resume.log")
    resumed = json.loads((out / "resumed.json").read_text())
    assert resumed == saved  # the same step, every parameter and momentum buffer bit-identical


@pytest.mark.root
def test_ranks_ignoring_the_signal_commit_the_previous_complete_step(drain_env, jobs, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    pidfile = os.path.join(drain_env.root, "torchrun.pid")
    ck, cfg, store, drainer = torch_drain(
        drain_env, f'profile = "torchrun"\npidfile = "{pidfile}"\ncheckpoint_timeout = 4\ncommit_settle = 0.5\n',
        "torch-ignore")
    env = env_file(os.path.join(drain_env.root, "workload.env"))
    proc = jobs.torchrun(["--ckpt", ck, "--out", str(out), "--ignore", "--every", "5", "--stall-after-notice"], env)
    with open(pidfile, "w") as fh:
        fh.write(str(proc.pid))
    wait_for(lambda: len(committed(ck)) >= 1, 180, "a periodic checkpoint", proc, lambda: jobs.log("torchrun.log"))
    report = drainer.run(spot(key="spot:ignored"))
    wait = report.step("wait")
    assert wait.state == "cut" and "ran out" in wait.reason, wait.reason
    assert report.step("snapshot").state == "ok" and report.step("upload").state == "ok", report.steps
    assert report.ok
    steps = [n for n in os.listdir(ck) if n.startswith("step-")]
    half = [n for n in steps if not os.path.exists(os.path.join(ck, n, ".metadata"))]
    assert half, f"the job never started its cut-off save: {steps}"
    assert "stalling before .metadata" in jobs.log("torchrun.log")
    files = {f["path"] for f in store.latest()["files"]}
    in_manifest = {p.split("/")[0] for p in files}
    assert not in_manifest & set(half), "a half-written step was committed"
    newest = max(committed(ck))
    assert f"step-{newest:06d}/.metadata" in files and f"step-{newest:06d}/__1_0.distcp" in files


def test_one_rank_sees_the_signal_and_every_rank_saves_the_same_step(jobs, tmp_path):
    from agent.drain.workload import Workload
    from agent.runner import Runner

    out = tmp_path / "out"
    ck = tmp_path / "ckpt"
    out.mkdir()
    ck.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    rank1 = out / "rank1.pid"
    c = parse(f'[agent]\nsocket = "{run}/agent.sock"\n[drain.workload]\nprofile = "torchrun"\n'
              f'pidfile = "{rank1}"\nkill_whom = "main"\ncommit_dir = "{ck}"\n')
    wl = Workload(c.drain.workload, [], Runner(), socket_path=c.agent.socket)
    assert wl.prepare() == []
    env = env_file(str(run / "workload.env"))
    env["SPOT_AGENT_NOTICE_FILE"] = str(tmp_path / "not-here.json")  # only the signal tells
    proc = jobs.torchrun(["--ckpt", str(ck), "--out", str(out), "--step-seconds", "0.01"], env)
    wait_for(lambda: (out / "rank0.pid").exists() and rank1.exists(), 180, "both ranks", proc,
             lambda: jobs.log("torchrun.log"))
    time.sleep(1.0)
    since = time.time()
    res = wl.notify(spot(), 1.0, 1.0, {"deadline": time.time() + 120})
    assert not res.errors and res.pid == int(rank1.read_text()), res
    waited = wl.wait(wl.conditions("spot-interruption"), 90, since, None)
    assert waited.met, waited
    assert proc.wait(60) == 0, jobs.log("torchrun.log")
    log = jobs.log("torchrun.log")
    steps = {line.split()[1]: int(line.split()[-1]) for line in log.splitlines() if " saved step " in line
             for line in [line[line.index("rank "):]]}
    assert set(steps) == {"0", "1"} and steps["0"] == steps["1"], log[-2000:]
    assert committed(str(ck)) == [steps["0"]]


def _framework_run(drain_env, jobs, tmp_path, profile: str, script: str, bucket: str):  # noqa: F811
    """Start the fit, drain on a spot notice through ``profile``, restore on a "replacement", resume."""
    out = tmp_path / "out"
    out.mkdir()
    pidfile = os.path.join(drain_env.root, "job.pid")
    ck, cfg, store, drainer = torch_drain(drain_env, f'profile = "{profile}"\npidfile = "{pidfile}"\n', bucket,
                                          marker="trainer_state.json" if profile == "huggingface" else "")
    env = env_file(os.path.join(drain_env.root, "workload.env"))
    proc = jobs.python(script, ["--ckpt", ck, "--out", str(out)], env, "fit.log")
    with open(pidfile, "w") as fh:
        fh.write(str(proc.pid))
    wait_for(lambda: (out / "started").exists(), 180, "the fit", proc, lambda: jobs.log("fit.log"))
    time.sleep(3.0)  # into the training loop
    report = drainer.run(spot(key=f"spot:{profile}"))
    assert report.ok, report.steps
    wait = report.step("wait")
    assert wait.state == "ok" and ck in wait.reason, wait.reason
    assert proc.wait(60) == 0, jobs.log("fit.log")
    saved = json.loads((out / "saved.json").read_text())
    assert saved["step"] > 0
    files = {f["path"] for f in store.latest()["files"]}
    fresh = str(tmp_path / "replacement")
    os.makedirs(fresh)
    restored = CheckpointStore(drain_env.aws.s3, CheckpointSection(dir=fresh, s3=f"s3://{bucket}/run/"),
                               TransferSection(), str(tmp_path / "state2")).restore()
    assert restored.ok, restored.error
    proc2 = jobs.python(script, ["--ckpt", fresh, "--out", str(out), "--resume", "--max-steps", str(saved["step"] + 1)],
                        env, "resume.log")
    assert proc2.wait(180) == 0, jobs.log("resume.log")
    resumed = json.loads((out / "resumed.json").read_text())
    assert resumed == {"step": saved["step"], "digest": saved["digest"]}
    return saved, files


@pytest.mark.root
def test_lightning_fit_saves_through_the_callback_and_resumes(drain_env, jobs, tmp_path):  # noqa: F811
    saved, files = _framework_run(drain_env, jobs, tmp_path, "lightning", "lightning_job.py", "lightning-ckpt")
    assert os.path.basename(saved["path"]) in files
    assert "Received SIGTERM" in jobs.log("fit.log")  # every process got it at once (kill_whom = all)


@pytest.mark.root
def test_hf_trainer_saves_through_the_callback_and_resumes(drain_env, jobs, tmp_path):  # noqa: F811
    saved, files = _framework_run(drain_env, jobs, tmp_path, "huggingface", "hf_job.py", "hf-ckpt")
    assert f"checkpoint-{saved['step']}/trainer_state.json" in files
    assert f"checkpoint-{saved['step']}/model.safetensors" in files


def test_the_torchrun_example_saves_on_a_notice_and_resumes(jobs, tmp_path):
    """examples/torchrun_train.py as shipped: the notice file alone makes both ranks commit a step."""
    from agent.drain.workload import Workload
    from agent.runner import Runner

    ck, run = tmp_path / "ckpt", tmp_path / "run"
    ck.mkdir()
    run.mkdir()
    c = parse(f'[agent]\nsocket = "{run}/agent.sock"\n[drain.workload]\nprofile = "torchrun"\ncommit_dir = "{ck}"\n')
    wl = Workload(c.drain.workload, [], Runner(), socket_path=c.agent.socket)
    assert wl.prepare() == []
    env = env_file(str(run / "workload.env"))
    example = os.path.join(REPO, "examples", "torchrun_train.py")
    proc = jobs.torchrun(["--ckpt", str(ck), "--every", "1000000"], env, script=example)
    time.sleep(2.0)
    since = time.time()
    wl.publish(spot(), time.time() + 120, terminal=True)
    waited = wl.wait(["commit", "ack"], 180, since, None, mode="all")
    assert waited.met, (waited, jobs.log("torchrun.log")[-3000:])
    assert proc.wait(60) == 0, jobs.log("torchrun.log")
    [step] = committed_steps = sorted(os.listdir(ck))
    assert waited.checkpoint == str(ck / step) and os.path.exists(ck / step / ".metadata"), committed_steps
    wl.withdraw()
    n = int(step[5:])
    proc2 = jobs.torchrun(["--ckpt", str(ck), "--steps", str(n + 2), "--every", "1"], env, "again.log", script=example)
    assert proc2.wait(180) == 0, jobs.log("again.log")
    assert sorted(os.listdir(ck)) == [step, f"step-{n + 1:08d}", f"step-{n + 2:08d}"]  # resumed after n
