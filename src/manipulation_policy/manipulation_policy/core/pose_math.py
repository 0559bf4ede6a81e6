"""Pose arithmetic on the plain types: quaternions, Euler angles, delta composition.

Conventions (the same as tf2's ``Quaternion.setRPY``): roll, pitch, yaw are
rotations about the fixed X, Y and Z axes, applied in that order, so
R = Rz(yaw) * Ry(pitch) * Rx(roll). Quaternions are (x, y, z, w), unit length.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from manipulation_policy.core.policy_types import (
    EefTargetMode,
    PolicyAction,
    Pose,
    Quaternion,
    Vector3,
)


def quaternion_from_rpy(roll: float, pitch: float, yaw: float) -> Quaternion:
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
    return Quaternion(
        x=sr * cp * cy - cr * sp * sy,
        y=cr * sp * cy + sr * cp * sy,
        z=cr * cp * sy - sr * sp * cy,
        w=cr * cp * cy + sr * sp * sy,
    )


def rpy_from_quaternion(q: Quaternion) -> tuple[float, float, float]:
    roll = math.atan2(2 * (q.w * q.x + q.y * q.z), 1 - 2 * (q.x * q.x + q.y * q.y))
    sin_pitch = max(-1.0, min(1.0, 2 * (q.w * q.y - q.z * q.x)))
    pitch = math.asin(sin_pitch)
    yaw = math.atan2(2 * (q.w * q.z + q.x * q.y), 1 - 2 * (q.y * q.y + q.z * q.z))
    return roll, pitch, yaw


def quaternion_multiply(a: Quaternion, b: Quaternion) -> Quaternion:
    """Hamilton product a * b: rotate by b, then by a."""
    return Quaternion(
        x=a.w * b.x + a.x * b.w + a.y * b.z - a.z * b.y,
        y=a.w * b.y - a.x * b.z + a.y * b.w + a.z * b.x,
        z=a.w * b.z + a.x * b.y - a.y * b.x + a.z * b.w,
        w=a.w * b.w - a.x * b.x - a.y * b.y - a.z * b.z,
    )


def normalized(q: Quaternion) -> Quaternion:
    norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError(f"quaternion {q} cannot be normalized")
    return Quaternion(q.x / norm, q.y / norm, q.z / norm, q.w / norm)


def apply_delta(current: Pose, delta: Pose) -> Pose:
    """Absolute target from the current pose and a delta in the same frame.

    The translation is added in the reference frame, and the rotation is
    applied about the reference frame's axes (pre-multiplied), which is how
    OpenVLA's training data (e.g. Bridge) defines its end-effector deltas.
    """
    position = Vector3(
        current.position.x + delta.position.x,
        current.position.y + delta.position.y,
        current.position.z + delta.position.z,
    )
    orientation = normalized(quaternion_multiply(delta.orientation, current.orientation))
    return Pose(position=position, orientation=orientation)


def compose_with_current_pose(action: PolicyAction, current: Optional[Pose]) -> PolicyAction:
    """The one place a delta end-effector target becomes absolute.

    With the current pose known, a delta target is composed with it
    (``apply_delta``) and marked absolute; without it, or for an absolute
    target or none, the action is returned as it is. Backends answer deltas;
    the code that calls them (``backends.predictor``) composes, for the server
    and the in-process node alike.
    """
    if current is None or action.eef_target is None:
        return action
    if action.eef_target_mode != EefTargetMode.DELTA:
        return action
    return replace(
        action,
        eef_target=apply_delta(current, action.eef_target),
        eef_target_mode=EefTargetMode.ABSOLUTE,
    )
