"""The action layout: what each dimension of a LeRobot policy's raw action means
(core.action_layout, pure: runs in the robot-floor lane too)."""

from __future__ import annotations

import math

import pytest

from manipulation_policy.core.action_layout import (
    gripper_command,
    layout_problem,
    parse_action_layout,
    to_action,
)
from manipulation_policy.core.policy_types import EefTargetMode
from manipulation_policy.core.pose_math import rpy_from_quaternion


def test_joint_positions_and_gripper_name_their_joints():
    layout = parse_action_layout(
        "joint_position:shoulder, joint_position:elbow ,joint_position:wrist,gripper"
    )
    action = to_action(layout, [0.1, -0.2, 0.3, 0.75], gripper_closed=0.5, gripper_open=1.0)
    assert action.joint_positions == (0.1, -0.2, 0.3)
    assert action.joint_names == ("shoulder", "elbow", "wrist")
    assert action.joint_deltas is None and action.eef_target is None
    assert action.gripper_command == pytest.approx(0.5)
    assert action.confidence == 1.0
    assert not action.is_hold


def test_joint_deltas_are_deltas_never_positions():
    action = to_action(parse_action_layout("joint_delta:a,joint_delta:b,ignore"), [1, 2, 99])
    assert action.joint_deltas == (1.0, 2.0)
    assert action.joint_positions is None
    assert action.joint_names == ("a", "b")


@pytest.mark.parametrize("kind, mode", [("eef_delta", EefTargetMode.DELTA),
                                        ("eef_pose", EefTargetMode.ABSOLUTE)])
def test_eef_axes_missing_ones_are_zero(kind, mode):
    layout = parse_action_layout(f"{kind}:x,{kind}:z,{kind}:yaw,gripper")
    action = to_action(layout, [0.1, 0.3, 0.5, 0.0], 0.0, 1.0, "tool0")
    assert action.eef_target_mode == mode
    assert action.reference_frame == "tool0"
    position = action.eef_target.position
    assert (position.x, position.y, position.z) == (0.1, 0.0, 0.3)
    assert rpy_from_quaternion(action.eef_target.orientation) == pytest.approx((0, 0, 0.5))
    assert action.gripper_command == 0.0


def test_base_twist():
    action = to_action(parse_action_layout("base:vx,base:wz"), [0.2, -0.4])
    twist = action.base_velocity_hint
    assert (twist.linear.x, twist.linear.y, twist.angular.z) == (0.2, 0.0, -0.4)


@pytest.mark.parametrize("raw, expected", [(0.0, 1.0), (100.0, 0.0), (50.0, 0.5),
                                           (-20.0, 1.0), (130.0, 0.0)])
def test_gripper_maps_closed_to_zero_open_to_one_clipped(raw, expected):
    # A follower arm whose gripper reads 100 closed and 0 open (inverted range).
    assert gripper_command(raw, closed=100.0, open_=0.0) == pytest.approx(expected)


@pytest.mark.parametrize("text, words", [
    ("", "one entry per action dimension"),
    ("joint_position:a,wheel:b", "entry 2 'wheel:b': unknown kind 'wheel'"),
    ("joint_position:a,joint_position:a", "entry 2 'joint_position:a': repeats entry 1"),
    ("joint_position:a,joint_delta:b", "mixes joint_position and joint_delta"),
    ("eef_delta:x,eef_pose:y", "mixes eef_delta and eef_pose"),
    ("eef_delta:w", "entry 1 'eef_delta:w': eef_delta needs one of x|y|z|roll|pitch|yaw"),
    ("joint_position", "joint_position needs a joint name"),
    ("gripper:left", "gripper takes no name"),
    ("gripper,gripper", "repeats entry 1"),
    ("base:vz", "base needs one of vx|vy|wz"),
])
def test_a_bad_layout_is_one_line_naming_the_entry(text, words):
    problem = layout_problem(text)
    assert problem is not None and words in problem and "\n" not in problem


def test_ignore_may_repeat_and_the_length_is_checked():
    layout = parse_action_layout("ignore,ignore,gripper")
    assert len(layout) == 3 and str(layout) == "ignore,ignore,gripper"
    with pytest.raises(ValueError, match="the action has 2 values, the action_layout 3"):
        to_action(layout, [0.0, 1.0])
    with pytest.raises(ValueError, match="action value 2 \\(gripper\\) is nan"):
        to_action(layout, [0.0, 1.0, math.nan])
