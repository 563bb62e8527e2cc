"""The agent config each demo instance boots with (pure: settings and paths in, TOML text out).

It is an ordinary config, the kind a user writes, with three differences the demo says out loud: the
endpoints point at the embedded simulators, the host tree (``dev_root``/``sys_root``) is the block
device simulation's, and the notice window and drain reserves are scaled down so the story fits in
a minute (AWS gives 120 s; the demo gives ``notice_window``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from agent.demo.environment import BUCKET, CHECKPOINT_PREFIX, DATASET_PREFIX, RUN


@dataclass
class DemoSettings:
    notice_window: float = 40.0  # seconds between the spot notice and the (simulated) termination
    margin: float = 5.0
    snapshot_reserve: float = 5.0
    upload_reserve: float = 8.0
    lifecycle_reserve: float = 2.0
    checkpoint_timeout: float = 15.0  # longest the drain waits for the toy workload's final checkpoint
    shutdown_budget: float = 30.0
    poll_interval: float = 0.2
    slow_poll_interval: float = 0.5
    imds_backoff_max: float = 8.0  # the agent's default; the flapping test lowers it
    rebalance: str = "checkpoint"
    step_seconds: float = 0.1  # the toy workload's training step
    checkpoint_every: int = 10  # steps between its periodic checkpoints
    checkpoint_bytes: int = 2 * 1024 * 1024  # payload per checkpoint
    train_steps_before_notice: int = 40
    s3_checkpoints: Optional[bool] = None  # None: when agent.transfer.checkpoints is there
    dataset_background: bool = False


@dataclass
class InstancePaths:
    root: str
    state_dir: str
    socket: str
    data_dir: str
    volume_mount: str  # the checkpoint volume (a directory when there are no block devices)
    checkpoint_dir: str  # where the toy workload writes: on the checkpoint volume
    pidfile: str
    config: str
    agent_log: str
    workload_log: str
    notify_socket: str


def paths_for(root: str) -> InstancePaths:
    import os

    mnt = os.path.join(root, "mnt", "ckpt")
    return InstancePaths(
        root=root, state_dir=os.path.join(root, "state"), socket=os.path.join(root, "agent.sock"),
        data_dir=os.path.join(root, "data"), volume_mount=mnt, checkpoint_dir=os.path.join(mnt, "run"),
        pidfile=os.path.join(root, "trainer.pid"), config=os.path.join(root, "agent.toml"),
        agent_log=os.path.join(root, "agent.log"), workload_log=os.path.join(root, "trainer.log"),
        notify_socket=os.path.join(root, "notify.sock"),
    )


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for the paths used here


def render(paths: InstancePaths, settings: DemoSettings, imds_url: str, aws_url: str, *, block_devices: bool,
           dev_root: str = "", sys_root: str = "", s3_checkpoints: bool = False, extra: str = "") -> str:
    s = settings
    lines = [
        "# spot-agent config written by `spot-agent demo` for one simulated instance.",
        f"# Simulated notice window: {s.notice_window:g} s (AWS gives 120 s); drain reserves scaled down to fit.",
        "[agent]",
        f"state_dir = {_q(paths.state_dir)}",
        f"socket = {_q(paths.socket)}",
        f"run = {_q(RUN)}",
        "",
        "[imds]",
        f"endpoint = {_q(imds_url)}",
        f"poll_interval = {s.poll_interval}",
        f"slow_poll_interval = {s.slow_poll_interval}",
        f"backoff_max = {s.imds_backoff_max}",
        "",
        "[aws]",
        f"endpoint_url = {_q(aws_url)}",
        'region = "us-east-1"',
        "",
        "[metrics]",
        "enabled = false",
        "",
    ]
    if block_devices:
        lines += [
            "[host]",
            f"dev_root = {_q(dev_root)}",
            f"sys_root = {_q(sys_root)}",
            f"fstab = {_q(paths.root + '/fstab')}",
            f"unit_dir = {_q(paths.root + '/units')}",
            "",
            "# The checkpoint volume: the newest snapshot of it if there is one, else a new empty volume.",
            "[[volumes]]",
            'name = "ckpt"',
            f"mount = {_q(paths.volume_mount)}",
            'fs = "ext4"',
            f'latest_snapshot = {{ "spot-agent:volume" = "ckpt", "spot-agent:run" = {_q(RUN)} }}',
            "create = { size_gib = 1, encrypted = false }",
            "",
        ]
    lines += [
        "[[datasets]]",
        f"source = {_q(f's3://{BUCKET}/{DATASET_PREFIX}')}",
        f"dest = {_q(paths.data_dir)}",
        f"background = {'true' if s.dataset_background else 'false'}",
        "",
    ]
    if s3_checkpoints:
        lines += [
            "[[checkpoints]]",
            f"dir = {_q(paths.checkpoint_dir)}",
            f"s3 = {_q(f's3://{BUCKET}/{CHECKPOINT_PREFIX}')}",
            "interval = 0",
            "# The trainer writes each checkpoint atomically (temp file, rename), so the rebalance upload need",
            "# not wait for files to settle; the drain's final upload takes the confirmed checkpoint anyway.",
            "settle = 0",
            "keep = 3",
            "",
        ]
    lines += [
        "[drain]",
        f"margin = {s.margin}",
        f"snapshot_reserve = {s.snapshot_reserve}",
        f"upload_reserve = {s.upload_reserve}",
        f"lifecycle_reserve = {s.lifecycle_reserve}",
        f"shutdown_budget = {s.shutdown_budget}",
        f"rebalance = {_q(s.rebalance)}",
        "",
        "[drain.workload]",
        f"pidfile = {_q(paths.pidfile)}",
        f"checkpoint_timeout = {s.checkpoint_timeout}",
        "",
        "[drain.lifecycle]",
        "heartbeat_interval = 5",
        "",
    ]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)
