#!/usr/bin/env bash
# What `make demo` needs on a fresh clone, and nothing more: the project venv (.venv) with the demo
# extra (moto), and, as root, the tools the loop-device volumes use (mkfs, losetup, fsfreeze).
# Without root the demo still runs, with directory-backed volumes. The full test setup is
# scripts/setup-test-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
  command -v mkfs.xfs >/dev/null 2>&1 || missing+=(xfsprogs)
  { command -v losetup && command -v fsfreeze && command -v mount; } >/dev/null 2>&1 || missing+=(util-linux mount)
  [ -x .venv/bin/python ] || "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-demo-env: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "setup-demo-env: cannot create .venv with $PY (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
fi
if ! .venv/bin/python -c 'import moto, boto3, psutil, agent' >/dev/null 2>&1; then
  echo "setup-demo-env: installing spot-agent[demo] into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[demo]'
fi
