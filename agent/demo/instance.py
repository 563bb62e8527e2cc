"""One simulated EC2 instance: its own IMDS, its own disk (a directory), the agent and the workload.

An instance is what the agent can see of one machine: an IMDS simulator answering with the identity
of an instance moto launched, an empty state directory (a new machine remembers nothing), the agent
config, the daemon, and the toy trainer (:mod:`agent.sim.toy_workload`) writing checkpoints onto the
checkpoint volume. ``power_off`` is what EC2 does at the end: processes gone, mounts gone, volumes
detached, the instance terminated in its Auto Scaling group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from agent.demo.agent_config import DemoSettings, InstancePaths, paths_for, render
from agent.demo.agent_process import REPO, AgentProcess
from agent.demo.environment import AZ, INSTANCE_TYPE, REGION, DemoEnvironment, release_host_resources

_START = re.compile(r"toy: starting at step (\d+)")
_FINAL = re.compile(r"toy: final checkpoint at step (\d+)")


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class SimInstance:
    def __init__(self, env: DemoEnvironment, name: str, instance_id: str, settings: DemoSettings,
                 s3_checkpoints: bool = False, extra_config: str = "") -> None:
        from agent.sim.imds_server import Identity, IMDSSimulator

        self.env = env
        self.name = name
        self.instance_id = instance_id
        self.settings = settings
        self.s3_checkpoints = s3_checkpoints
        self.paths: InstancePaths = paths_for(os.path.join(env.workdir, name))
        for d in (self.paths.root, self.paths.state_dir, os.path.dirname(self.paths.volume_mount)):
            os.makedirs(d, exist_ok=True)
        if not env.block_devices:
            os.makedirs(self.paths.volume_mount, exist_ok=True)
        self.imds = IMDSSimulator("127.0.0.1", 0, Identity(instance_id=instance_id, instance_type=INSTANCE_TYPE,
                                                          availability_zone=AZ, region=REGION)).start()
        self._imds_control = self.imds.control
        self.imds.control = self._control  # type: ignore[method-assign]
        self.config_text = render(self.paths, settings, self.imds.url, env.aws_url, block_devices=bool(env.block_devices),
                                  dev_root=env.dev_root, sys_root=env.sys_root, s3_checkpoints=s3_checkpoints,
                                  extra=extra_config)
        with open(self.paths.config, "w") as fh:
            fh.write(self.config_text)
        os.chmod(self.paths.config, 0o600)
        self.agents: List[AgentProcess] = []
        self.workload: Optional[subprocess.Popen] = None
        self._workload_log: Any = None
        self.powered_off = False

    def _control(self, kind: str, args: Any = None) -> Any:
        """IMDS and Auto Scaling together, as on AWS: a spot interruption or an ASG termination of an
        instance in a group with a terminating hook puts it into Terminating:Wait (on the strict local
        AWS, CompleteLifecycleAction is accepted only then)."""
        args = {} if args is None else args
        if kind == "spot" or (kind == "asg" and args.get("state") == "Terminated"):
            self.env.begin_termination(self.instance_id)
        return self._imds_control(kind, args)

    # ---- the agent ------------------------------------------------------------------------------

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    def start_agent(self) -> AgentProcess:
        """Start (or, after a crash, restart) `spot-agent run` on this instance."""
        n = len(self.agents) + 1
        suffix = "" if n == 1 else f"-{n}"
        proc = AgentProcess(self.paths.config, self.paths.agent_log, self.paths.notify_socket + suffix)
        self.agents.append(proc)
        return proc

    def boot(self, timeout: float = 60.0) -> float:
        """Start the agent and wait for READY; returns the READY epoch."""
        return self.start_agent().wait_ready(timeout)

    def status(self) -> Dict[str, Any]:
        return read_json(os.path.join(self.paths.state_dir, "status.json"))

    def state(self) -> Dict[str, Any]:
        return read_json(os.path.join(self.paths.state_dir, "state.json"))

    def drain_record(self, slot: str = "run") -> Dict[str, Any]:
        return (self.state().get("drain") or {}).get(slot) or {}

    def wait_drain(self, slot: str = "run", timeout: float = 60.0) -> Dict[str, Any]:
        """The finished drain record from the agent's state file (steps, timings, report)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            rec = self.drain_record(slot)
            if rec.get("finished"):
                return rec
            if self.agents and not self.agent.alive() and slot == "run":
                raise RuntimeError(f"spot-agent on {self.name} exited before the drain finished:\n{self.agent.log_tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"the {slot} drain on {self.name} did not finish within {timeout:.0f} s:\n{self.agent.log_tail()}")

    def wait_drain_step(self, step: str, state: str = "running", timeout: float = 30.0) -> Dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            rec = self.drain_record()
            if (rec.get("steps") or {}).get(step, {}).get("state") == state:
                return rec
            time.sleep(0.02)
        raise RuntimeError(f"drain step {step} never reached {state!r} on {self.name}:\n{self.agent.log_tail()}")

    def notify_messages(self) -> List[Any]:
        """Every agent run's sd_notify messages, (epoch, line), oldest first."""
        out: List[Any] = []
        for proc in self.agents:
            out += proc.notify.snapshot()
        return sorted(out)

    def volume_record(self, name: str = "ckpt") -> Dict[str, Any]:
        return (self.state().get("volumes") or {}).get(name) or {}

    # ---- the workload ---------------------------------------------------------------------------

    def start_workload(self, extra_args: Optional[List[str]] = None) -> subprocess.Popen:
        s = self.settings
        os.makedirs(self.paths.checkpoint_dir, exist_ok=True)
        self._workload_log = open(self.paths.workload_log, "ab")
        self.workload = subprocess.Popen(
            [sys.executable, "-m", "agent.sim.toy_workload", "--dir", self.paths.checkpoint_dir,
             "--every", str(s.checkpoint_every), "--step-seconds", str(s.step_seconds),
             "--size", str(s.checkpoint_bytes), "--pidfile", self.paths.pidfile] + list(extra_args or []),
            stdout=self._workload_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            start_new_session=True)
        end = time.monotonic() + 20
        while self.resumed_step() is None:
            if self.workload.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the toy trainer did not start:\n{self.workload_output()}")
            time.sleep(0.02)
        return self.workload

    def workload_output(self) -> str:
        try:
            with open(self.paths.workload_log, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def resumed_step(self) -> Optional[int]:
        m = _START.search(self.workload_output())
        return int(m.group(1)) if m else None

    def final_step(self) -> Optional[int]:
        found = _FINAL.findall(self.workload_output())
        return int(found[-1]) if found else None

    def current_step(self) -> int:
        from agent.sim.toy_workload import newest_step

        return newest_step(self.paths.checkpoint_dir)

    def wait_step(self, step: int, timeout: float = 60.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            now = self.current_step()
            if now >= step:
                return now
            if self.workload is not None and self.workload.poll() is not None:
                raise RuntimeError(f"the toy trainer exited early:\n{self.workload_output()}")
            time.sleep(0.05)
        raise RuntimeError(f"the toy trainer did not reach step {step} within {timeout:.0f} s")

    def wait_workload_exit(self, timeout: float = 30.0) -> Optional[int]:
        if self.workload is None:
            return None
        try:
            return self.workload.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    # ---- the end --------------------------------------------------------------------------------

    def stop_processes(self, agent_timeout: float = 20.0, kill_agent: bool = False) -> None:
        """Stop the workload (SIGKILL: the machine is going away) and the agent (SIGTERM, then SIGKILL;
        ``kill_agent``: SIGKILL at once, so no shutdown drain starts)."""
        if self.workload is not None and self.workload.poll() is None:
            try:
                os.killpg(self.workload.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.workload.wait(timeout=10)
        if self._workload_log is not None and not self._workload_log.closed:
            self._workload_log.close()
        for proc in self.agents:
            if kill_agent:
                proc.close()
            else:
                proc.stop(timeout=agent_timeout)

    def kill_agent(self) -> None:
        self.agent.kill()

    def power_off(self, terminate: bool = True) -> Optional[str]:
        """What EC2 does when the instance goes: processes and mounts gone, volumes detached, instance
        terminated (through the group, which launches a replacement: its id is returned)."""
        if self.powered_off:
            return None
        self.powered_off = True
        self.stop_processes()
        if self.env.block_devices:
            release_host_resources(self.paths.root)
            self.env.detach_volumes_of(self.instance_id)
        try:
            self.imds.stop()
        except Exception:  # noqa: BLE001
            pass
        return self.env.terminate(self.instance_id) if terminate else None

    def close(self) -> None:
        """Best-effort teardown for failures and Ctrl-C: never raises."""
        try:
            self.stop_processes(kill_agent=True)  # no shutdown drain: this machine is only being cleaned up
        except Exception:  # noqa: BLE001
            pass
        if not self.powered_off:
            try:
                self.imds.stop()
            except Exception:  # noqa: BLE001
                pass
            self.powered_off = True
