"""The .deb, built with `make deb`'s script and installed into a minimal Debian root with apt, as an
AMI bake in a chroot does it: what it ships, that it is enabled but not started, that upgrades keep
the config and do not restart the agent, and that remove and purge clean up.

The start policy on a *running* system (which a chroot is not) is checked with two stand-ins, a
`deb-systemd-invoke` that records its arguments and a `systemd-detect-virt` that says "not a chroot":
the real ones would need a booted EC2 bake instance. Everything else is the real package and dpkg.
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

from tests.system.conftest import Deb, InstalledRoot, in_root, run

CONF = "etc/spot-agent/agent.toml"


def test_package_metadata_and_contents(deb: Deb):
    fields = run(["dpkg-deb", "-f", str(deb.path), "Package", "Depends", "Architecture"]).stdout
    assert "Package: spot-agent" in fields
    assert re.search(r"python3 \(>= 3\.\d+\), python3 \(<< 3\.\d+\)", fields), fields
    assert "python3-systemd" in fields and "procps" in fields  # /bin/kill for ExecReload
    listing = run(["dpkg-deb", "-c", str(deb.path)]).stdout
    for path in ["./lib/systemd/system/spot-agent.service", "./lib/systemd/system/spot-agent-drain.service",
                 "./usr/libexec/spot-agent/drain-before-stop", "./etc/spot-agent/agent.toml",
                 "./var/lib/spot-agent/", "./opt/spot-agent/bin/spot-agent", "./usr/bin/spot-agent -> /opt/spot-agent/bin/spot-agent",
                 "./usr/share/spot-agent/examples/workload.service", "./usr/share/spot-agent/examples/workload.py", "./usr/share/doc/spot-agent/README.md",
                 "./usr/share/doc/spot-agent/docs/configuration.md",
                 "site-packages/agent/cli.py", "site-packages/boto3/", "site-packages/psutil/", "site-packages/prometheus_client/"]:
        assert path in listing, f"{path} missing from the .deb"
    assert "site-packages/pip/" not in listing and "bin/activate" not in listing
    ctrl = run(["dpkg-deb", "--info", str(deb.path), "conffiles"]).stdout.split()
    assert ctrl == ["/etc/spot-agent/agent.toml"]


def test_installed_by_apt_enabled_not_started(installed_root: InstalledRoot, deb: Deb):
    root = installed_root.path
    assert "enabled, not started" in installed_root.install_output
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "spot-agent.service").resolve() == root / "lib/systemd/system/spot-agent.service" or \
        str((wants / "spot-agent.service").readlink()) == "/lib/systemd/system/spot-agent.service"
    assert (wants / "spot-agent-drain.service").is_symlink()
    assert stat.S_IMODE((root / CONF).stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "var/lib/spot-agent").stat().st_mode) == 0o750
    # Debian's python, not the build host's pyenv; no build-tree paths left anywhere in the venv.
    assert (root / "opt/spot-agent/bin/python3").readlink() == Path("/usr/bin/python3")
    leftovers = run(["grep", "-rlI", "debian/spot-agent", str(root / "opt/spot-agent")], check=False)
    assert leftovers.stdout == "", f"build paths left in: {leftovers.stdout[:500]}"
    out = in_root(root, "spot-agent --version; spot-agent check-config; "
                        "/opt/spot-agent/bin/python -c 'import systemd.journal as j, boto3, psutil, prometheus_client; print(j.__file__)'").stdout
    assert f"spot-agent {deb.version}" in out
    assert "/etc/spot-agent/agent.toml: ok" in out
    assert "/usr/lib/python3/dist-packages/systemd/journal.py" in out


def test_installed_units_verify_in_the_root(installed_root: InstalledRoot):
    res = in_root(installed_root.path, "systemd-analyze verify spot-agent.service spot-agent-drain.service "
                                       "/usr/share/spot-agent/examples/workload.service", check=False)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def _fake_running_system(root: Path) -> Path:
    """Make the chroot look like a booted system to the postinst; returns the invoke log."""
    (root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    log = root / "tmp/invoke.log"
    fake = root / "usr/local/sbin/deb-systemd-invoke"
    fake.write_text('#!/bin/sh\necho "$@" >> /tmp/invoke.log\n')
    fake.chmod(0o755)
    virt = root / "usr/local/bin/systemd-detect-virt"
    virt.write_text("#!/bin/sh\nexit 1\n")
    virt.chmod(0o755)
    return log


def _invocations(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def test_start_policy(root: Path, deb: Deb):
    name = deb.path.name
    run(["cp", str(deb.path), str(root / "tmp" / name)])
    in_root(root, "dpkg --purge spot-agent")
    log = _fake_running_system(root)

    # A bake on a booted build instance: the flag keeps it from starting.
    out = in_root(root, f"dpkg -i /tmp/{name}", env={"SPOT_AGENT_NO_START": "1"}).stdout
    assert "enabled, not started" in out and "start" not in _invocations(log)
    assert (root / "etc/systemd/system/multi-user.target.wants/spot-agent.service").is_symlink()

    # A fresh install on a running machine (user-data): started.
    in_root(root, "dpkg --purge spot-agent")
    in_root(root, f"dpkg -i /tmp/{name}")
    assert "start spot-agent.service spot-agent-drain.service" in _invocations(log)

    # An upgrade: never restarted (a restart runs the shutdown drain) unless asked to.
    log.unlink()
    out = in_root(root, f"dpkg -i /tmp/{name}").stdout
    assert "keeps the old version until it is restarted" in out
    assert "restart" not in _invocations(log) and "stop" not in _invocations(log)
    in_root(root, f"dpkg -i /tmp/{name}", env={"SPOT_AGENT_RESTART_ON_UPGRADE": "1"})
    assert "try-restart spot-agent.service" in _invocations(log)


def _repack(deb: Deb, tmp: Path, version: str, new_default: str = "") -> Path:
    """The same package under a new version (and optionally a changed default config): an upgrade."""
    tree = tmp / f"tree-{version}"
    run(["dpkg-deb", "-R", str(deb.path), str(tree)])
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    if new_default:
        (tree / CONF).write_text((tree / CONF).read_text() + new_default)
    out = tmp / f"spot-agent_{version}.deb"
    run(["dpkg-deb", "-Zgzip", "-z1", "-b", str(tree), str(out)])
    return out


def test_upgrade_keeps_the_config(root: Path, deb: Deb, tmp_path: Path):
    conf = root / CONF
    edited = conf.read_text().replace('log_level = "info"', 'log_level = "debug"')
    assert edited != conf.read_text()
    conf.write_text(edited)

    up1 = _repack(deb, tmp_path, deb.version + "+1")
    run(["cp", str(up1), str(root / "tmp/up1.deb")])
    in_root(root, "dpkg -i /tmp/up1.deb")
    assert conf.read_text() == edited
    assert deb.version + "+1" in in_root(root, "dpkg-query -W -f '${Version}' spot-agent").stdout

    # The packaged default changed too: dpkg would ask; --force-confold (what unattended installs
    # pass) keeps the local file.
    up2 = _repack(deb, tmp_path, deb.version + "+2", new_default="\n# a new default comment\n")
    run(["cp", str(up2), str(root / "tmp/up2.deb")])
    in_root(root, "dpkg -i --force-confdef --force-confold /tmp/up2.deb")
    assert conf.read_text() == edited
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640


def test_remove_keeps_config_purge_removes_everything(root: Path):
    (root / "var/lib/spot-agent/state.json").write_text("{}")
    (root / "opt/spot-agent/lib/stray.pyc").write_text("")  # byte-code python wrote at run time
    in_root(root, "dpkg --remove spot-agent")
    assert (root / CONF).exists(), "remove must keep the config"
    assert not (root / "opt/spot-agent").exists()
    assert not (root / "usr/bin/spot-agent").exists()
    in_root(root, "dpkg --purge spot-agent")
    for gone in [CONF, "etc/spot-agent", "var/lib/spot-agent", "etc/systemd/system/multi-user.target.wants/spot-agent.service",
                 "etc/systemd/system/multi-user.target.wants/spot-agent-drain.service"]:
        assert not (root / gone).exists() and not (root / gone).is_symlink(), f"{gone} survived purge"
    assert subprocess.run(["chroot", str(root), "dpkg", "-s", "spot-agent"], capture_output=True).returncode != 0
