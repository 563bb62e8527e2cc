#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root), idempotently:
# system packages (filesystems, Prometheus, systemd-nspawn, rpmbuild), the project venv, and a
# Python 3.9 venv for the unit tests (Amazon Linux 2023 ships 3.9), and the real job schedulers of the
# multi-node tests (tests/engines/): Slurm and munge from Debian, Ray in a venv of its own (.venv-ray).
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(xfsprogs e2fsprogs util-linux mdadm prometheus debootstrap systemd-container rpm
      libsystemd-dev pkg-config rclone dpkg-dev debhelper fakeroot python3-venv cpio cloud-init
      slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "setup: need root to install: ${missing[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test,journal,demo]'

PY39=""
for c in /root/.pyenv/versions/3.9*/bin/python3.9 /usr/bin/python3.9 python3.9; do
  if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 9)' >/dev/null 2>&1; then PY39=$c; break; fi
done
if [ -n "$PY39" ]; then
  if [ ! -x .venv39/bin/python ]; then "$PY39" -m venv .venv39; fi
  .venv39/bin/pip install -q --upgrade pip >/dev/null
  .venv39/bin/pip install -q -e '.[test]'
fi

# Ray (~380 MB) in its own venv: the agent never imports it; tests/engines start a head and a worker
# on 127.0.0.1 from here. Pinned: `ray drain-node` is outside Ray's stable API.
RAY_PIN='ray[default]==2.60.0'
if [ ! -x .venv-ray/bin/python ]; then "$PY" -m venv .venv-ray; fi
if ! .venv-ray/bin/python -c 'import ray, sys; sys.exit(ray.__version__ != "2.60.0")' >/dev/null 2>&1; then
  .venv-ray/bin/pip install -q --upgrade pip >/dev/null
  .venv-ray/bin/pip install -q "$RAY_PIN"
fi
