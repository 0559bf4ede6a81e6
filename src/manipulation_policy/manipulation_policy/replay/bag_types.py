"""The message types a replay reads and writes, without ROS: rosbags' type store for
ROS 2 Humble plus manipulation_msgs, registered from its own .msg files.

The .msg files are looked for in ``--msgs-dir`` (``MANIPULATION_MSGS_DIR``), then in
each ``share/manipulation_msgs/msg`` of ``AMENT_PREFIX_PATH`` (a built or installed
workspace), then in the source tree this package belongs to, then in
``src/manipulation_msgs/msg`` under the current directory (a checkout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rosbags.interfaces import Nodetype
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from manipulation_policy.replay.errors import ReplayInputError

PACKAGE = "manipulation_msgs"
MESSAGES = ("PolicyOutput", "PolicyActionChunk", "Observation")
MSGS_DIR_ENV = "MANIPULATION_MSGS_DIR"

POLICY_OUTPUT = "manipulation_msgs/msg/PolicyOutput"
POLICY_ACTION_CHUNK = "manipulation_msgs/msg/PolicyActionChunk"
OBSERVATION = "manipulation_msgs/msg/Observation"

_NUMPY_TYPES = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
    "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64,
}


def msgs_dir_candidates(given: Optional[str] = None) -> list[Path]:
    """Where manipulation_msgs' .msg files may be, in the order they are tried."""
    candidates = [Path(given)] if given else []
    if os.environ.get(MSGS_DIR_ENV):
        candidates.append(Path(os.environ[MSGS_DIR_ENV]))
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        candidates.append(Path(prefix) / "share" / PACKAGE / "msg")
    # src/manipulation_policy/manipulation_policy/replay/bag_types.py -> src/manipulation_msgs
    candidates.append(Path(__file__).resolve().parents[3] / PACKAGE / "msg")
    candidates.append(Path.cwd() / "src" / PACKAGE / "msg")
    return candidates


def find_msgs_dir(given: Optional[str] = None) -> Path:
    for candidate in msgs_dir_candidates(given):
        if all((candidate / f"{name}.msg").is_file() for name in MESSAGES):
            return candidate
        if given and candidate == Path(given):
            raise ReplayInputError(f"--msgs-dir {given}: no {', '.join(MESSAGES)} .msg files there")
    raise ReplayInputError(
        f"cannot find {PACKAGE}'s .msg files: run from a checkout, source the workspace, "
        f"or give --msgs-dir (or {MSGS_DIR_ENV}) = the src/{PACKAGE}/msg folder"
    )


def message_typestore(msgs_dir: Optional[str] = None) -> Typestore:
    """ROS 2 Humble's standard messages and manipulation_msgs'."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    folder = find_msgs_dir(msgs_dir)
    types: dict[str, Any] = {}
    for name in MESSAGES:
        text = (folder / f"{name}.msg").read_text(encoding="utf-8")
        types.update(get_types_from_msg(text, f"{PACKAGE}/msg/{name}"))
    store.register(types)
    return store


def build_message(store: Typestore, typename: str, fields: Mapping[str, Any]) -> Any:
    """A ``typename`` message of ``store`` from nested field dicts (``robot/message_fields``'
    shape): a field left out gets its type's default."""
    message_class = store.types[typename]
    _, field_defs = store.fielddefs[typename]
    values = {name: _field_value(store, desc, fields.get(name)) for name, desc in field_defs}
    return message_class(**values)


def _field_value(store: Typestore, desc: tuple, value: Any) -> Any:
    kind, detail = desc
    if kind == Nodetype.NAME:
        return build_message(store, detail, value or {})
    if kind == Nodetype.BASE:
        type_name = detail[0]
        if value is not None:
            return value
        return "" if type_name == "string" else False if type_name == "bool" else (
            0.0 if type_name.startswith("float") else 0)
    item_desc, length = detail
    items: Sequence[Any] = value if value is not None else ()
    if kind == Nodetype.ARRAY and not items:
        items = [None] * length
    item_kind, item_detail = item_desc
    if item_kind == Nodetype.BASE and item_detail[0] in _NUMPY_TYPES:
        return np.asarray(items if value is not None else [0] * len(items),
                          dtype=_NUMPY_TYPES[item_detail[0]])
    return [_field_value(store, item_desc, item) for item in items]
