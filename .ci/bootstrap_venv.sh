#!/usr/bin/env bash
# Create (or update) the project virtualenv with real ROS 2 from PyPI wheels
# and everything the tests need, then repair the wheels' CMake files.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}

# The ROS 2 wheels on PyPI are built for CPython 3.11 only (the code itself runs on
# 3.10, as on a Humble robot, but this development environment needs 3.11).
python=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "bootstrap: needs Python 3.11 (the ROS 2 wheels on PyPI are built for it);" \
        "found $(python3 --version 2>&1)" >&2
    exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# This image's pip config names local package mirrors that may be absent: drop
# those warnings, keep every other message.
"${pip[@]}" -r .ci/requirements-ros.txt -r .ci/requirements-dev.txt \
    2> >(grep -v '^WARNING: Location .* is ignored' >&2)
"$venv/bin/python" .ci/patch_ros_wheel_cmake.py
