"""Fixtures for the packaging and boot tests: the .deb, a minimal Debian root with it installed, and
throw-away overlays of that root so each test can change it freely.

The debootstrap root is built once per test session (about 35 s) under /var/tmp and removed at the
end: never reused between CI runs, so a stale root cannot hide a packaging bug. Needs root,
debootstrap, systemd-container and the Debian mirror for apt (scripts/setup-test-env.sh).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
# One root per test session (the pid keeps two concurrent sessions apart); roots left by sessions
# that died are removed at the start of the next one.
TEST_ROOT_BASE = "/var/tmp/spot-agent-test-root"
TEST_ROOT = Path(f"{TEST_ROOT_BASE}.{os.getpid()}")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(argv: List[str], timeout: float = 300, check: bool = True, env: Optional[Dict[str, str]] = None,
        **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} exited {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}")
    return res


def in_root(root: Path, script: str, env: Optional[Dict[str, str]] = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a shell script chrooted into ``root`` with a clean environment (plus ``env``)."""
    base = {"PATH": CHROOT_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    base.update(env or {})
    return run(["chroot", str(root), "/bin/sh", "-ec", script], timeout=timeout, check=check, env=base)


@dataclass
class Deb:
    path: Path
    version: str


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Deb:
    """The package, built by the same script as `make deb`."""
    out = tmp_path_factory.mktemp("deb")
    res = run(["bash", str(REPO / "packaging" / "deb" / "build.sh")], timeout=600,
              env={**os.environ, "OUT_DIR": str(out)})
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file(), res.stdout
    version = run(["dpkg-deb", "-f", str(path), "Version"]).stdout.strip()
    return Deb(path, version)


@pytest.fixture(scope="session")
def debian_root() -> Iterator[Path]:
    """A fresh `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm` root."""
    for stale in Path(TEST_ROOT_BASE).parent.glob(Path(TEST_ROOT_BASE).name + ".*"):
        pid = stale.suffix.lstrip(".")
        if stale == TEST_ROOT or (pid.isdigit() and not os.path.exists(f"/proc/{pid}")):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        run(["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus", "bookworm", str(TEST_ROOT)],
            timeout=600)
        yield TEST_ROOT
    finally:
        shutil.rmtree(TEST_ROOT, ignore_errors=True)


@dataclass
class InstalledRoot:
    path: Path
    install_output: str


@pytest.fixture(scope="session")
def installed_root(debian_root: Path, deb: Deb) -> InstalledRoot:
    """The debootstrap root with the .deb installed by apt (which fetches python3 and
    python3-systemd from the Debian mirror), as an AMI bake in a chroot would do it."""
    shutil.copy2(deb.path, debian_root / "tmp" / deb.path.name)
    res = in_root(debian_root, f"apt-get update -qq && apt-get install -y -q --no-install-recommends /tmp/{deb.path.name}")
    return InstalledRoot(debian_root, res.stdout + res.stderr)


@contextlib.contextmanager
def overlay_of(lower: Path) -> Iterator[Path]:
    """A writable overlay of ``lower``: changes land in a temp dir and vanish on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="spot-agent-overlay-", dir="/var/tmp"))
    merged = tmp / "root"
    for d in ("upper", "work", "root"):
        (tmp / d).mkdir()
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={tmp}/upper,workdir={tmp}/work", str(merged)])
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def root(installed_root: InstalledRoot) -> Iterator[Path]:
    """A private, writable copy (overlay) of the installed root for one test."""
    with overlay_of(installed_root.path) as merged:
        yield merged
