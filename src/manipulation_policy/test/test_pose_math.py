import math

import pytest

from manipulation_policy.core.policy_types import Pose, Quaternion, Vector3
from manipulation_policy.core.pose_math import (
    apply_delta,
    quaternion_from_rpy,
    quaternion_multiply,
    rpy_from_quaternion,
)


def close(a: Quaternion, b: Quaternion, tol=1e-9) -> bool:
    same = all(abs(u - v) < tol for u, v in zip(vars(a).values(), vars(b).values(), strict=True))
    flipped = all(abs(u + v) < tol for u, v in zip(vars(a).values(), vars(b).values(), strict=True))
    return same or flipped


def test_yaw_of_ninety_degrees():
    q = quaternion_from_rpy(0.0, 0.0, math.pi / 2)
    assert close(q, Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))


@pytest.mark.parametrize("rpy", [(0.1, -0.2, 0.3), (1.0, 0.5, -2.0), (-0.7, 1.2, 3.0)])
def test_rpy_round_trip(rpy):
    assert rpy_from_quaternion(quaternion_from_rpy(*rpy)) == pytest.approx(rpy)


def test_rpy_order_is_roll_then_pitch_then_yaw_about_fixed_axes():
    roll, pitch, yaw = 0.3, -0.4, 0.5
    composed = quaternion_multiply(
        quaternion_from_rpy(0, 0, yaw),
        quaternion_multiply(quaternion_from_rpy(0, pitch, 0), quaternion_from_rpy(roll, 0, 0)),
    )
    assert close(composed, quaternion_from_rpy(roll, pitch, yaw))


def test_apply_delta_adds_translation_and_premultiplies_rotation():
    current = Pose(Vector3(0.5, 0.0, 0.3), quaternion_from_rpy(0.0, 0.0, math.pi / 2))
    delta = Pose(Vector3(0.01, -0.02, 0.03), quaternion_from_rpy(0.0, 0.0, math.pi / 2))
    target = apply_delta(current, delta)
    assert (target.position.x, target.position.y, target.position.z) == pytest.approx(
        (0.51, -0.02, 0.33)
    )
    assert close(target.orientation, quaternion_from_rpy(0.0, 0.0, math.pi))
