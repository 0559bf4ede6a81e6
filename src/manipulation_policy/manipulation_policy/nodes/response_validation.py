"""The robot's check of a policy server's answer before it can become a command. No ROS.

``validate_answer(payload, expectation, limits)`` turns a decoded JSON answer
into a PolicyAction, or raises InputError naming the first field at fault.
On top of the contract's types (strict JSON types, finite numbers) it checks
what the answer *means*:

- a part announced by its flag is really there (``has_eef_target: true``
  with no ``eef_target_pose`` is refused, not read as the origin);
- confidence and gripper_command are within [0, 1];
- one joint delta per joint sent, each within ``max_joint_delta``;
- an end-effector target is a unit quaternion and a position within reach
  (``max_eef_position_m`` for an absolute target, ``max_eef_delta_m`` for a
  delta), a base hint within the speed limits;
- the answer's reference_frame, when given, is the frame the robot asked in.
  The published frame is always the robot's own: a server cannot move a
  target into another frame.

The bounds are the robot's (node parameters), not the server's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Optional

from pydantic import BaseModel

from manipulation_policy.core.contract import InferResponse, parse_response, response_to_action
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import EefTargetMode, PolicyAction

MAX_FRAME_ID_CHARS = 256
QUATERNION_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ResponseLimits:
    """What the robot accepts from a server; defaults are conservative for one step."""

    max_eef_position_m: float = 1.5  # absolute target: distance from the frame's origin
    max_eef_delta_m: float = 0.1  # delta target: length of the translation
    max_joint_delta: float = 0.25  # per joint and step, rad (or m for prismatic joints)
    max_base_linear_speed: float = 0.5  # m/s
    max_base_angular_speed: float = 1.0  # rad/s


@dataclass(frozen=True)
class Expectation:
    """What the robot asked: the answer must fit this request."""

    reference_frame: str
    joint_count: int

    @classmethod
    def of_request(cls, body: dict) -> Expectation:
        joints = body.get("joint_states") or {}
        count = max(len(joints.get("name") or ()), len(joints.get("position") or ()))
        return cls(reference_frame=str(body.get("reference_frame", "")), joint_count=count)


def frame_id_problem(value: Any) -> Optional[str]:
    """Why ``value`` cannot be a ROS frame id (a string every ROS layer carries), or None."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_FRAME_ID_CHARS:
        return f"must be at most {MAX_FRAME_ID_CHARS} characters, got {len(value)}"
    # isprintable() is False for control characters (NUL included) and lone surrogates.
    if not value.isprintable() or any(ch.isspace() for ch in value):
        return f"must be printable text without spaces or control characters, got {value!r}"
    return None


def validate_answer(payload: Any, expect: Expectation, limits: ResponseLimits) -> PolicyAction:
    response = parse_response(payload)
    _check_required_parts(response)
    _check_ranges(response, expect, limits)
    if "reference_frame" in response.model_fields_set:
        problem = frame_id_problem(response.reference_frame)
        if problem is not None:
            raise InputError("reference_frame", problem)
        if response.reference_frame != expect.reference_frame:
            raise InputError(
                "reference_frame",
                f"is {response.reference_frame!r}, but the robot asked in "
                f"{expect.reference_frame!r}",
            )
    return replace(response_to_action(response), reference_frame=expect.reference_frame)


# ---------------------------------------------------------------- presence


def _require(model: BaseModel, path: str, names: Iterable[str], because: str) -> None:
    for name in names:
        if name not in model.model_fields_set:
            raise InputError(f"{path}.{name}" if path else name, f"is missing, but {because}")


def _require_complete(model: BaseModel, path: str, because: str) -> None:
    """Every field of a pose/twist part is given, level by level (a part announced by
    its flag must not be read from defaults)."""
    _require(model, path, type(model).model_fields, because)
    for name in type(model).model_fields:
        part = getattr(model, name)
        if isinstance(part, BaseModel):
            _require_complete(part, f"{path}.{name}", because)


def _check_required_parts(response: InferResponse) -> None:
    if response.has_eef_target:
        because = "has_eef_target is true"
        _require(response, "", ["eef_target_pose"], because)
        _require_complete(response.eef_target_pose, "eef_target_pose", because)
    if response.has_joint_deltas:
        _require(response, "", ["joint_deltas"], "has_joint_deltas is true")
    if response.gripper_active:
        _require(response, "", ["gripper_command"], "gripper_active is true")
    if response.has_base_hint:
        because = "has_base_hint is true"
        _require(response, "", ["base_velocity_hint"], because)
        _require_complete(response.base_velocity_hint, "base_velocity_hint", because)


# ---------------------------------------------------------------- ranges


def _within_unit_interval(field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(field, f"must be within [0, 1], got {value!r}")


def _at_most(field: str, value: float, limit: float, unit: str, parameter: str) -> None:
    if not value <= limit:  # also refuses an overflow to inf
        raise InputError(field, f"is {value:.6g} {unit}, over {parameter}={limit:g}")


def _check_ranges(response: InferResponse, expect: Expectation, limits: ResponseLimits) -> None:
    _within_unit_interval("confidence", response.confidence)
    _within_unit_interval("gripper_command", response.gripper_command)

    if response.has_joint_deltas:
        deltas = response.joint_deltas
        if len(deltas) != expect.joint_count:
            raise InputError(
                "joint_deltas",
                f"has {len(deltas)} values for the {expect.joint_count} joints sent",
            )
        for index, value in enumerate(deltas):
            _at_most(f"joint_deltas[{index}]", abs(value), limits.max_joint_delta,
                     "(rad or m)", "max_joint_delta")

    if response.has_eef_target:
        pose = response.eef_target_pose
        q = pose.orientation
        norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
        if not abs(norm - 1.0) <= QUATERNION_NORM_TOLERANCE:
            raise InputError(
                "eef_target_pose.orientation",
                f"is not a unit quaternion (length {norm:.6g})",
            )
        p = pose.position
        length = math.hypot(p.x, p.y, p.z)
        if response.eef_target_mode == EefTargetMode.ABSOLUTE.value:
            _at_most("eef_target_pose.position", length, limits.max_eef_position_m,
                     "m from the frame origin", "max_eef_position_m")
        else:
            _at_most("eef_target_pose.position", length, limits.max_eef_delta_m,
                     "m of translation", "max_eef_delta_m")

    if response.has_base_hint:
        hint = response.base_velocity_hint
        _at_most("base_velocity_hint.linear",
                 math.hypot(hint.linear.x, hint.linear.y, hint.linear.z),
                 limits.max_base_linear_speed, "m/s", "max_base_linear_speed")
        _at_most("base_velocity_hint.angular",
                 math.hypot(hint.angular.x, hint.angular.y, hint.angular.z),
                 limits.max_base_angular_speed, "rad/s", "max_base_angular_speed")
