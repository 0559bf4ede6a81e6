"""Blending what overlapping chunks say for one due time: ACT's weights, the crossfade
ramp, and which parts are averaged (the newest's gripper and has_* flags stand)."""

from __future__ import annotations

import math

import pytest

from manipulation_policy.core.policy_types import (
    EefTargetMode,
    PolicyAction,
    Pose,
    Twist,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_from_rpy, rpy_from_quaternion
from manipulation_policy.robot.action_blending import blend, crossfade_weight, ensemble_weights


def action(x: float, **parts) -> PolicyAction:
    return PolicyAction(
        eef_target=Pose(Vector3(x, 0.0, 0.0), quaternion_from_rpy(0.0, 0.0, x)), **parts
    )


def test_act_weights_favour_the_oldest_prediction_and_sum_to_one():
    weights = ensemble_weights(3, 0.5)
    total = 1 + math.exp(-0.5) + math.exp(-1.0)
    assert weights == pytest.approx([1 / total, math.exp(-0.5) / total, math.exp(-1.0) / total])
    assert ensemble_weights(4, 0.0) == pytest.approx([0.25] * 4)
    assert ensemble_weights(1, 0.01) == [1.0]


def test_crossfade_ramps_linearly_to_the_new_chunk():
    assert [crossfade_weight(k, 4) for k in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert crossfade_weight(1, 1) == 1.0  # one step: replace


def test_blend_averages_targets_joints_and_twists():
    twist = Twist(Vector3(1.0, 0.0, 0.0), Vector3(0.0, 0.0, 1.0))
    old = action(0.0, joint_deltas=(0.0, 1.0), base_velocity_hint=Twist())
    new = action(0.4, joint_deltas=(1.0, 1.0), base_velocity_hint=twist)
    mixed = blend([old, new], [0.75, 0.25])
    assert mixed.eef_target.position.x == pytest.approx(0.1)
    assert rpy_from_quaternion(mixed.eef_target.orientation)[2] == pytest.approx(0.1, abs=1e-3)
    assert mixed.joint_deltas == pytest.approx((0.25, 1.0))
    assert mixed.base_velocity_hint.linear.x == pytest.approx(0.25)
    assert mixed.base_velocity_hint.angular.z == pytest.approx(0.25)


def test_gripper_confidence_and_flags_follow_the_newest():
    old = action(0.0, gripper_command=0.0, confidence=0.9, joint_deltas=(1.0,))
    new = PolicyAction(gripper_command=1.0, confidence=0.2, base_velocity_hint=Twist())
    mixed = blend([old, new], [0.5, 0.5])
    assert mixed == new  # no target, no joints: the newest says nothing of them


def test_a_part_not_every_action_has_is_the_newest_s():
    old = PolicyAction(gripper_command=0.0)
    new = action(0.4, joint_deltas=(1.0, 2.0))
    mixed = blend([old, action(0.0, joint_deltas=(0.0,)), new], [0.4, 0.3, 0.3])
    assert mixed.eef_target == new.eef_target  # the first has no target
    assert mixed.joint_deltas == (1.0, 2.0)  # another joint count


def test_absolute_joint_targets_naming_the_same_joints_are_averaged():
    names = ("shoulder", "elbow")
    old = PolicyAction(joint_positions=(0.0, 1.0), joint_deltas=(0.2, 0.0), joint_names=names)
    new = PolicyAction(joint_positions=(1.0, 1.0), joint_deltas=(0.0, 0.4), joint_names=names)
    mixed = blend([old, new], [0.75, 0.25])
    assert mixed.joint_positions == pytest.approx((0.25, 1.0))
    assert mixed.joint_deltas == pytest.approx((0.15, 0.1))
    assert mixed.joint_names == names
    unnamed = blend([PolicyAction(joint_positions=(0.0,)), PolicyAction(joint_positions=(2.0,))],
                    [0.5, 0.5])
    assert unnamed.joint_positions == pytest.approx((1.0,))


@pytest.mark.parametrize(
    "old_names",
    [("elbow", "shoulder"), None, ("shoulder", "wrist")],
    ids=["another-order", "unnamed", "another-joint"],
)
def test_joint_values_naming_other_joints_are_the_newest_s(old_names):
    old = PolicyAction(joint_positions=(0.0, 1.0), joint_deltas=(0.2, 0.2), joint_names=old_names)
    new = PolicyAction(joint_positions=(1.0, 2.0), joint_deltas=(0.0, 0.4),
                       joint_names=("shoulder", "elbow"))
    mixed = blend([old, new], [0.5, 0.5])
    assert mixed.joint_positions == (1.0, 2.0) and mixed.joint_deltas == (0.0, 0.4)
    assert mixed.joint_names == ("shoulder", "elbow")


def test_targets_of_another_mode_are_not_averaged():
    absolute = action(1.0, eef_target_mode=EefTargetMode.ABSOLUTE)
    new = action(0.2)
    assert blend([absolute, new], [0.5, 0.5]).eef_target == new.eef_target


def test_a_newest_prediction_weighing_zero_leaves_the_mean_to_the_others():
    # ACT with a large m: the newest prediction's weight underflows to 0.
    weights = ensemble_weights(2, 1000.0)
    assert weights[1] == 0.0
    mixed = blend([action(0.0), action(0.4)], weights)
    assert mixed.eef_target.position.x == 0.0
