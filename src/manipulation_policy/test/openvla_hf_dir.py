"""Where the tests find the OpenVLA authors' remote code, and what they do without it.

The remote code (``prismatic/extern/hf`` of github.com/openvla/openvla) is
never part of this repository. The tests take ``OPENVLA_HF_DIR`` when it is
set, else the project's shared copy beside the checkout
(``../shared/openvla-hf``), which development machines and CI have.

- ``OPENVLA_HF_DIR`` unset and no shared copy: the tests skip, with one line
  naming what is missing.
- ``OPENVLA_HF_DIR`` set (``make test`` sets it whenever ../shared/openvla-hf
  is there): the tests were asked for, so a missing file or package fails
  them instead of skipping them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import pytest

REMOTE_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
# What the remote code imports beyond transformers (timm needs torchvision too).
PACKAGES = ("timm", "torchvision")
SHARED_COPY = Path(__file__).resolve().parents[3].parent / "shared" / "openvla-hf"


def required() -> bool:
    return bool(os.environ.get("OPENVLA_HF_DIR"))


def hf_dir() -> Path:
    return Path(os.environ.get("OPENVLA_HF_DIR") or SHARED_COPY)


def missing_files() -> Optional[str]:
    """One line naming what is missing of the remote code, or None."""
    where = hf_dir()
    if not where.is_dir():
        unset = "" if required() else " and OPENVLA_HF_DIR is not set"
        return (
            f"OpenVLA's remote code not found: no folder {where}{unset} "
            "(prismatic/extern/hf of github.com/openvla/openvla)"
        )
    absent = [name for name in REMOTE_FILES if not (where / name).is_file()]
    if absent:
        return f"OpenVLA's remote code incomplete: {where} has no {', '.join(absent)}"
    return None


def missing_packages() -> Optional[str]:
    absent = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if absent:
        return f"OpenVLA's remote code needs {', '.join(absent)} (.ci/requirements-dev.txt)"
    return None


def skip_or_fail(reason: str, module_level: bool = False) -> None:
    """Skip where nobody asked for these tests; fail where OPENVLA_HF_DIR asks for them.

    Every skip is raised on the one line below, so ``pytest -ra`` folds the skips
    of all the files that need the remote code into one line."""
    if required():
        pytest.fail(f"{reason} (OPENVLA_HF_DIR is set, so these tests must run)", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)
