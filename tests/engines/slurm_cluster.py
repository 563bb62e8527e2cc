"""A real Slurm cluster on 127.0.0.1 for the tests: munged, slurmctld and two slurmd (n1, n2).

Debian's Slurm 22.05 is built with multiple-slurmd support, so both nodes run on this host, each
slurmd on its own port. Everything (keys, sockets, state, spool, logs) lives under one temp dir; the
daemons are ours, started by PID and stopped by PID in the order the test environment notes ask for:
jobs cancelled and the queue empty, then slurmd, then slurmctld, then munged (otherwise slurmstepd
hangs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> Optional[str]:
    """Why a Slurm cluster cannot start here, or None."""
    for tool in ("munged", "mungekey", "slurmctld", "slurmd", "scontrol", "squeue", "sbatch", "sinfo"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (scripts/setup-test-env.sh installs Slurm from Debian)"
    if os.geteuid() != 0:
        return "the local Slurm runs as root (SlurmUser=root)"
    return None


def _sbin(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


class SlurmCluster:
    NODES = ("n1", "n2")

    def __init__(self, root: str) -> None:
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs: Dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        r = self.root
        os.makedirs(r, exist_ok=True)
        os.chmod(r, 0o755)
        for d in ("munge", "state", "log"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        for n in self.NODES:
            os.makedirs(os.path.join(r, "spool", n), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o755)
        key = os.path.join(r, "munge", "munge.key")
        if not os.path.exists(key):
            subprocess.run([_sbin("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        self.munge_socket = os.path.join(r, "munge", "munge.socket")
        subprocess.run([_sbin("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                        f"--seed-file={r}/munge/munged.seed"], check=True, capture_output=True)
        self.procs["munged"] = self._pid(f"{r}/munge/munged.pid")
        ctld, p1, p2 = free_port(), free_port(), free_port()
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=spotagent
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
KillWait=2
MinJobAge=2
InactiveLimit=0
SlurmdTimeout=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={p1} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={p2} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        self.procs["slurmctld"] = self._spawn([_sbin("slurmctld"), "-D", "-f", self.conf], "slurmctld")
        for n in self.NODES:
            self.procs[f"slurmd-{n}"] = self._spawn([_sbin("slurmd"), "-D", "-f", self.conf, "-N", n], f"slurmd-{n}")
        self.wait_idle()
        return self

    def _spawn(self, argv: List[str], name: str) -> int:
        out = open(os.path.join(self.root, "log", f"{name}.out"), "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        out.close()
        return proc.pid

    @staticmethod
    def _pid(path: str) -> int:
        for _ in range(100):
            try:
                with open(path) as fh:
                    return int(fh.read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"no pid in {path}")

    def wait_idle(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            states = self.node_states()
            if states and all(s.startswith("IDLE") for s in states.values()) and len(states) == len(self.NODES):
                return
            time.sleep(0.3)
        raise RuntimeError(f"slurm nodes not idle after {timeout}s: {self.node_states()}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name), errors="replace") as fh:
                out.append(f"--- {name}\n" + fh.read()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel jobs, wait for an empty queue, then stop slurmd, slurmctld, munged (in that order)."""
        try:
            self.run(["scancel", "--full", "--user=root"], check=False)
            end = time.monotonic() + 30
            while time.monotonic() < end and self.jobs():
                time.sleep(0.3)
        except Exception:  # noqa: BLE001 - stop the daemons whatever happened
            pass
        for name in [f"slurmd-{n}" for n in self.NODES] + ["slurmctld", "munged"]:
            pid = self.procs.pop(name, None)
            if pid is not None:
                _terminate(pid)

    # -- commands -------------------------------------------------------------------------------
    def run(self, argv: List[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def node_states(self) -> Dict[str, str]:
        res = self.run(["sinfo", "--Node", "--noheader", "--format=%N %T"], check=False)
        out = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1].upper()
        return out

    def node_info(self, node: str) -> Dict[str, str]:
        res = self.run(["scontrol", "--oneliner", "show", "node", node])
        out = {}
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out[k] = v
        reason = res.stdout.split("Reason=", 1)
        if len(reason) == 2:
            out["Reason"] = reason[1].strip()
        return out

    def jobs(self) -> List[dict]:
        res = self.run(["squeue", "--json"], check=False)
        try:
            return list(json.loads(res.stdout).get("jobs", []))
        except ValueError:
            return []

    def sbatch(self, script: str, *args: str) -> str:
        res = self.run(["sbatch", "--parsable", *args, script])
        return res.stdout.strip().split(";")[0]


def _terminate(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def agent_config(root: str, imds_url: str, aws_url: str = "") -> str:
    """The part of an engine test's agent config every test shares: state under ``root``, the IMDS
    simulator polled fast, moto when given, no metrics listener, no Auto Scaling lifecycle."""
    aws = f'[aws]\nendpoint_url = "{aws_url}"\nregion = "us-east-1"\n' if aws_url else ""
    return (f'[agent]\nstate_dir = "{root}/state"\nsocket = "{root}/agent.sock"\n'
            f'[imds]\nendpoint = "{imds_url}"\npoll_interval = 0.1\n{aws}'
            '[metrics]\nenabled = false\n[drain.lifecycle]\nenabled = false\n')
