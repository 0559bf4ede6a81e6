"""Upstream MobileManipulationCore's action vector, in one place. Pure numpy, no torch.

Upstream's server answers with a raw 7-number end-effector step, and upstream's
client turns it into a command; the layout and the post-processing are the
contract of upstream's server (not of a model), so both the robot's client and any
backend whose model answers in that layout (OpenVLA: ``backends/openvla.py``)
use this code, and the robot's client never imports a model's module:

    (dx, dy, dz, droll, dpitch, dyaw, gripper)

- dx, dy, dz: translation in metres in the robot's reference frame.
- droll, dpitch, dyaw: a rotation about the reference frame's fixed X, Y and Z
  axes, in radians, turned into a quaternion with
  ``pose_math.quaternion_from_rpy`` (R = Rz(yaw) * Ry(pitch) * Rx(roll), the
  tf2 ``setRPY`` convention). The result is always that delta; the caller
  makes it absolute when the current pose is known
  (``pose_math.compose_with_current_pose``, which applies it about the
  reference frame's axes).
- gripper: OpenVLA and Bridge use 1 = open, 0 = closed ("open_is_one"), and so
  does PolicyOutput (upstream MobileManipulationCore's meaning). The value is
  normalised exactly as upstream does it (``normalize_gripper``): a value in
  [0, 1] passes through, any other becomes (v + 1) / 2 (a [-1, 1] model), then
  clamped to [0, 1]. A model trained the other way round is "close_is_one"
  (command = 1 - normalised value).

Post-processing, in upstream's order: the translation is multiplied by
``position_scale`` and the Euler vector by ``rotation_scale``; with
``clip_actions`` each translation axis is clamped to ``position_bounds``,
each rotation axis to ``rotation_bounds`` and the raw gripper value to
``gripper_bounds``. A client may ask for its own scaling and clipping per
request (``ActionOverrides``, upstream's ``openvla_*`` request fields); the
server's own caps, ``max_position_step`` and ``max_rotation_step``, apply last
and always: they cap the Euclidean length of each vector (direction kept), so
``max_position_step`` bounds the distance travelled, not each axis. A vector
with any non-finite number is not used: the result is a hold, with a reason the
caller can log.

Answers in upstream's other shapes: upstream's client accepts, besides the
PolicyOutput-shaped answer, the raw vector under
``action``, ``actions``, ``action_values`` or ``openvla_action``, at the top
level or inside ``result``; the vector may be nested one level (``[[...]]``)
or be an object holding it under ``action``, ``actions``, ``action_values``,
``values`` or ``data``. It uses the vector only when the answer names no
target (``has_eef_target`` and ``has_joint_deltas``, and this contract's
``has_joint_positions``, all false or absent).

An answer carrying this contract's action chunk (``actions`` holding action
objects, ``action_period_sec``) is not one of these shapes: the robot's client
validates it as it is (``response_validation.is_chunk_answer``) and reads
``actions`` as a chunk only then, never as a vector.

``canonical_answer`` turns such an answer into the canonical response dict,
through ``convert_action_vector`` (gripper normalisation, scaling, clipping,
caps); the result then goes through the ordinary strict validation. Pure code,
no ROS, no HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any, Optional

import numpy as np

from manipulation_policy.core.contract import pose_to_wire
from manipulation_policy.core.options import scale
from manipulation_policy.core.policy_types import (
    DEFAULT_REFERENCE_FRAME,
    ActionOverrides,
    Bounds,
    EefTargetMode,
    Observation,
    PolicyAction,
    Pose,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_from_rpy

ACTION_VECTOR_DIM = 7
ACTION_COMPONENTS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
GRIPPER_CONVENTIONS = ("open_is_one", "close_is_one")
# A vector carries no probability; this marks "a model answer" (a hold is 0), it is
# not calibrated.
VECTOR_CONFIDENCE = 1.0


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


DEFAULT_POSITION_BOUNDS: Bounds = (-1.0, 1.0)
DEFAULT_ROTATION_BOUNDS: Bounds = (-math.pi, math.pi)
DEFAULT_GRIPPER_BOUNDS: Bounds = (0.0, 1.0)


def check_bounds(name: str, value: object) -> Bounds:
    """[lower, upper]: two finite numbers, lower <= upper."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be [lower, upper], got {value!r}")
    lower, upper = (_check_number(name, v) for v in value)
    if lower > upper:
        raise ValueError(f"{name} must have lower <= upper, got {value!r}")
    return (lower, upper)


