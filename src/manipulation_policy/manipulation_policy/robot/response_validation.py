"""The robot's check of a policy server's answer before it can become a command. No ROS.

``validate_chunk(payload, expectation)`` turns a decoded JSON answer into an
ActionChunk (``validate_answer``: its first action), or raises InputError
naming the first field at fault. On top of the contract's types (strict JSON
types, finite numbers, at most MAX_CHUNK_LENGTH actions, a period in
(0, MAX_ACTION_PERIOD_SEC]) it checks the answer's *form*, for the top-level
action and for every action of ``actions`` alike:

- a part announced by its flag is really there (``has_eef_target: true``
  with no ``eef_target_pose`` is refused, not read as the origin);
- confidence and gripper_command are within [0, 1];
- one joint delta and one joint position target per joint sent, unless the
  action's joint_names says which joints they are (then, as the contract
  checks, one per name, no name empty or twice; the safety guard matches them
  to the robot's joints by name);
- an end-effector target's orientation is a unit quaternion;
- the answer's reference_frame, when given, is the frame the robot asked in.
  The published frame is always the robot's own: a server cannot move a
  target into another frame;
- the answer's request_id, when given, is the request's (``ForeignAnswer``
  otherwise: a late answer to an earlier request is never this one's; a server
  that echoes none, as upstream's, is not refused for it);
- the top-level action is the chunk's first (the two views of one answer agree).

An answer without ``actions`` (upstream's, older servers') is a chunk of one.

What the robot may do (workspace, step sizes, joint, gripper and base limits,
the confidence floor) is not judged here: the node's safety guard
(``robot/safety_guard.py``) applies the same limits to every action of both
nodes when it is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from manipulation_policy.core.contract import (
    ActionModel,
    action_from_wire,
    check_announced_parts,
    parse_response,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import ActionChunk, PolicyAction
from manipulation_policy.robot.safety_guard import QUATERNION_NORM_TOLERANCE, vector_length

MAX_FRAME_ID_CHARS = 256


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


def validate_chunk(payload: Any, expect: Expectation) -> ActionChunk:
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
    first = _checked_action(response, "", expect)
    if response.actions is None or response.action_period_sec is None:
        return ActionChunk.of(first)
    actions = tuple(
        _checked_action(action, f"actions[{index}]", expect)
        for index, action in enumerate(response.actions)
    )
    if actions[0] != first:
        raise InputError(
            "actions[0]", "is not the top-level action (the top level carries the first action)"
        )
    return ActionChunk(actions, response.action_period_sec)


def validate_answer(payload: Any, expect: Expectation) -> PolicyAction:
    """The answer's first action (its top level), after the whole answer was checked."""
    return validate_chunk(payload, expect).actions[0]


def _checked_action(action: ActionModel, path: str, expect: Expectation) -> PolicyAction:
    """One action of the answer, checked, in the robot's frame."""
    prefix = f"{path}." if path else ""
    check_announced_parts(action, path)
    _check_form(action, prefix, expect)
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


# ---------------------------------------------------------------- form


def _within_unit_interval(field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(field, f"must be within [0, 1], got {value!r}")


def _check_form(action: ActionModel, prefix: str, expect: Expectation) -> None:
    _within_unit_interval(f"{prefix}confidence", action.confidence)
    _within_unit_interval(f"{prefix}gripper_command", action.gripper_command)
    if not action.joint_names:
        for flag, name in (("has_joint_deltas", "joint_deltas"),
                           ("has_joint_positions", "joint_positions")):
            values = getattr(action, name)
            if getattr(action, flag) and len(values) != expect.joint_count:
                raise InputError(
                    f"{prefix}{name}",
                    f"has {len(values)} values for the {expect.joint_count} joints sent",
                )
    if action.has_eef_target:
        q = action.eef_target_pose.orientation
        norm = vector_length((q.x, q.y, q.z, q.w))
        if not abs(norm - 1.0) <= QUATERNION_NORM_TOLERANCE:
            raise InputError(
                f"{prefix}eef_target_pose.orientation",
                f"is not a unit quaternion (length {norm:.6g})",
            )
