"""The robot's check of a server's answer: what the issue found published as it came."""

from __future__ import annotations

import json

import pytest
from hostile_servers import good_answer

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import EefTargetMode
from manipulation_policy.robot.remote_client import decode_answer
from manipulation_policy.robot.response_validation import (
    Expectation,
    frame_id_problem,
    validate_answer,
)

EXPECT = Expectation(reference_frame="base_link", joint_count=3)


def refusal(answer: dict, expect: Expectation = EXPECT) -> InputError:
    with pytest.raises(InputError) as caught:
        validate_answer(answer, expect)
    return caught.value


def without(answer: dict, *path: str) -> dict:
    answer = json.loads(json.dumps(answer))
    node = answer
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return answer


def test_a_good_answer_is_taken_as_it_is():
    action = validate_answer(good_answer(3), EXPECT)
    assert action.joint_deltas == (0.01, 0.01, 0.01)
    assert action.gripper_command == 0.5 and action.confidence == 0.5
    assert action.eef_target.position.x == 0.01
    assert action.eef_target_mode is EefTargetMode.DELTA
    assert action.reference_frame == "base_link"


def test_a_minimal_hold_answer_is_taken():
    action = validate_answer({}, EXPECT)
    assert action.is_hold and action.reference_frame == "base_link"


def test_the_robots_frame_is_kept_when_the_server_names_none():
    answer = without(good_answer(3), "reference_frame")
    action = validate_answer(answer, Expectation("odom", 3))
    assert action.reference_frame == "odom"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"confidence": 5.0}, "confidence"),
        ({"confidence": -0.1}, "confidence"),
        ({"gripper_command": 7.0}, "gripper_command"),
        ({"joint_deltas": [0.01, 0.01]}, "joint_deltas"),
        ({"joint_deltas": [0.01] * 4}, "joint_deltas"),
        ({"eef_target_pose": {"position": {"x": 0, "y": 0, "z": 0},
                              "orientation": {"x": 0, "y": 0, "z": 0, "w": 2}}},
         "eef_target_pose.orientation"),
        ({"has_eef_target": "yes"}, "has_eef_target"),
        ({"gripper_active": 1}, "gripper_active"),
        ({"confidence": "0.5"}, "confidence"),
        ({"confidence": True}, "confidence"),
        ({"joint_deltas": [0.01, "0.01", 0.01]}, "joint_deltas[1]"),
        ({"eef_target_mode": "sideways"}, "eef_target_mode"),
        ({"reference_frame": "odom"}, "reference_frame"),
        ({"reference_frame": "\ud800"}, "reference_frame"),
        ({"reference_frame": "base\u0000link"}, "reference_frame"),
        ({"reference_frame": ""}, "reference_frame"),
        ({"reference_frame": 7}, "reference_frame"),
        ({"request_id": 12}, "request_id"),
        ({"has_joint_positions": True, "joint_positions": [0.1, 0.2]}, "joint_positions"),
        ({"has_joint_positions": True, "joint_positions": [0.1] * 4}, "joint_positions"),
        ({"has_joint_positions": True, "joint_positions": [0.1, None, 0.2]},
         "joint_positions[1]"),
        ({"has_joint_positions": True, "joint_positions": [0.1, 0.2], "joint_names": ["a"]},
         "joint_positions"),
        ({"joint_names": ["a", "b"]}, "joint_deltas"),  # good_answer has 3 deltas
        ({"joint_names": ["a", "a", "b"]}, "joint_names"),
    ],
)
def test_values_outside_the_contracts_meaning_are_refused(overrides, field):
    error = refusal(good_answer(3, **overrides))
    assert error.field == field, error


@pytest.mark.parametrize(
    ("flag", "path"),
    [
        ("has_eef_target", ("eef_target_pose",)),
        ("has_eef_target", ("eef_target_pose", "orientation")),
        ("has_eef_target", ("eef_target_pose", "position", "z")),
        ("has_joint_deltas", ("joint_deltas",)),
        ("gripper_active", ("gripper_command",)),
    ],
)
def test_a_part_its_flag_announces_must_be_there(flag, path):
    error = refusal(without(good_answer(3), *path))
    assert error.field == ".".join(path) and f"{flag} is true" in error.message


def test_announced_joint_positions_must_be_there():
    error = refusal({"has_joint_positions": True})
    assert error.field == "joint_positions" and "has_joint_positions is true" in error.message


def test_named_joint_targets_may_name_fewer_joints_than_were_sent():
    answer = good_answer(3, has_joint_deltas=True, joint_deltas=[0.01],
                         has_joint_positions=True, joint_positions=[0.5],
                         joint_names=["elbow"])
    action = validate_answer(answer, EXPECT)
    assert action.joint_positions == (0.5,) and action.joint_deltas == (0.01,)
    assert action.joint_names == ("elbow",)


def test_unnamed_joint_positions_are_one_per_joint_sent():
    answer = good_answer(3, has_joint_positions=True, joint_positions=[0.1, 0.2, 0.3])
    action = validate_answer(answer, EXPECT)
    assert action.joint_positions == (0.1, 0.2, 0.3) and action.joint_names is None


def test_a_base_hint_its_flag_announces_must_be_there():
    error = refusal({"has_base_hint": True})
    assert error.field == "base_velocity_hint"


def test_parts_without_their_flag_are_not_published_whatever_they_hold():
    answer = good_answer(3, has_eef_target=False, has_joint_deltas=False, gripper_active=False,
                         joint_deltas=[9.0])
    action = validate_answer(answer, EXPECT)
    assert action.eef_target is None and action.joint_deltas is None
    assert action.gripper_command is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"joint_deltas": [1e6, 1e6, 1e6]},
        {"eef_target_pose": {"position": {"x": 1e308, "y": 1e308, "z": 1e308},
                             "orientation": {"x": 0, "y": 0, "z": 0, "w": 1}}},
        {"eef_target_mode": "absolute",
         "eef_target_pose": {"position": {"x": 3.0, "y": 0, "z": 0},
                             "orientation": {"x": 0, "y": 0, "z": 0, "w": 1}}},
        {"has_base_hint": True,
         "base_velocity_hint": {"linear": {"x": 50.0, "y": 0, "z": 0},
                                "angular": {"x": 0, "y": 0, "z": 9.0}}},
    ],
)
def test_well_formed_answers_over_the_robots_limits_are_the_guards_to_judge(overrides):
    # The wire checks form only: the safety guard clamps such values when they are
    # published (test_safety_guard, test_guard_nodes), as for an in-process model.
    action = validate_answer(good_answer(3, **overrides), EXPECT)
    assert not action.is_hold


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"confidence": NaN}', "confidence"),
        (b'{"confidence": 1e999}', "confidence"),
        (b"", "empty"),
        (b"\xff\xfe\x00", "body"),
        (b"[1, 2]", "JSON object"),
        (b'{"confidence": 1' + b"0" * 5000 + b"}", "body"),
    ],
)
def test_undecodable_answers_are_refused_naming_why(raw, says):
    with pytest.raises(InputError) as caught:
        decode_answer(raw, EXPECT)
    assert says in str(caught.value)


def test_frame_ids_ros_can_carry():
    assert frame_id_problem("base_link") is None
    assert frame_id_problem("robot_1/tool0") is None
    for bad in ("", "a b", "base\x00link", "\ud800", "x" * 257, None):
        assert frame_id_problem(bad) is not None, bad
