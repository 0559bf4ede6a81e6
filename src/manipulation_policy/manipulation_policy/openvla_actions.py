"""OpenVLA's 7-dim action -> PolicyAction. Pure numpy, no torch.

OpenVLA (Bridge / Open X-Embodiment conventions) answers with one
end-effector step per observation, un-normalised to the units of its
training data:

    (dx, dy, dz, droll, dpitch, dyaw, gripper)

- dx, dy, dz: translation in metres in the robot's reference frame.
- droll, dpitch, dyaw: a rotation about the reference frame's fixed X, Y and Z
  axes, in radians, turned into a quaternion with
  ``pose_math.quaternion_from_rpy`` (R = Rz(yaw) * Ry(pitch) * Rx(roll), the
  tf2 ``setRPY`` convention) and applied about the reference frame's axes by
  ``pose_math.apply_delta``.
- gripper: OpenVLA and Bridge use 1 = open, 0 = closed ("open_is_one");
  PolicyOutput uses 0.0 = fully open, 1.0 = fully closed, so the command is
  ``1 - g``. A model trained the other way round is "close_is_one"
  (command = g). The command is clamped to [0, 1].

Scaling multiplies the translation by ``position_scale`` and the Euler
vector by ``rotation_scale``; the limits then cap the Euclidean length of
each vector (direction kept), so ``max_position_step`` bounds the distance
travelled, not each axis. A model output with any non-finite number is not
used: the result is a hold, with a reason the caller can log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import numpy as np

from .policy_types import EefTargetMode, Observation, PolicyAction, Pose, Vector3
from .pose_math import apply_delta, quaternion_from_rpy

OPENVLA_ACTION_DIM = 7
ACTION_COMPONENTS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
GRIPPER_CONVENTIONS = ("open_is_one", "close_is_one")
# OpenVLA reports no probability with its action; this marks "a model answer"
# (a hold is 0), it is not calibrated.
MODEL_CONFIDENCE = 1.0


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class ActionConversionOptions:
    gripper_convention: str = "open_is_one"
    position_scale: float = 1.0
    rotation_scale: float = 1.0
    max_position_step: Optional[float] = None
    max_rotation_step: Optional[float] = None

    def __post_init__(self) -> None:
        if self.gripper_convention not in GRIPPER_CONVENTIONS:
            raise ValueError(
                f"gripper_convention must be one of {', '.join(GRIPPER_CONVENTIONS)}, "
                f"got {self.gripper_convention!r}"
            )
        for name in ("position_scale", "rotation_scale"):
            if _check_number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_position_step", "max_rotation_step"):
            value = getattr(self, name)
            if value is not None and _check_number(name, value) <= 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {value!r}")


@dataclass(frozen=True)
class ConvertedAction:
    """The action to publish; ``hold_reason`` says why it is a hold, if it is."""

    action: PolicyAction
    hold_reason: Optional[str] = None


def gripper_command(model_gripper: float, convention: str) -> float:
    """Model gripper value -> PolicyOutput's 0.0 (open) .. 1.0 (closed)."""
    if convention == "open_is_one":
        command = 1.0 - model_gripper
    elif convention == "close_is_one":
        command = model_gripper
    else:
        raise ValueError(f"gripper_convention must be one of {', '.join(GRIPPER_CONVENTIONS)}")
    return min(1.0, max(0.0, command))


def limit_length(vector: np.ndarray, max_length: Optional[float]) -> np.ndarray:
    """Shrink ``vector`` to at most ``max_length`` long, keeping its direction."""
    if max_length is None:
        return vector
    length = float(np.linalg.norm(vector))
    if length <= max_length:
        return vector
    return vector * (max_length / length)


def convert_openvla_action(
    raw_action: object,
    observation: Observation,
    options: Optional[ActionConversionOptions] = None,
) -> ConvertedAction:
    """Turn one OpenVLA output into the PolicyAction to publish.

    Absolute target (composed with ``observation.eef_pose``) when the current
    pose is known, otherwise the delta itself.
    """
    options = options if options is not None else ActionConversionOptions()
    values = np.asarray(raw_action, dtype=np.float64).reshape(-1)
    if values.shape != (OPENVLA_ACTION_DIM,):
        raise ValueError(
            f"OpenVLA action must have {OPENVLA_ACTION_DIM} numbers "
            f"({', '.join(ACTION_COMPONENTS)}), got {values.size}"
        )
    frame = observation.reference_frame
    bad = [name for name, v in zip(ACTION_COMPONENTS, values, strict=True) if not math.isfinite(v)]
    if bad:
        reason = f"model output has non-finite {', '.join(bad)}: {values.tolist()}; holding"
        return ConvertedAction(PolicyAction.hold(frame), hold_reason=reason)

    translation = limit_length(values[0:3] * options.position_scale, options.max_position_step)
    rotation = limit_length(values[3:6] * options.rotation_scale, options.max_rotation_step)
    delta = Pose(
        position=Vector3(*(float(v) for v in translation)),
        orientation=quaternion_from_rpy(*(float(v) for v in rotation)),
    )
    if observation.eef_pose is not None:
        target, mode = apply_delta(observation.eef_pose, delta), EefTargetMode.ABSOLUTE
    else:
        target, mode = delta, EefTargetMode.DELTA
    action = PolicyAction(
        reference_frame=frame,
        eef_target=target,
        eef_target_mode=mode,
        joint_deltas=None,
        gripper_command=gripper_command(float(values[6]), options.gripper_convention),
        base_velocity_hint=None,
        confidence=MODEL_CONFIDENCE,
    )
    return ConvertedAction(action)
