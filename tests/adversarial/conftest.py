"""The adversarial harness: a real unprivileged job uid attacks the root agent's file handling.

The job is uid/gid 65534 (``nobody``/``nogroup``, present on every Debian/AL2023 host: no user is
created). Its processes are started with setgroups([])/setgid/setuid in ``preexec_fn``, so the kernel
enforces what the job may do; the agent under test runs in this (root) pytest process.

Each test gets an ``Arena`` under a root-owned 0755 directory in /tmp (pytest's own tmp dirs are
0700 root, which the job could not even traverse):
  home/    owned by the job: its checkpoint and dataset directories live here
  secret/  root-only (0700) with canary files of random bytes: the job must never get the agent to
           read, write or delete anything in it
``Arena.assert_secret_intact()`` and ``Arena.leaks(s3, bucket)`` are the verdicts every case checks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

JOB_UID = 65534
JOB_GID = 65534
ATTACKER = str(Path(__file__).with_name("attacker.py"))
# The job runs the system Python: the test venv may live where the job cannot read.
JOB_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _drop() -> None:
    os.setgroups([])
    os.setgid(JOB_GID)
    os.setuid(JOB_UID)


class Job:
    """Runs code as the job uid; ``swap`` keeps a RENAME_EXCHANGE loop going in the background."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def run(self, code: str) -> None:
        p = subprocess.run([JOB_PYTHON, ATTACKER, "exec", code], preexec_fn=_drop, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, f"job code failed: {p.stderr.strip()}"

    def swap(self, *pairs: Tuple[str, str]) -> "subprocess.Popen":
        """Start one process exchanging every pair in a loop; returns once each pair swapped once."""
        args = [x for pair in pairs for x in pair]
        p = subprocess.Popen([JOB_PYTHON, ATTACKER, "swap", *args], preexec_fn=_drop, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline().strip() if p.stdout else ""
        assert line == "ready", f"swap loop did not start: {line} {p.stderr.read() if p.stderr else ''}"
        return p

    def unswap(self, real: str, link: str) -> None:
        """After a swap loop: put the real directory/file back at ``real`` and remove the link
        (either may have been removed by the agent meanwhile)."""
        self.run(f"""
real, link = {real!r}, {link!r}
if os.path.islink(real) and os.path.lexists(link):
    exchange(real, link)
for p in (real, link):
    if os.path.islink(p):
        os.unlink(p)
""")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        self.procs.clear()


class Arena:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.secret = base / "secret"
        self.home.mkdir()
        os.chown(self.home, JOB_UID, JOB_GID)
        self.secret.mkdir(mode=0o700)
        self.canaries: Dict[str, bytes] = {}
        self._before: Dict[str, Tuple[int, int, str]] = {}

    def plant(self, rel: str, size: int) -> bytes:
        """A root-only canary file of random bytes under secret/ (the sizes decoys copy)."""
        data = os.urandom(size)
        p = self.secret / rel
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        p.write_bytes(data)
        os.chmod(p, 0o600)
        self.canaries[rel] = data
        self._before = self._snapshot()
        return data

    def _snapshot(self) -> Dict[str, Tuple[int, int, str]]:
        out = {}
        for dirpath, dirs, files in os.walk(self.secret):
            for name in dirs + files:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                digest = ""
                if stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as fh:
                        digest = hashlib.sha256(fh.read()).hexdigest()
                out[os.path.relpath(p, self.secret)] = (st.st_mode, st.st_uid, digest)
        return out

    def assert_secret_intact(self) -> None:
        """Nothing in secret/ was created, deleted, changed, chmodded or chowned."""
        assert self._snapshot() == self._before

    def leaks(self, s3, bucket: str) -> List[str]:
        """Keys (committed or not) whose bytes contain any canary: must always be empty."""
        bad = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", ()):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                if any(c[:256] in body for c in self.canaries.values()):
                    bad.append(obj["Key"])
        return bad


@pytest.fixture
def arena():
    base = Path(tempfile.mkdtemp(prefix="spot-agent-adv-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield Arena(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def job():
    j = Job()
    try:
        yield j
    finally:
        j.stop()


@pytest.fixture(autouse=True)
def _needs_root():
    if os.geteuid() != 0:
        pytest.fail("the adversarial tests need root: the agent runs as root and the job as uid 65534")


def tree(root: Path, skip: Optional[str] = ".spot-agent-sync") -> Dict[str, str]:
    """relative path -> sha256 of every regular file below root (without following links)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        if skip in dirs:
            dirs.remove(skip)
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out
