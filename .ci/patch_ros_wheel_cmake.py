"""Repair the CMake files that the ROS 2 PyPI wheels install into a venv.

The wheels were built on a manylinux host, and the CMake targets they export
name that host's Python and numpy include directories. CMake refuses a target
whose include directory does not exist, so `colcon build` of any message
package fails. This rewrites those paths to the ones of this interpreter.
Idempotent: a second run finds nothing to change.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy

BUILD_HOST_PYTHON_PREFIX = "/opt/python/cp311-cp311"
BUILD_HOST_PYTHON_INCLUDE = f"{BUILD_HOST_PYTHON_PREFIX}/include/python3.11"
BUILD_HOST_NUMPY_INCLUDE = (
    f"{BUILD_HOST_PYTHON_PREFIX}/lib/python3.11/site-packages/numpy/_core/include"
)


def replacements() -> dict[str, str]:
    return {
        BUILD_HOST_NUMPY_INCLUDE: numpy.get_include(),
        BUILD_HOST_PYTHON_INCLUDE: sysconfig.get_paths()["include"],
    }


def patch_tree(share_dir: Path) -> int:
    changed = 0
    subs = replacements()
    for cmake_file in share_dir.rglob("*.cmake"):
        text = cmake_file.read_text(errors="surrogateescape")
        if BUILD_HOST_PYTHON_PREFIX not in text:
            continue
        for old, new in subs.items():
            text = text.replace(old, new)
        cmake_file.write_text(text, errors="surrogateescape")
        changed += 1
    return changed


def main() -> int:
    share_dir = Path(sys.prefix) / "share"
    if not share_dir.is_dir():
        print(f"no {share_dir}: are the ROS wheels installed in this venv?", file=sys.stderr)
        return 1
    print(f"patched {patch_tree(share_dir)} CMake files under {share_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
