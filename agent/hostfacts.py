"""Facts about the host the agent's decisions depend on: which boot this is, whether systemd runs
the machine, and whether the machine is shutting down.

They decide what a SIGTERM means (a unit stop or restart is not a termination; a poweroff is) and
which records belong to this boot, so they are read through roots and a command the config can point
elsewhere (``[host] proc_root``, ``run_root``, ``systemctl``): tests drive them without a real PID 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from agent.runner import Runner

log = logging.getLogger(__name__)

STOPPING = "stopping"  # `systemctl is-system-running` while the shutdown transaction runs
STATE_TIMEOUT = 5.0


@dataclass
class HostFacts:
    proc_root: str = "/proc"
    run_root: str = "/run"
    systemctl: str = "systemctl"
    runner: Runner = field(default_factory=Runner)

    @classmethod
    def from_config(cls, host: Any, runner: Optional[Runner] = None) -> "HostFacts":
        return cls(proc_root=getattr(host, "proc_root", "/proc"), run_root=getattr(host, "run_root", "/run"),
                   systemctl=getattr(host, "systemctl", "systemctl"), runner=runner or Runner())

    def boot_id(self) -> str:
        """The kernel's boot id; "" when it cannot be read (then nothing is treated as another boot's)."""
        try:
            with open(os.path.join(self.proc_root, "sys/kernel/random/boot_id")) as fh:
                return fh.read().strip()
        except OSError:
            return ""

    def under_systemd(self) -> bool:
        """systemd is PID 1 (sd_booted(): the directory only systemd creates)."""
        return os.path.isdir(os.path.join(self.run_root, "systemd/system"))

    def system_state(self) -> str:
        """`systemctl is-system-running` ("running", "degraded", "stopping", ...); "" without systemd or
        when it cannot be asked. The command exits non-zero for every state but "running": only its
        output counts."""
        if not self.under_systemd():
            return ""
        argv: List[str] = [self.systemctl, "is-system-running"]
        res = self.runner.run(argv, timeout=STATE_TIMEOUT, check=False)
        state = (res.stdout or "").strip().splitlines()
        if not state:
            log.warning("cannot read the system state (%s): %s", " ".join(argv), res.error_line())
            return ""
        return state[-1].strip()

    def shutting_down(self) -> bool:
        """True only while systemd runs the shutdown transaction (poweroff, reboot, halt, kexec)."""
        return self.system_state() == STOPPING


_DEFAULT = HostFacts()


def default() -> HostFacts:
    """The host as configured by the running daemon (``[host]``); the real one before that."""
    return _DEFAULT


def set_default(facts: HostFacts) -> None:
    global _DEFAULT
    _DEFAULT = facts
