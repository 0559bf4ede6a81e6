#!/usr/bin/env bash
# Create (or update) the project virtualenv with real ROS 2 from PyPI wheels
# and everything the tests need, then repair the wheels' CMake files.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "bootstrap: Python 3.10 or newer is needed, found $(python3 --version)" >&2
    exit 1
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# This image's pip config names local package mirrors that may be absent: drop
# those warnings, keep every other message.
"${pip[@]}" -r tools/requirements-ros.txt -r tools/requirements-dev.txt \
    2> >(grep -v '^WARNING: Location .* is ignored' >&2)
"$venv/bin/python" tools/patch_ros_wheel_cmake.py
