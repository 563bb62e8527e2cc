"""Run the real daemon as a subprocess, with a notify socket standing in for systemd's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import List, Optional

from agent.demo.agent_process import NotifySocket as DemoNotifySocket


class NotifySocket(DemoNotifySocket):
    """The demo's notify socket, plus waiting for a line: receives sd_notify datagrams like systemd."""

    @property
    def lines(self) -> List[str]:
        return [line for _, line in self.snapshot()]

    def wait_for(self, line: str, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(m == line or m.startswith(line) for m in self.lines):
                return True
            time.sleep(0.05)
        return False


class AgentProcess:
    count = 0

    def __init__(self, tmp_path, config_text: str, env: Optional[dict] = None, watchdog_usec: int = 0) -> None:
        self.tmp_path = tmp_path
        self.config_path = os.path.join(str(tmp_path), "agent.toml")
        with open(self.config_path, "w") as fh:
            fh.write(config_text)
        os.chmod(self.config_path, 0o644)
        AgentProcess.count += 1
        n = AgentProcess.count
        self.notify = NotifySocket(os.path.join(str(tmp_path), f"notify-{n}.sock"))
        self.log_path = os.path.join(str(tmp_path), f"agent-{n}.log")
        full_env = dict(os.environ, NOTIFY_SOCKET=self.notify.path, PYTHONUNBUFFERED="1")
        if watchdog_usec:
            full_env["WATCHDOG_USEC"] = str(watchdog_usec)
        full_env.update(env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", self.config_path],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def log(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        if not self.notify.wait_for("READY=1", timeout):
            raise AssertionError(f"agent not READY within {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.notify.close()
        self._log.close()


def wait_file(path: str, timeout: float = 10.0, contains: str = "") -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            with open(path) as fh:
                text = fh.read()
            if contains in text:
                return text
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear (with {contains!r}) within {timeout}s")


class FakeHost:
    """The host facts the daemon reads (``[host] proc_root``, ``run_root``, ``systemctl``): a boot id
    file, the directory that says systemd is PID 1, and a `systemctl is-system-running` that answers
    what the test sets. systemd cannot be PID 1 in this test process; the real thing runs in
    tests/system/test_nspawn_boot.py."""

    def __init__(self, root, systemd: bool = True) -> None:
        self.root = os.path.join(str(root), "host")
        self.proc = os.path.join(self.root, "proc")
        self.run = os.path.join(self.root, "run")
        os.makedirs(os.path.join(self.proc, "sys/kernel/random"), exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        if systemd:
            os.makedirs(os.path.join(self.run, "systemd/system"), exist_ok=True)
        self.state_file = os.path.join(self.root, "system-state")
        self.systemctl = os.path.join(self.root, "systemctl")
        with open(self.systemctl, "w") as fh:
            fh.write(f'#!/bin/sh\n[ "$1" = is-system-running ] || exit 1\nstate=$(cat {self.state_file})\n'
                     'echo "$state"\n[ "$state" = running ]\n')
        os.chmod(self.systemctl, 0o755)
        self.set_state("running")
        self.set_boot("boot-1")

    def set_state(self, state: str) -> None:
        with open(self.state_file, "w") as fh:
            fh.write(state + "\n")

    def set_boot(self, boot: str) -> None:
        with open(os.path.join(self.proc, "sys/kernel/random/boot_id"), "w") as fh:
            fh.write(boot + "\n")

    def toml(self) -> str:
        return f'[host]\nproc_root = "{self.proc}"\nrun_root = "{self.run}"\nsystemctl = "{self.systemctl}"\n'
