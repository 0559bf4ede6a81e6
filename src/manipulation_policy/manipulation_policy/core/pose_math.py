"""Pose arithmetic on the plain types: quaternions, Euler angles, delta composition.

Conventions (the same as tf2's ``Quaternion.setRPY``): roll, pitch, yaw are
rotations about the fixed X, Y and Z axes, applied in that order, so
R = Rz(yaw) * Ry(pitch) * Rx(roll). Quaternions are (x, y, z, w), unit length.

Weighted means (the executor's blending of overlapping chunks): positions and
other vectors are averaged linearly; orientations by the normalized weighted
sum of the quaternions, each first flipped into the hemisphere of the
reference one (q and -q are the same rotation, and a sum of opposite signs
would cancel). For rotations as close as consecutive chunks predict this is
the usual approximation of the rotation mean; for two quaternions it is nlerp,
exact at equal weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Optional

from manipulation_policy.core.policy_types import (
    ActionChunk,
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


def compose_chunk_with_current_pose(chunk: ActionChunk, current: Optional[Pose]) -> ActionChunk:
    """A chunk's delta targets made absolute, each composed with the target before it.

    Target i is target i-1 composed with delta i (target -1 is the current pose),
    as the model meant a sequence of deltas: not each delta composed with the
    observation's pose. An action without a target leaves the running pose as it
    is; an absolute target becomes it. Each step goes through
    ``compose_with_current_pose``, the one place a delta becomes absolute.
    """
    if current is None:
        return chunk
    composed = []
    running = current
    for action in chunk.actions:
        action = compose_with_current_pose(action, running)
        if action.eef_target is not None:
            running = action.eef_target
        composed.append(action)
    return replace(chunk, actions=tuple(composed))


def _checked_weights(count: int, weights: Sequence[float]) -> None:
    if count == 0 or len(weights) != count:
        raise ValueError(f"{count} values need as many weights, not {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, not {list(weights)}")


def weighted_mean_vector(vectors: Sequence[Vector3], weights: Sequence[float]) -> Vector3:
    _checked_weights(len(vectors), weights)
    total = sum(weights)
    return Vector3(
        *(
            sum(w * getattr(v, axis) for v, w in zip(vectors, weights, strict=True)) / total
            for axis in ("x", "y", "z")
        )
    )


def weighted_mean_quaternion(
    quaternions: Sequence[Quaternion], weights: Sequence[float], reference: int = -1
) -> Quaternion:
    """Normalized weighted sum after aligning each quaternion with ``quaternions[reference]``
    (see the module docstring). The reference's weight must be > 0, so the sum cannot
    vanish."""
    _checked_weights(len(quaternions), weights)
    if weights[reference] <= 0:
        raise ValueError("the reference quaternion needs a weight > 0")
    ref = quaternions[reference]
    sums = [0.0, 0.0, 0.0, 0.0]
    for q, w in zip(quaternions, weights, strict=True):
        sign = -1.0 if q.x * ref.x + q.y * ref.y + q.z * ref.z + q.w * ref.w < 0 else 1.0
        for k, part in enumerate((q.x, q.y, q.z, q.w)):
            sums[k] += sign * w * part
    return normalized(Quaternion(*sums))


def weighted_mean_pose(
    poses: Sequence[Pose], weights: Sequence[float], reference: int = -1
) -> Pose:
    return Pose(
        position=weighted_mean_vector([p.position for p in poses], weights),
        orientation=weighted_mean_quaternion([p.orientation for p in poses], weights, reference),
    )
