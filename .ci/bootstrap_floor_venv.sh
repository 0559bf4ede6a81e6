#!/usr/bin/env bash
# Create the robot-floor venv (make test-floor): the Python of a ROS 2 Humble robot
# with exactly the floor pinned in docker/robot-requirements.txt (Ubuntu 22.04's
# numpy, Pillow and PyYAML, pip's pydantic) plus the tests' own dependencies
# (.ci/requirements-floor.txt). No ROS and no torch: those tests run in the main lane.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-floor}
pins=docker/robot-requirements.txt
want=$(sed -n 's/^# python: *\([0-9]*\.[0-9]*\).*/\1/p' "$pins")
if [ -z "$want" ]; then
    echo "floor: $pins has no '# python: X.Y' line" >&2
    exit 1
fi

# That Python: $PYTHON_FLOOR, else python$want on PATH (if it runs: a pyenv shim of a
# version not selected does not), else pyenv's newest $want.x.
pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
candidates=("${PYTHON_FLOOR:-}" "python$want")
if command -v pyenv >/dev/null; then
    candidates+=("$(pyenv prefix "$want" 2>/dev/null || true)/bin/python$want")
fi
while IFS= read -r found; do candidates+=("$found"); done < <(
    find "$pyenv_root/versions" -maxdepth 3 -path "*/versions/$want.*/bin/python$want" \
        2>/dev/null | sort -rV)
python=""
for candidate in "${candidates[@]}"; do
    if [ -n "$candidate" ] && "$candidate" -c "import sys, venv, ensurepip
sys.exit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "floor: the robot-floor lane needs Python $want (a Humble robot's) with venv, and" \
        "found none: install it (pyenv install $want, or apt-get install python$want-venv)" \
        "or set PYTHON_FLOOR=/path/to/python$want" >&2
    exit 1
fi

# Built from nothing each time its inputs change, so nothing outside the floor lingers.
rm -rf "$venv"
"$python" -m venv "$venv"
# The two Python packages, importable by name as on a robot's install (symlinks, as
# colcon's --symlink-install: edits count at once). A path entry for src/ folders
# would also let the bringup's launch/ folder pass for ROS 2's launch package.
mkdir "$venv/robot-src"
for package in manipulation_policy manipulation_bringup; do
    ln -s "$PWD/src/$package/$package" "$venv/robot-src/$package"
done
"$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" |
    (read -r site && cd "$venv/robot-src" && pwd >"$site/robot-src.pth")
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# The robot's versions exactly: each ">=" floor of the pins file as "==".
sed 's/>=/==/' "$pins" >"$venv/floor-pins.txt"
# This image's pip config names local package mirrors that may be absent: drop those
# warnings, keep every other message.
quiet() { "$@" 2> >(grep -v '^WARNING: Location .* is ignored' >&2); }
# PyYAML 5.4.1 has no wheel for Python 3.10 on the registry, and its source builds
# only with Cython below 3: build it with these tools, without build isolation.
quiet "${pip[@]}" cython==0.29.37 setuptools==65.5.0 wheel==0.48.0
quiet "${pip[@]}" --no-build-isolation "$(grep -i '^pyyaml==' "$venv/floor-pins.txt")"
quiet "${pip[@]}" -r "$venv/floor-pins.txt" -r .ci/requirements-floor.txt
"$venv/bin/python" -m pip check --disable-pip-version-check
echo "floor: $venv ready: $("$venv/bin/python" --version)," \
    "$(grep -v '^#' "$venv/floor-pins.txt" | tr '\n' ' ')"
