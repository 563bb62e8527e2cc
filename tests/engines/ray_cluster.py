"""A Ray head and a worker node on 127.0.0.1 only, from the .venv-ray that scripts/setup-test-env.sh makes.

``ray start`` runs through tests/engines/ray_launcher.py with ``--node-ip-address=127.0.0.1``, no
dashboard and no usage stats. The processes are ours: ``ray start`` daemonizes them, so we find them
by the session directory they were started with (``--temp-dir`` under our own temp dir) and stop them
by PID. Never ``ray stop``: it kills every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(REPO, ".venv-ray")
PYTHON = os.path.join(VENV, "bin", "python")
LAUNCHER = os.path.join(REPO, "tests", "engines", "ray_launcher.py")


def available() -> Optional[str]:
    if not os.path.exists(PYTHON):
        return f"{PYTHON} is missing (scripts/setup-test-env.sh installs ray[default] into .venv-ray)"
    res = subprocess.run([PYTHON, "-c", "import ray"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"ray does not import in .venv-ray: {res.stderr.strip()[-200:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, root: str) -> None:
        self.root = root
        self.temp_dir = os.path.join(root, "ray")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_IMPORT_WARNING="1")
        self.env.pop("RAY_ADDRESS", None)

    def ray(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, LAUNCHER, *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def _common(self) -> List[str]:
        return ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--num-cpus=1",
                f"--min-worker-port={free_port()}", "--max-worker-port=0"]

    def start(self) -> "RayCluster":
        os.makedirs(self.temp_dir, exist_ok=True)
        head = self.ray("start", "--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                        f"--ray-client-server-port={free_port()}",
                        "--node-name=head", *self._common())
        if head.returncode != 0:
            raise RuntimeError(f"ray start --head failed: {head.stdout[-2000:]}\n{head.stderr[-2000:]}")
        worker = self.ray("start", f"--address={self.address}", "--node-name=worker", '--resources={"worker": 1}',
                          *self._common())
        if worker.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start (worker) failed: {worker.stdout[-2000:]}\n{worker.stderr[-2000:]}")
        return self

    def nodes(self) -> List[Dict[str, object]]:
        """Every node as the GCS sees it, with its state (DRAINING shows here, not in ray.nodes())."""
        script = r"""
import json, sys
from ray._raylet import GcsClient
from ray.core.generated import gcs_pb2
out = []
for nid, info in GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).items():
    d = {"node_id": nid.hex(), "node_name": info.node_name, "ip": info.node_manager_address,
         "state": gcs_pb2.GcsNodeInfo.GcsNodeState.Name(info.state),
         "death_reason": gcs_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason) if info.HasField("death_info") else "",
         "death_message": info.death_info.reason_message if info.HasField("death_info") else ""}
    try:
        d["draining"] = bool(info.state_snapshot.state == gcs_pb2.NodeSnapshot.State.DRAINING)
        d["drain_deadline_ms"] = int(info.state_snapshot.drain_deadline_timestamp_ms) if hasattr(info.state_snapshot, "drain_deadline_timestamp_ms") else 0
        d["node_activity"] = list(info.state_snapshot.node_activity)
    except Exception as exc:
        d["snapshot_error"] = str(exc)
    out.append(d)
print(json.dumps(out))
"""
        res = subprocess.run([PYTHON, "-c", script, self.address], capture_output=True, text=True, env=self.env, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"node list failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def drain_requests(self) -> List[Dict[str, object]]:
        """What the raylets logged for each DrainRaylet RPC: the deadline (epoch ms), reason and message.
        (The GCS node table shows DRAINING but not the deadline; the raylet logs both.)"""
        import glob
        import re

        out = []
        pattern = re.compile(r"Drain raylet RPC has received\. Deadline is (\d+)\. Drain reason: (\w+)\. "
                             r"Drain reason message: (.*)$")
        for path in glob.glob(os.path.join(self.temp_dir, "session_latest", "logs", "raylet*.out")):
            with open(path, errors="replace") as fh:
                for line in fh:
                    m = pattern.search(line.rstrip("\n"))
                    if m:
                        out.append({"deadline_ms": int(m.group(1)), "reason": m.group(2), "message": m.group(3),
                                    "log": os.path.basename(path)})
        return out

    def processes(self) -> List[psutil.Process]:
        """Our cluster's processes: those whose command line names our temp dir or GCS port."""
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid != os.getpid() and (self.temp_dir in cmd or f"127.0.0.1:{self.port}" in cmd
                                         or f"--gcs-address=127.0.0.1:{self.port}" in cmd):
                out.append(p)
        seen = {p.pid for p in out}
        for p in list(out):  # task workers rename themselves (ray::IDLE): take the raylets' children too
            try:
                for c in p.children(recursive=True):
                    if c.pid not in seen:
                        seen.add(c.pid)
                        out.append(c)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


DRIVER = r"""
import sys, time
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
import ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)

@ray.remote(resources={"worker": 1}, num_cpus=0)
class Busy:
    def ping(self):
        return "pong"

b = Busy.remote()
assert ray.get(b.ping.remote(), timeout=60) == "pong"
print("busy", flush=True)
time.sleep(600)
"""


def start_busy_driver(cluster: RayCluster, log_path: str) -> subprocess.Popen:
    """A driver holding an actor on the worker node: a busy node drains (DRAINING) instead of exiting."""
    log = open(log_path, "w")
    proc = subprocess.Popen([PYTHON, "-c", DRIVER, cluster.address], stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
    log.close()
    end = time.monotonic() + 90
    while time.monotonic() < end:
        with open(log_path) as fh:
            if "busy" in fh.read():
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    with open(log_path) as fh:
        raise RuntimeError(f"the busy driver did not start: {fh.read()[-2000:]}")
