#!/usr/bin/env bash
# Builds the spot-agent rpm for Amazon Linux 2023 with one command (`make rpm`). Prints the .rpm
# path on the last line. Needs rpmbuild (Debian: `rpm`), a Python 3.9 with pip (.venv39, pyenv or
# PYTHON39), and PyPI to fetch the pure-Python dependencies (PIP_OPTS for a local wheelhouse).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=${OUT_DIR:-$here/build}
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$top/agent/__init__.py")
[ -n "$version" ] || { echo "build.sh: no __version__ in agent/__init__.py" >&2; exit 1; }

rm -rf "$out/rpmbuild" "$out/stage"
mkdir -p "$out"/rpmbuild/{SOURCES,SPECS,BUILD,RPMS,SRPMS} "$out/stage"
src="$out/stage/spot-agent-$version"
mkdir -p "$src"
cp -a "$top/agent" "$top/systemd" "$top/examples" "$top/README.md" "$top/docs" "$src/"
cp -a "$top/packaging/deb/agent.toml" "$here/spot-agent.wrapper" "$src/"
printf 'spot-agent is licensed under the Apache License 2.0.\n' > "$src/LICENSE.spot-agent"
find "$src" -name __pycache__ -prune -exec rm -rf {} +

# Pure-Python wheels for Python 3.9 (Amazon Linux 2023). pip runs under a real Python 3.9 so that
# Requires-Python is honoured (newer boto3, requests and urllib3 need 3.10). psutil is compiled,
# so it comes from the distribution (python3-psutil) instead.
py39=${PYTHON39:-}
if [ -z "$py39" ]; then
  for c in "$top/.venv39/bin/python" /root/.pyenv/versions/3.9*/bin/python3.9 /usr/bin/python3.9 python3.9; do
    if "$c" -c 'import sys, pip; assert sys.version_info[:2] == (3, 9)' >/dev/null 2>&1; then py39=$c; break; fi
  done
fi
[ -n "$py39" ] || { echo "build.sh: needs a Python 3.9 with pip to pick AL2023-compatible dependencies (set PYTHON39)" >&2; exit 1; }
"$py39" -m pip install --quiet --disable-pip-version-check --target "$src/vendor" \
    --only-binary=:all: --platform any --implementation py \
    ${PIP_OPTS:-} "boto3>=1.35.2" "requests>=2.28" "prometheus-client>=0.17" "tomli>=1.1" >"$out/pip.log" 2>&1 || {
    tail -20 "$out/pip.log" >&2; echo "build.sh: fetching the Python 3.9 dependencies failed" >&2; exit 1; }
rm -rf "$src/vendor/bin"
find "$src/vendor" -name __pycache__ -prune -exec rm -rf {} +

tar -C "$out/stage" -czf "$out/rpmbuild/SOURCES/spot-agent-$version.tar.gz" "spot-agent-$version"
cp "$here/spot-agent.spec" "$out/rpmbuild/SPECS/"
rpmbuild -bb --nodeps --define "_topdir $out/rpmbuild" --define "sa_version $version" \
    --define "dist .amzn2023" --define "_unitdir /usr/lib/systemd/system" \
    --define "_docdir_fmt %%{NAME}" --define "_sharedstatedir /var/lib" \
    "$out/rpmbuild/SPECS/spot-agent.spec" >"$out/rpmbuild.log" 2>&1 || {
    tail -30 "$out/rpmbuild.log" >&2; echo "build.sh: rpmbuild failed; log: $out/rpmbuild.log" >&2; exit 1; }
rpm_file=$(ls "$out"/rpmbuild/RPMS/noarch/spot-agent-"$version"-1.amzn2023.noarch.rpm)
echo "$rpm_file"
