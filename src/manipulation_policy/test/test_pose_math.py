import math

import pytest

from manipulation_policy.core.policy_types import Pose, Quaternion, Vector3
from manipulation_policy.core.pose_math import (
    apply_delta,
    quaternion_from_rpy,
    quaternion_multiply,
    rpy_from_quaternion,
    weighted_mean_pose,
    weighted_mean_quaternion,
    weighted_mean_vector,
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


def negated(q: Quaternion) -> Quaternion:
    return Quaternion(-q.x, -q.y, -q.z, -q.w)


def test_weighted_mean_of_vectors_is_linear():
    mean = weighted_mean_vector([Vector3(0.0, 1.0, 2.0), Vector3(1.0, 3.0, 2.0)], [3.0, 1.0])
    assert (mean.x, mean.y, mean.z) == pytest.approx((0.25, 1.5, 2.0))


def test_equal_weights_give_the_rotation_halfway():
    q = weighted_mean_quaternion(
        [quaternion_from_rpy(0, 0, 0.0), quaternion_from_rpy(0, 0, 0.8)], [0.5, 0.5]
    )
    assert close(q, quaternion_from_rpy(0, 0, 0.4))


def test_the_mean_ignores_which_sign_a_quaternion_has():
    a, b = quaternion_from_rpy(0.1, 0, 0.2), quaternion_from_rpy(0, 0.3, 0.5)
    expected = weighted_mean_quaternion([a, b], [0.3, 0.7])
    assert close(weighted_mean_quaternion([a, negated(b)], [0.3, 0.7]), expected)
    assert close(weighted_mean_quaternion([negated(a), b], [0.3, 0.7]), expected)


def test_a_weight_of_zero_leaves_the_other_rotation():
    a, b = quaternion_from_rpy(0, 0, 0.2), quaternion_from_rpy(0, 0, 1.2)
    assert close(weighted_mean_quaternion([a, b], [0.0, 1.0]), b)
    with pytest.raises(ValueError, match="reference quaternion needs a weight > 0"):
        weighted_mean_quaternion([a, b], [1.0, 0.0])  # the reference is the last one
    assert close(weighted_mean_quaternion([a, b], [1.0, 0.0], reference=0), a)


def test_weighted_mean_of_poses_averages_both_parts():
    poses = [
        Pose(Vector3(0.0, 0.0, 0.0), quaternion_from_rpy(0, 0, 0.0)),
        Pose(Vector3(1.0, 0.0, 0.0), quaternion_from_rpy(0, 0, 0.6)),
    ]
    mean = weighted_mean_pose(poses, [0.5, 0.5])
    assert mean.position.x == pytest.approx(0.5)
    assert close(mean.orientation, quaternion_from_rpy(0, 0, 0.3))


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, math.nan]])
def test_weights_must_match_and_be_usable(weights):
    with pytest.raises(ValueError, match="weights"):
        weighted_mean_vector([Vector3(), Vector3()], weights)
