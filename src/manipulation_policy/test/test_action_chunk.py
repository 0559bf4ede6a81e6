"""ActionChunk: what a chunk may be, a PolicyAction as a chunk of one, and delta targets
accumulated along a chunk (not each composed with the observation's pose)."""

from __future__ import annotations

import math

import pytest

from manipulation_policy.core.policy_types import (
    MAX_CHUNK_LENGTH,
    SINGLE_ACTION_PERIOD_SEC,
    ActionChunk,
    EefTargetMode,
    PolicyAction,
    Pose,
    Quaternion,
    Vector3,
    as_chunk,
)
from manipulation_policy.core.pose_math import (
    apply_delta,
    compose_chunk_with_current_pose,
    compose_with_current_pose,
    quaternion_from_rpy,
    rpy_from_quaternion,
)

STEP = PolicyAction(gripper_command=1.0, confidence=0.5)
CURRENT = Pose(Vector3(0.5, 0.0, 0.2), quaternion_from_rpy(0.0, 0.0, 0.3))


def delta(dx: float = 0.0, dyaw: float = 0.0, gripper: float = 1.0) -> PolicyAction:
    return PolicyAction(
        eef_target=Pose(Vector3(dx, 0.0, 0.0), quaternion_from_rpy(0.0, 0.0, dyaw)),
        gripper_command=gripper,
    )


# ------------------------------------------------------------ validation


def test_a_chunk_keeps_its_actions_and_period():
    chunk = ActionChunk([STEP, PolicyAction.hold()], 0.1)
    assert chunk.actions == (STEP, PolicyAction.hold())  # a list becomes a tuple
    assert chunk.action_period_sec == 0.1
    assert len(chunk) == 2
    assert chunk.reference_frame == "base_link"


def test_the_longest_chunk_is_accepted():
    assert len(ActionChunk((STEP,) * MAX_CHUNK_LENGTH, 0.02)) == 256


@pytest.mark.parametrize(
    "actions, period, message",
    [
        ((), 0.1, "at least one action"),
        ((STEP,) * (MAX_CHUNK_LENGTH + 1), 0.1, "at most 256 actions, not 257"),
        ((STEP,), 0.0, "finite and > 0"),
        ((STEP,), -0.1, "finite and > 0"),
        ((STEP,), math.nan, "finite and > 0"),
        ((STEP,), math.inf, "finite and > 0"),
        ((STEP, PolicyAction(reference_frame="odom")), 0.1, "one reference frame"),
    ],
)
def test_an_invalid_chunk_is_refused_with_the_reason(actions, period, message):
    with pytest.raises(ValueError, match=message):
        ActionChunk(actions, period)


@pytest.mark.parametrize(
    "actions, period, message",
    [
        ((STEP, "an action"), 0.1, r"actions\[1\] is a str"),
        ((STEP,), True, "action_period_sec must be a number, not bool"),
        ((STEP,), "0.1", "action_period_sec must be a number, not str"),
    ],
)
def test_a_chunk_of_wrong_types_is_refused(actions, period, message):
    with pytest.raises(TypeError, match=message):
        ActionChunk(actions, period)


def test_a_policy_action_is_a_chunk_of_one():
    assert ActionChunk.of(STEP) == ActionChunk((STEP,), SINGLE_ACTION_PERIOD_SEC)
    assert ActionChunk.of(STEP, 0.2).action_period_sec == 0.2
    assert as_chunk(STEP) == ActionChunk.of(STEP)
    chunk = ActionChunk((STEP, STEP), 0.1)
    assert as_chunk(chunk) is chunk
    with pytest.raises(TypeError, match="not dict"):
        as_chunk({"gripper_command": 1.0})


def test_a_chunk_of_one_with_a_bad_period_is_still_refused():
    with pytest.raises(ValueError, match="finite and > 0"):
        ActionChunk.of(STEP, 0.0)


# ------------------------------------------------------------ delta accumulation


def test_delta_targets_accumulate_along_the_chunk():
    chunk = ActionChunk([delta(0.1, 0.1), delta(0.1, 0.1), delta(0.1, 0.1)], 0.1)
    composed = compose_chunk_with_current_pose(chunk, CURRENT)
    for i, action in enumerate(composed.actions):
        assert action.eef_target_mode is EefTargetMode.ABSOLUTE
        assert action.eef_target.position.x == pytest.approx(0.5 + 0.1 * (i + 1))
        assert rpy_from_quaternion(action.eef_target.orientation)[2] == pytest.approx(
            0.3 + 0.1 * (i + 1)
        )
    assert composed.action_period_sec == 0.1


def test_accumulation_is_not_each_delta_composed_with_the_observation_pose():
    chunk = ActionChunk([delta(0.1, 0.2), delta(0.05, -0.1)], 0.1)
    accumulated = compose_chunk_with_current_pose(chunk, CURRENT).actions
    naive = [compose_with_current_pose(a, CURRENT) for a in chunk.actions]
    assert accumulated[0] == naive[0]
    second_delta = chunk.actions[1].eef_target
    assert accumulated[1].eef_target == apply_delta(accumulated[0].eef_target, second_delta)
    assert accumulated[1].eef_target.position.x == pytest.approx(0.65)
    assert naive[1].eef_target.position.x == pytest.approx(0.55)


def test_a_step_without_a_target_keeps_the_running_pose_and_an_absolute_one_resets_it():
    absolute = PolicyAction(
        eef_target=Pose(Vector3(1.0, 1.0, 1.0), Quaternion()),
        eef_target_mode=EefTargetMode.ABSOLUTE,
    )
    chunk = ActionChunk([delta(0.1), PolicyAction(gripper_command=0.0), absolute, delta(0.1)], 0.1)
    composed = compose_chunk_with_current_pose(chunk, CURRENT).actions
    assert composed[1] == chunk.actions[1]
    assert composed[2] is absolute
    assert vars(composed[3].eef_target.position) == pytest.approx({"x": 1.1, "y": 1.0, "z": 1.0})
    assert composed[3].gripper_command == 1.0


def test_without_a_current_pose_the_chunk_stays_as_it_is():
    chunk = ActionChunk([delta(0.1), delta(0.1)], 0.1)
    assert compose_chunk_with_current_pose(chunk, None) is chunk
