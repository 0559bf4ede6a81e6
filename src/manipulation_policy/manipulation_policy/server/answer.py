"""The server's check of its own backend's answer, before a robot can get it.

A backend is a plugin (``--backend module:Class``) and may return anything:
a string where numbers belong, None for the frame, a confidence of 5, a chunk
of 10 000 actions. The answer is built into the wire JSON only from a
PolicyAction, or an ActionChunk of them, whose every part has the right type;
that JSON must then validate against InferResponse (types and ranges, chunk
length and period, strictly) and encode as UTF-8. Anything else is a
BackendAnswerError naming the field; the server answers it as a 500.

The chunk's first action is the answer's top level, so its problems are named
there (``confidence``); those of a later action by its place (``actions[3].confidence``).
"""

from __future__ import annotations

import enum
import math
from typing import Any, Optional

from pydantic import ValidationError

from manipulation_policy.core.contract import (
    InferResponse,
    chunk_to_response,
    first_input_error,
)
from manipulation_policy.core.policy_types import (
    MAX_CHUNK_LENGTH,
    ActionChunk,
    EefTargetMode,
    PolicyAction,
    Pose,
    Twist,
    geometry_parts,
)


class BackendAnswerError(ValueError):
    """The backend's answer breaks the response contract; ``field`` names where."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_number(value: Any) -> bool:
    # bool is an int subclass but never a number on the wire.
    return isinstance(value, (int, float)) and not isinstance(value, (bool, enum.Enum))


def _check_number(value: Any, field: str) -> None:
    if not _is_number(value):
        raise BackendAnswerError(field, f"expected a number, got {_type_name(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise BackendAnswerError(field, f"{value!r:.40} is not a finite number")


def _check_fields(value: Any, kind: type, field: str) -> None:
    """A Vector3 / Quaternion / Pose / Twist made of numbers, recursively."""
    if type(value) is not kind:
        raise BackendAnswerError(field, f"expected {kind.__name__}, got {_type_name(value)}")
    for name, part in geometry_parts(kind):
        path = f"{field}.{name}"
        if part is None:
            _check_number(getattr(value, name), path)
        else:
            _check_fields(getattr(value, name), part, path)


def check_action_types(action: Any, path: str = "") -> None:
    """Every part of a backend's PolicyAction has the type the wire needs (named on
    failure, under ``path``: "" for the top level, "actions[3]" for a chunk's fourth)."""
    prefix = f"{path}." if path else ""
    if not isinstance(action, PolicyAction):
        if path:
            raise BackendAnswerError(path, f"is a {_type_name(action)}, not a PolicyAction")
        raise BackendAnswerError(
            "body",
            f"predict() returned {_type_name(action)}, not a PolicyAction or an ActionChunk",
        )
    if not isinstance(action.reference_frame, str):
        raise BackendAnswerError(
            f"{prefix}reference_frame",
            f"expected a string, got {_type_name(action.reference_frame)}",
        )
    if action.eef_target is not None:
        _check_fields(action.eef_target, Pose, f"{prefix}eef_target_pose")
    if action.base_velocity_hint is not None:
        _check_fields(action.base_velocity_hint, Twist, f"{prefix}base_velocity_hint")
    for name in ("joint_deltas", "joint_positions"):
        values = getattr(action, name)
        if values is None:
            continue
        if not isinstance(values, (tuple, list)):
            raise BackendAnswerError(
                f"{prefix}{name}", f"expected a sequence of numbers, got {_type_name(values)}"
            )
        for index, value in enumerate(values):
            _check_number(value, f"{prefix}{name}[{index}]")
    if action.joint_names is not None:
        names = action.joint_names
        if not isinstance(names, (tuple, list)):
            raise BackendAnswerError(
                f"{prefix}joint_names", f"expected a sequence of text, got {_type_name(names)}"
            )
        for index, name in enumerate(names):
            if not isinstance(name, str):
                raise BackendAnswerError(
                    f"{prefix}joint_names[{index}]", f"expected text, got {_type_name(name)}"
                )
    if action.gripper_command is not None:
        _check_number(action.gripper_command, f"{prefix}gripper_command")
    _check_number(action.confidence, f"{prefix}confidence")
    try:
        EefTargetMode(action.eef_target_mode)
    except (ValueError, TypeError):
        raise BackendAnswerError(
            f"{prefix}eef_target_mode",
            f"{action.eef_target_mode!r} is not 'absolute' or 'delta'",
        ) from None


def checked_chunk(answer: Any) -> ActionChunk:
    """A backend's answer (a PolicyAction or an ActionChunk) as a chunk whose every part
    has the type the wire needs; BackendAnswerError names the first that has not.

    An ActionChunk checks itself when built, but a plugin can get around that
    (``object.__setattr__``), so its parts are checked again here."""
    if not isinstance(answer, ActionChunk):
        check_action_types(answer)
        return ActionChunk.of(answer)
    actions = answer.actions
    if not isinstance(actions, (tuple, list)):
        raise BackendAnswerError(
            "actions", f"expected a sequence of PolicyAction, got {_type_name(actions)}"
        )
    if not 1 <= len(actions) <= MAX_CHUNK_LENGTH:
        raise BackendAnswerError(
            "actions", f"holds {len(actions)} actions, not 1 to {MAX_CHUNK_LENGTH}"
        )
    for index, action in enumerate(actions):
        check_action_types(action, f"actions[{index}]" if index else "")
    frame = actions[0].reference_frame
    for index, action in enumerate(actions[1:], start=1):
        if action.reference_frame != frame:
            raise BackendAnswerError(
                f"actions[{index}].reference_frame",
                f"{action.reference_frame!r:.80} is not the chunk's frame {frame!r:.80}",
            )
    _check_number(answer.action_period_sec, "action_period_sec")
    return answer


def _unencodable_text_field(body: dict) -> Optional[str]:
    """The field whose text holds a lone surrogate (which UTF-8 cannot carry), if any.

    Text is at the top level, in each action's frame, which is the first action's
    (``checked_chunk``), and in each action's joint_names: the strict InferResponse
    check before this has made every other part a number."""
    for name, value in body.items():
        if not _encodable(value):
            return name
    for index, action in enumerate(body.get("actions") or ()):
        for position, joint in enumerate(action.get("joint_names") or ()):
            if not _encodable(joint):
                return f"actions[{index}].joint_names[{position}]"
    return None


def _encodable(value: Any) -> bool:
    if isinstance(value, list):
        return all(_encodable(item) for item in value)
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def checked_response(
    answer: Any,
    request_id: Optional[str] = None,
    inference_time_ms: Optional[float] = None,
) -> dict:
    """The wire JSON for a backend's answer (a PolicyAction or an ActionChunk), or
    BackendAnswerError naming the bad field."""
    chunk = checked_chunk(answer)
    try:
        body = chunk_to_response(
            chunk, request_id=request_id, inference_time_ms=inference_time_ms
        )
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise BackendAnswerError("body", str(exc)) from None
    try:
        InferResponse.model_validate(body, strict=True)
    except ValidationError as exc:
        problem = first_input_error(exc)
        raise BackendAnswerError(problem.field, problem.message) from None
    bad_text = _unencodable_text_field(body)
    if bad_text is not None:
        raise BackendAnswerError(bad_text, "text is not valid Unicode (lone surrogate)")
    return body
