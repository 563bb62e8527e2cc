"""The Amazon Linux 2023 rpm: built with rpmbuild by `make rpm`'s script, then checked from the
outside (`rpm -qlp`, requirements, config files, scriptlets) and from the inside: its payload's
vendored libraries and agent run on Python 3.9 (AL2023's version), with the project's 3.9 venv
standing in for the distribution's python3-psutil.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import REPO, run

PY39 = REPO / ".venv39" / "bin" / "python"


@pytest.fixture(scope="module")
def rpm_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rpm")
    res = run(["bash", str(REPO / "packaging" / "rpm" / "build.sh")], timeout=600, env={**os.environ, "OUT_DIR": str(out)})
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name.endswith(".amzn2023.noarch.rpm"), res.stdout
    return path


def q(rpm_file: Path, *args: str) -> str:
    return run(["rpm", "-qp", *args, str(rpm_file)]).stdout


def test_rpm_contents(rpm_file: Path):
    files = q(rpm_file, "-l").split()
    for path in ["/usr/bin/spot-agent", "/usr/lib/systemd/system/spot-agent.service",
                 "/usr/lib/systemd/system/spot-agent-drain.service", "/usr/libexec/spot-agent/drain-before-stop",
                 "/etc/spot-agent/agent.toml", "/var/lib/spot-agent", "/usr/share/doc/spot-agent/README.md",
                 "/usr/share/doc/spot-agent/docs/configuration.md",
                 "/usr/share/spot-agent/examples/workload.service", "/opt/spot-agent/lib/agent/cli.py",
                 "/opt/spot-agent/lib/boto3/__init__.py", "/opt/spot-agent/lib/tomli/__init__.py",
                 "/opt/spot-agent/lib/prometheus_client/__init__.py"]:
        assert path in files, f"{path} missing from the rpm"
    assert not [f for f in files if f.endswith((".so", ".pyc"))], "noarch: no compiled objects or build-host byte-code"
    assert not [f for f in files if "/opt/spot-agent/lib/psutil" in f], "psutil comes from python3-psutil"
    assert q(rpm_file, "--configfiles").split() == ["/etc/spot-agent/agent.toml"]
    dump = q(rpm_file, "--dump")
    conf = next(line for line in dump.splitlines() if line.startswith("/etc/spot-agent/agent.toml "))
    assert " 0100640 root root 1 " in conf, conf  # mode 0640, %config flag set
    state = next(line for line in dump.splitlines() if line.startswith("/var/lib/spot-agent "))
    assert " 040750 root root " in state, state


def test_rpm_requirements_and_scriptlets(rpm_file: Path):
    requires = q(rpm_file, "-R")
    for dep in ["python3 >= 3.9", "python3-psutil", "python3-systemd", "systemd", "util-linux"]:
        assert dep in requires, f"missing Requires: {dep}"
    assert "python3dist" not in requires and "/opt/spot-agent" not in requires
    assert q(rpm_file, "--queryformat", "%{ARCH} %{VERSION}").startswith("noarch ")
    scripts = q(rpm_file, "--scripts")
    assert "systemctl --no-reload enable spot-agent.service spot-agent-drain.service" in scripts
    assert "SPOT_AGENT_NO_START" in scripts and "--chroot" in scripts
    assert "try-restart" in scripts and "SPOT_AGENT_RESTART_ON_UPGRADE" in scripts


def test_payload_runs_on_python_39(rpm_file: Path, tmp_path: Path):
    assert PY39.exists(), ".venv39 missing: run scripts/setup-test-env.sh"
    subprocess.run(f"rpm2cpio '{rpm_file}' | cpio -idm --quiet", shell=True, cwd=tmp_path, check=True, timeout=120)
    lib = tmp_path / "opt/spot-agent/lib"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib), "AWS_EC2_METADATA_DISABLED": "true"}
    probe = run([str(PY39), "-s", "-c", "import sys, boto3, requests, prometheus_client, tomli, agent.cli; "
                 "print(sys.version_info[:2], boto3.__file__, agent.cli.__file__)"], env=env, cwd=tmp_path).stdout
    assert "(3, 9)" in probe and f"{lib}/boto3/" in probe and f"{lib}/agent/cli.py" in probe, probe
    wrapper = tmp_path / "usr/bin/spot-agent"
    assert wrapper.read_text().startswith("#!/usr/bin/python3 -s\n")
    out = run([str(PY39), "-s", str(wrapper), "check-config", "--config", str(tmp_path / "etc/spot-agent/agent.toml")], env=env, cwd=tmp_path)
    assert "agent.toml: ok" in out.stdout, out.stdout + out.stderr