@dataclass(frozen=True)
class ActionConversionOptions:
    gripper_convention: str = "open_is_one"
    position_scale: float = 1.0
    rotation_scale: float = 1.0
    max_position_step: Optional[float] = None
    max_rotation_step: Optional[float] = None
    clip_actions: bool = False
    position_bounds: Bounds = DEFAULT_POSITION_BOUNDS
    rotation_bounds: Bounds = DEFAULT_ROTATION_BOUNDS
    gripper_bounds: Bounds = DEFAULT_GRIPPER_BOUNDS

    def __post_init__(self) -> None:
        if self.gripper_convention not in GRIPPER_CONVENTIONS:
            raise ValueError(
                f"gripper_convention must be one of {', '.join(GRIPPER_CONVENTIONS)}, "
                f"got {self.gripper_convention!r}"
            )
        for name in ("position_scale", "rotation_scale"):
            _check_number(name, getattr(self, name))
            reason = scale(getattr(self, name))  # the options' own check
            if reason is not None:
                raise ValueError(f"{name} {reason}")
        for name in ("max_position_step", "max_rotation_step"):
            value = getattr(self, name)
            if value is not None and _check_number(name, value) <= 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {value!r}")
        if not isinstance(self.clip_actions, bool):
            raise ValueError(f"clip_actions must be true or false, got {self.clip_actions!r}")
        for name in ("position_bounds", "rotation_bounds", "gripper_bounds"):
            object.__setattr__(self, name, check_bounds(name, getattr(self, name)))

    def with_overrides(self, overrides: Optional[ActionOverrides]) -> ActionConversionOptions:
        """These options with a client's per-request settings in place of the server's
        scaling and clipping; the server's step caps stay."""
        if overrides is None:
            return self
        changes = {
            name: getattr(overrides, name)
            for name in (
                "position_scale", "rotation_scale", "clip_actions",
                "position_bounds", "rotation_bounds", "gripper_bounds",
            )
            if getattr(overrides, name) is not None
        }
        return replace(self, **changes) if changes else self


@dataclass(frozen=True)
class ConvertedAction:
    """The action to publish; ``hold_reason`` says why it is a hold, if it is."""

    action: PolicyAction
    hold_reason: Optional[str] = None


def normalize_gripper(value: float) -> float:
    """A raw gripper value -> [0, 1], as upstream MobileManipulationCore maps it:
    [0, 1] unchanged, anything else (a [-1, 1] model) (v + 1) / 2, then clamped."""
    if value < 0.0 or value > 1.0:
        value = (value + 1.0) * 0.5
    return min(1.0, max(0.0, value))


def gripper_command(model_gripper: float, convention: str) -> float:
    """Model gripper value -> PolicyOutput's 0.0 (closed) .. 1.0 (open)."""
    if convention == "open_is_one":
        return normalize_gripper(model_gripper)
    if convention == "close_is_one":
        return 1.0 - normalize_gripper(model_gripper)
    raise ValueError(f"gripper_convention must be one of {', '.join(GRIPPER_CONVENTIONS)}")


def limit_length(vector: np.ndarray, max_length: Optional[float]) -> np.ndarray:
    """Shrink ``vector`` to at most ``max_length`` long, keeping its direction."""
    if max_length is None:
        return vector
    length = float(np.linalg.norm(vector))
    if length <= max_length:
        return vector
    return vector * (max_length / length)


def convert_action_vector(
    raw_action: object,
    observation: Observation,
    options: Optional[ActionConversionOptions] = None,
) -> ConvertedAction:
    """Turn one action vector into the PolicyAction to publish: a delta target
    (``backends.predictor`` composes it with the current pose). ``observation.action_overrides``
    (a client's per-request scaling/clipping) replace the matching ``options``.
    """
    options = options if options is not None else ActionConversionOptions()
    options = options.with_overrides(observation.action_overrides)
    values = np.asarray(raw_action, dtype=np.float64).reshape(-1)
    if values.shape != (ACTION_VECTOR_DIM,):
        raise ValueError(
            f"an action vector must have {ACTION_VECTOR_DIM} numbers "
            f"({', '.join(ACTION_COMPONENTS)}), got {values.size}"
        )
    frame = observation.reference_frame
    bad = [name for name, v in zip(ACTION_COMPONENTS, values, strict=True) if not math.isfinite(v)]
    if bad:
        reason = f"model output has non-finite {', '.join(bad)}: {values.tolist()}; holding"
        return ConvertedAction(PolicyAction.hold(frame), hold_reason=reason)

    translation = values[0:3] * options.position_scale
    rotation = values[3:6] * options.rotation_scale
    gripper = float(values[6])
    if options.clip_actions:
        translation = np.clip(translation, *options.position_bounds)
        rotation = np.clip(rotation, *options.rotation_bounds)
        gripper = min(max(gripper, options.gripper_bounds[0]), options.gripper_bounds[1])
    translation = limit_length(translation, options.max_position_step)
    rotation = limit_length(rotation, options.max_rotation_step)
    delta = Pose(
        position=Vector3(*(float(v) for v in translation)),
        orientation=quaternion_from_rpy(*(float(v) for v in rotation)),
    )
    action = PolicyAction(
        reference_frame=frame,
        eef_target=delta,
        eef_target_mode=EefTargetMode.DELTA,
        joint_deltas=None,
        gripper_command=gripper_command(gripper, options.gripper_convention),
        base_velocity_hint=None,
        confidence=VECTOR_CONFIDENCE,
    )
    return ConvertedAction(action)


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
    if len(value) < ACTION_VECTOR_DIM:
        return None
    numbers = []
    for item in value[:ACTION_VECTOR_DIM]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return None
        numbers.append(float(item))
    return numbers if all(math.isfinite(v) for v in numbers) else None


def raw_action_vector(payload: dict) -> Optional[list[float]]:
    """The raw action vector an upstream-shaped answer carries, if any."""
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
    if any(payload.get(flag) is True
           for flag in ("has_eef_target", "has_joint_deltas", "has_joint_positions")):
        return payload
    vector = raw_action_vector(payload)
    if vector is None:
        return payload
    frame = payload.get("reference_frame")
    frame = frame if isinstance(frame, str) and frame else reference_frame
    # Upstream reads the vector as a delta in the reference frame: no current pose here.
    converted = convert_action_vector(vector, Observation(reference_frame=frame), options)
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
