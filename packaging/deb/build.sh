#!/usr/bin/env bash
# Builds the spot-agent .deb with one command (`make deb`): dpkg-buildpackage + debhelper on a copy of
# the source tree with debian/ at its top. Prints the path of the .deb on the last line.
#
# Needs: dpkg-dev debhelper fakeroot python3-venv (scripts/setup-test-env.sh installs them), and
# PyPI for the bundled dependencies (set PIP_OPTS, e.g. "--find-links DIR --no-index", to build
# offline from a wheelhouse).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=${OUT_DIR:-$here/build}

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$top/agent/__init__.py")
[ -n "$version" ] || { echo "build.sh: no __version__ in agent/__init__.py" >&2; exit 1; }
src="$out/spot-agent-$version"

rm -rf "$src"
mkdir -p "$src"
# Only what the package needs: a stale .venv or build/ in the checkout must not leak in.
cp -a "$top/agent" "$top/systemd" "$top/examples" "$top/pyproject.toml" "$top/README.md" "$top/docs" "$src/"
mkdir -p "$src/packaging/deb"
cp -a "$here/agent.toml" "$src/packaging/deb/"
cp -a "$here/debian" "$src/debian"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$src"/*.egg-info

# The changelog is generated so the package version always follows agent.__version__.
cat > "$src/debian/changelog" <<CHANGELOG
spot-agent ($version) stable; urgency=medium

  * Release $version (see the project's git history).

 -- spot-agent maintainers <spot-agent@localhost>  $(date -R)
CHANGELOG

cd "$src"
# Debian's python, not whatever python3 is first in PATH (pyenv shims in CI and on laptops).
env -u VIRTUAL_ENV -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin PIP_OPTS="${PIP_OPTS:-}" \
    dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1 || {
    tail -40 "$out/build.log" >&2; echo "build.sh: dpkg-buildpackage failed; full log: $out/build.log" >&2; exit 1; }
arch=$(dpkg --print-architecture)
deb="$out/spot-agent_${version}_${arch}.deb"
[ -f "$deb" ] || { echo "build.sh: $deb was not produced" >&2; exit 1; }
echo "$deb"
