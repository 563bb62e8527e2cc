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

# Real training jobs (tests/integration/test_torch_jobs.py): PyTorch pinned exactly (2.13.0 is the CPU
# build these machines keep on disk; any other requirement downloads a CUDA build of several GB),
# then Lightning and transformers + accelerate with ranges that accept it, and a check that none of
# them replaced torch. Python 3.11: the pin's wheel is cp311. The agent never imports any of it.
TORCH_PIN='torch==2.13.0'
PY311=""
for c in python3.11 /root/.pyenv/versions/3.11*/bin/python3.11 /usr/bin/python3.11; do
  if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1; then PY311=$c; break; fi
done
if [ -z "$PY311" ]; then echo "setup: Python 3.11 is needed for .venv-torch" >&2; exit 1; fi
if [ ! -x .venv-torch/bin/python ]; then "$PY311" -m venv .venv-torch; fi
torch_ok() {
  .venv-torch/bin/python - <<'PY' >/dev/null 2>&1
import importlib.metadata as md, sys
v = {n: md.version(n) for n in ("torch", "lightning", "transformers", "accelerate", "numpy")}
sys.exit(v["torch"].split("+")[0] != "2.13.0")
PY
}
if ! torch_ok; then
  .venv-torch/bin/pip install -q --upgrade pip >/dev/null
  .venv-torch/bin/pip install -q "$TORCH_PIN"
  .venv-torch/bin/pip install -q "$TORCH_PIN" numpy 'lightning>=2.2,<3' 'transformers>=4.40,<6' 'accelerate>=0.30,<2'
  if ! torch_ok; then
    echo "setup: .venv-torch does not hold torch 2.13.0 with lightning, transformers and accelerate after the install" >&2
    .venv-torch/bin/pip list 2>/dev/null | grep -iE '^(torch|lightning|transformers|accelerate) ' >&2 || true
    exit 1
  fi
fi
