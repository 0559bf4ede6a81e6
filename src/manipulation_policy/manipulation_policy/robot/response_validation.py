"""The robot's check of a policy server's answer before it can become a command. No ROS.

``validate_chunk(payload, expectation, limits)`` turns a decoded JSON answer
into an ActionChunk (``validate_answer``: its first action), or raises
InputError naming the first field at fault. On top of the contract's types
(strict JSON types, finite numbers, at most MAX_CHUNK_LENGTH actions, a period
in (0, MAX_ACTION_PERIOD_SEC]) it checks what the answer *means*, for the
top-level action and for every action of ``actions`` alike:

- a part announced by its flag is really there (``has_eef_target: true``
  with no ``eef_target_pose`` is refused, not read as the origin);
- confidence and gripper_command are within [0, 1];
- one joint delta per joint sent, each within ``max_joint_delta``;
- an end-effector target is a unit quaternion and a position within reach
  (``max_eef_position_m`` for an absolute target, ``max_eef_delta_m`` for a
  delta), a base hint within the speed limits;
- the answer's reference_frame, when given, is the frame the robot asked in.
  The published frame is always the robot's own: a server cannot move a
  target into another frame;
- the answer's request_id, when given, is the request's (``ForeignAnswer``
  otherwise: a late answer to an earlier request is never this one's; a server
  that echoes none, as upstream's, is not refused for it);
- the top-level action is the chunk's first (the two views of one answer agree).

An answer without ``actions`` (upstream's, older servers') is a chunk of one.

The bounds are the robot's (node parameters), not the server's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from manipulation_policy.core.contract import (
    ActionModel,
    action_from_wire,
    check_announced_parts,
    parse_response,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import ActionChunk, EefTargetMode, PolicyAction

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


class ForeignAnswer(InputError):
    """The answer names another request than the one it came for."""


@dataclass(frozen=True)
class Expectation:
    """What the robot asked: the answer must fit this request."""

    reference_frame: str
    joint_count: int
    request_id: Optional[str] = None  # None: the answer's request_id is not checked

    @classmethod
    def of_request(cls, body: dict) -> Expectation:
        joints = body.get("joint_states") or {}
        count = max(len(joints.get("name") or ()), len(joints.get("position") or ()))
        request_id = body.get("request_id")
        return cls(
            reference_frame=str(body.get("reference_frame", "")),
            joint_count=count,
            request_id=request_id if isinstance(request_id, str) else None,
        )


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


def is_chunk_answer(payload: Any) -> bool:
    """Whether an answer speaks this contract's chunk fields: ``action_period_sec``, or an
    ``actions`` list holding an object. Upstream's answers use ``actions`` for a raw
    action vector (numbers, never objects) and have no period: those are not."""
    if not isinstance(payload, dict):
        return False
    actions = payload.get("actions")
    return payload.get("action_period_sec") is not None or (
        isinstance(actions, list) and any(isinstance(item, dict) for item in actions)
    )


def validate_chunk(payload: Any, expect: Expectation, limits: ResponseLimits) -> ActionChunk:
    """The answer's chunk, every action checked (see the module docstring); InputError
    names the first field at fault (``actions[3].confidence``), ForeignAnswer when the
    answer is another request's."""
    response = parse_response(payload)
    if (
        expect.request_id is not None
        and response.request_id is not None
        and response.request_id != expect.request_id
    ):
        raise ForeignAnswer(
            "request_id",
            f"answers request {response.request_id!r}, not {expect.request_id!r}",
        )
    first = _checked_action(response, "", expect, limits)
    if response.actions is None or response.action_period_sec is None:
        return ActionChunk.of(first)
    actions = tuple(
        _checked_action(action, f"actions[{index}]", expect, limits)
        for index, action in enumerate(response.actions)
    )
    if actions[0] != first:
        raise InputError(
            "actions[0]", "is not the top-level action (the top level carries the first action)"
        )
    return ActionChunk(actions, response.action_period_sec)


def validate_answer(payload: Any, expect: Expectation, limits: ResponseLimits) -> PolicyAction:
    """The answer's first action (its top level), after the whole answer was checked."""
    return validate_chunk(payload, expect, limits).actions[0]


def _checked_action(
    action: ActionModel, path: str, expect: Expectation, limits: ResponseLimits
) -> PolicyAction:
    """One action of the answer, checked, in the robot's frame."""
    prefix = f"{path}." if path else ""
    check_announced_parts(action, path)
    _check_ranges(action, prefix, expect, limits)
    if "reference_frame" in action.model_fields_set:
        problem = frame_id_problem(action.reference_frame)
        if problem is not None:
            raise InputError(f"{prefix}reference_frame", problem)
        if action.reference_frame != expect.reference_frame:
            raise InputError(
                f"{prefix}reference_frame",
                f"is {action.reference_frame!r}, but the robot asked in "
                f"{expect.reference_frame!r}",
            )
    return action_from_wire(action, expect.reference_frame)


# ---------------------------------------------------------------- ranges


def _within_unit_interval(field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(field, f"must be within [0, 1], got {value!r}")


def _at_most(field: str, value: float, limit: float, unit: str, parameter: str) -> None:
    if not value <= limit:  # also refuses an overflow to inf
        raise InputError(field, f"is {value:.6g} {unit}, over {parameter}={limit:g}")


def _check_ranges(
    action: ActionModel, prefix: str, expect: Expectation, limits: ResponseLimits
) -> None:
    _within_unit_interval(f"{prefix}confidence", action.confidence)
    _within_unit_interval(f"{prefix}gripper_command", action.gripper_command)

    if action.has_joint_deltas:
        deltas = action.joint_deltas
        if len(deltas) != expect.joint_count:
            raise InputError(
                f"{prefix}joint_deltas",
                f"has {len(deltas)} values for the {expect.joint_count} joints sent",
            )
        for index, value in enumerate(deltas):
            _at_most(f"{prefix}joint_deltas[{index}]", abs(value), limits.max_joint_delta,
                     "(rad or m)", "max_joint_delta")

    if action.has_eef_target:
        pose = action.eef_target_pose
        q = pose.orientation
        norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
        if not abs(norm - 1.0) <= QUATERNION_NORM_TOLERANCE:
            raise InputError(
                f"{prefix}eef_target_pose.orientation",
                f"is not a unit quaternion (length {norm:.6g})",
            )
        p = pose.position
        length = math.hypot(p.x, p.y, p.z)
        if action.eef_target_mode == EefTargetMode.ABSOLUTE.value:
            _at_most(f"{prefix}eef_target_pose.position", length, limits.max_eef_position_m,
                     "m from the frame origin", "max_eef_position_m")
        else:
            _at_most(f"{prefix}eef_target_pose.position", length, limits.max_eef_delta_m,
                     "m of translation", "max_eef_delta_m")

    if action.has_base_hint:
        hint = action.base_velocity_hint
        _at_most(f"{prefix}base_velocity_hint.linear",
                 math.hypot(hint.linear.x, hint.linear.y, hint.linear.z),
                 limits.max_base_linear_speed, "m/s", "max_base_linear_speed")
        _at_most(f"{prefix}base_velocity_hint.angular",
                 math.hypot(hint.angular.x, hint.angular.y, hint.angular.z),
                 limits.max_base_angular_speed, "rad/s", "max_base_angular_speed")
