"""Static checks of the shipped units: systemd's own verifier, the directives the issue asks for,
no private mount namespace, and the `systemd-analyze security` score docs/install.md records.

systemd-analyze verify insists that ExecStart's binary exists. The units name the packaged paths
(/usr/bin/spot-agent, /usr/libexec/spot-agent/drain-before-stop), so the test runs the verifier in a
private mount namespace with an overlay on /usr that adds those two files (the venv's entry point and
the repository's script) and leaves the host untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

import pytest

from tests import docs

ROOT = Path(__file__).resolve().parents[2]
UNITS = [ROOT / "systemd" / "spot-agent.service", ROOT / "systemd" / "spot-agent-drain.service", ROOT / "examples" / "workload.service"]

# Each of these gives the service its own mount namespace (or a device allow-list), which would hide
# the agent's mounts from the workload or the EBS devices from the agent.
NAMESPACE_OPTIONS = [
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ReadWritePaths",
    "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectHostname", "ProtectProc", "ProcSubset", "ProtectClock", "RootDirectory", "RootImage",
    "MountFlags", "PrivateNetwork", "PrivateUsers", "DynamicUser", "DeviceAllow", "DevicePolicy",
    "NetworkNamespacePath", "MountAPIVFS",
]


def directives(path: Path) -> Dict[str, Dict[str, List[str]]]:
    """Unit file -> section -> key -> values (a key may repeat)."""
    out: Dict[str, Dict[str, List[str]]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def run_with_usr_overlay(argv: List[str]) -> subprocess.CompletedProcess:
    tmp = tempfile.mkdtemp(prefix="spot-agent-verify-")
    try:
        upper = Path(tmp, "upper")
        (upper / "bin").mkdir(parents=True)
        (upper / "libexec" / "spot-agent").mkdir(parents=True)
        Path(tmp, "work").mkdir()
        entry = shutil.which("spot-agent", path=str(ROOT / ".venv" / "bin")) or str(ROOT / ".venv" / "bin" / "spot-agent")
        assert os.access(entry, os.X_OK), f"{entry} missing: run scripts/setup-test-env.sh"
        os.symlink(entry, upper / "bin" / "spot-agent")
        shutil.copy2(ROOT / "systemd" / "drain-before-stop", upper / "libexec" / "spot-agent" / "drain-before-stop")
        script = (f"mount -t overlay overlay -o lowerdir=/usr,upperdir={upper},workdir={tmp}/work /usr && "
                  + " ".join(f"'{a}'" for a in argv))
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_systemd_analyze_verify_is_silent():
    res = run_with_usr_overlay(["systemd-analyze", "verify", *map(str, UNITS)])
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", f"systemd-analyze verify complained:\n{res.stderr}"


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo'd directive is reported on stderr."""
    bad = tmp_path / "spot-agent.service"
    bad.write_text((ROOT / "systemd" / "spot-agent.service").read_text().replace("KillMode=mixed", "KillMood=mixed"))
    res = run_with_usr_overlay(["systemd-analyze", "verify", str(bad)])
    assert "KillMood" in res.stderr


def test_agent_unit_has_the_required_directives():
    d = directives(ROOT / "systemd" / "spot-agent.service")
    unit, svc = d["Unit"], d["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["KillMode"] == ["mixed"]
    assert int(svc["WatchdogSec"][0]) > 0
    assert "network-online.target" in " ".join(unit["Wants"])
    assert "network-online.target" in " ".join(unit["After"])
    stop = int(svc["TimeoutStopSec"][0])
    assert 60 <= stop < 120, "the shutdown drain must fit the two-minute spot notice"
    assert int(svc["TimeoutStartSec"][0]) >= 300, "pre-warm needs time (EXTEND_TIMEOUT_USEC extends it)"
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["ExecStart"][0].startswith("/usr/bin/spot-agent run --config /etc/spot-agent/agent.toml")
    assert d["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_no_private_mount_namespace(unit):
    d = directives(unit)
    used = sorted(set(d.get("Service", {})) & set(NAMESPACE_OPTIONS))
    assert not used, f"{unit.name} uses {used}: the agent's mounts would be invisible to the workload"


def test_workload_is_gated_and_drained_first():
    d = directives(ROOT / "examples" / "workload.service")
    wl = d["Unit"]
    assert " ".join(wl["Wants"]).count("spot-agent.service") and "spot-agent.service" in wl["After"]
    # Gated on the agent being active, but not Requires=/BindsTo=/PartOf=/Requisite=: those would
    # stop or restart the job with every `systemctl stop/restart spot-agent`.
    assert not {"Requires", "BindsTo", "PartOf", "Requisite"} & set(wl)
    assert d["Service"]["ExecStartPre"] == ["/bin/systemctl is-active --quiet spot-agent.service"]
    # The drain guard is started after the workload, so systemd stops it (and drains) first.
    assert "spot-agent-drain.service" in wl["Before"]
    guard = directives(ROOT / "systemd" / "spot-agent-drain.service")
    assert guard["Service"]["ExecStop"] == ["/usr/libexec/spot-agent/drain-before-stop"]
    assert "spot-agent.service" in guard["Unit"]["After"]
    # Only a shutdown stops the guard: a restart of the agent must not run its ExecStop.
    assert not {"PartOf", "BindsTo", "Requires", "Requisite"} & set(guard["Unit"])
    assert int(guard["Service"]["TimeoutStopSec"][0]) <= 120


def test_agent_unit_thaws_after_it_stops():
    svc = directives(ROOT / "systemd" / "spot-agent.service")["Service"]
    assert svc["ExecStopPost"] == ["/usr/bin/spot-agent thaw --config /etc/spot-agent/agent.toml"]


def test_docs_record_the_security_score():
    res = run_with_usr_overlay(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNITS[0])])
    m = re.search(r"Overall exposure level for spot-agent\.service: ([0-9.]+) (\w+)", res.stdout)
    assert m, res.stdout + res.stderr
    section = docs.install()
    assert f"{m.group(1)} {m.group(2)}" in section, f"docs/install.md should record {m.group(1)} {m.group(2)}"
