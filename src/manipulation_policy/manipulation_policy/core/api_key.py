"""The API key shared by the policy server and the robot: where it is read from. No ROS.

One variable name, one key-file reader, one notion of a usable key for both
sides. The robot never takes it from a ROS parameter (any DDS peer can read a
parameter with ``ros2 param get``/``dump``): it comes from a file named by the
``remote_api_key_file`` parameter (the name is not secret) or from the
``MANIPULATION_POLICY_API_KEY`` environment variable; the server reads
``--api-key-file`` or the same variable.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

API_KEY_ENV = "MANIPULATION_POLICY_API_KEY"
MAX_KEY_FILE_BYTES = 4096


class ApiKeyUnusable(ValueError):
    """The key file or variable cannot be used; the message says why."""


def read_api_key(key_file: str, environ: Mapping[str, str] = os.environ) -> str:
    """The key from ``key_file`` when it is named, else from the environment ("" = none)."""
    if key_file.strip():
        key = _read_key_file(key_file.strip())
        where = f"API key file {key_file!r}"
        if not key:
            raise ApiKeyUnusable(f"{where} is empty")
    else:
        key = environ.get(API_KEY_ENV, "").strip()
        where = f"the API key in {API_KEY_ENV}"
        if not key:
            return ""
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ApiKeyUnusable(f"{where} must hold one printable ASCII token without spaces")
    return key


def _read_key_file(path: str) -> str:
    # A regular file of bounded size only: a FIFO or /dev/zero must not hang the node.
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ApiKeyUnusable(f"API key file {path!r} is not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise ApiKeyUnusable(
                f"API key file {path!r} is over {MAX_KEY_FILE_BYTES} bytes; not a key"
            )
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ApiKeyUnusable(f"cannot read API key file {path!r}: {exc.strerror or exc}") from None
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ApiKeyUnusable(f"API key file {path!r} is not ASCII text") from None
