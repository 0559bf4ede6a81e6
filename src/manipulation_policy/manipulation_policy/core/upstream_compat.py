"""Answers in the upstream MobileManipulationCore's other shapes -> the canonical response.

Upstream's client accepts, besides the PolicyOutput-shaped answer, a raw
OpenVLA 7-dim action vector (dx, dy, dz, droll, dpitch, dyaw, gripper) under
``action``, ``actions``, ``action_values`` or ``openvla_action``, at the top
level or inside ``result``; the vector may be nested one level (``[[...]]``)
or be an object holding it under ``action``, ``actions``, ``action_values``,
``values`` or ``data``. It uses the vector only when the answer names no
target (``has_eef_target`` and ``has_joint_deltas`` both false or absent).

An answer carrying this contract's action chunk (``actions`` holding action
objects, ``action_period_sec``) is not one of these shapes: the robot's client
validates it as it is (``response_validation.is_chunk_answer``) and reads
``actions`` as a chunk only then, never as a vector.

``canonical_answer`` turns such an answer into the canonical response dict,
through the same conversion the server's OpenVLA backend uses (gripper
normalisation, scaling, clipping, caps); the result then goes through the
ordinary strict validation. Pure code, no ROS, no HTTP.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from manipulation_policy.core.contract import pose_to_wire
from manipulation_policy.core.openvla_actions import (
    OPENVLA_ACTION_DIM,
    ActionConversionOptions,
    convert_openvla_action,
)
from manipulation_policy.core.policy_types import DEFAULT_REFERENCE_FRAME, Observation

VECTOR_KEYS = ("action", "actions", "action_values", "openvla_action")
NESTED_VECTOR_KEYS = ("action", "actions", "action_values", "values", "data")
# A hostile answer cannot make the search deep: upstream nests at most this far.
MAX_NESTING = 4


def _coerce_vector(value: Any, depth: int = 0) -> Optional[list[float]]:
    """The first 7 numbers of a vector-like value, if all finite (upstream's rules)."""
    if value is None or depth > MAX_NESTING:
        return None
    if isinstance(value, dict):
        for key in NESTED_VECTOR_KEYS:
            found = _coerce_vector(value.get(key), depth + 1)
            if found is not None:
                return found
        return None
    if not isinstance(value, list):
        return None
    if len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if len(value) < OPENVLA_ACTION_DIM:
        return None
    numbers = []
    for item in value[:OPENVLA_ACTION_DIM]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return None
        numbers.append(float(item))
    return numbers if all(math.isfinite(v) for v in numbers) else None


def raw_action_vector(payload: dict) -> Optional[list[float]]:
    """The raw OpenVLA action an upstream-shaped answer carries, if any."""
    for key in VECTOR_KEYS:
        found = _coerce_vector(payload.get(key))
        if found is not None:
            return found
    result = payload.get("result")
    if isinstance(result, dict):
        for key in VECTOR_KEYS:
            found = _coerce_vector(result.get(key))
            if found is not None:
                return found
    return None


def canonical_answer(
    payload: Any,
    options: Optional[ActionConversionOptions] = None,
    reference_frame: str = DEFAULT_REFERENCE_FRAME,
) -> Any:
    """``payload`` with a raw action vector turned into the canonical fields; any other
    payload (canonical, or not an object) is returned unchanged for validation."""
    if not isinstance(payload, dict):
        return payload
    if payload.get("has_eef_target") is True or payload.get("has_joint_deltas") is True:
        return payload
    vector = raw_action_vector(payload)
    if vector is None:
        return payload
    frame = payload.get("reference_frame")
    frame = frame if isinstance(frame, str) and frame else reference_frame
    # Upstream reads the vector as a delta in the reference frame: no current pose here.
    converted = convert_openvla_action(vector, Observation(reference_frame=frame), options)
    action = converted.action
    target = action.eef_target
    if target is None:  # cannot happen for a finite vector; never guess a motion
        return payload
    canonical = dict(payload)
    canonical.update(
        has_eef_target=True,
        eef_target_pose=pose_to_wire(target),
        eef_target_mode="delta",
        reference_frame=frame,
    )
    # As upstream: values the answer gives itself win over those from the vector.
    canonical.setdefault("gripper_command", action.gripper_command)
    canonical.setdefault("gripper_active", True)
    canonical.setdefault("confidence", action.confidence)
    return canonical
