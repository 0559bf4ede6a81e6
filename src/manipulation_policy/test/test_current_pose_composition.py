"""Delta -> absolute happens in one place: pose_math.compose_with_current_pose, called
through backends.predictor / batch_predictor (what the server and policy_node call),
which answer action chunks."""

from __future__ import annotations

import math

import pytest
from server_test_backends import FIXED_ABSOLUTE, FIXED_DELTA, FixedDeltaBackend

from manipulation_policy.backends import batch_predictor, predictor, with_current_pose
from manipulation_policy.core.policy_types import (
    ActionChunk,
    EefTargetMode,
    Observation,
    PolicyAction,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.core.pose_math import apply_delta, compose_with_current_pose

CURRENT = Pose(Vector3(0.5, 0.0, 0.2), Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))


def test_a_delta_becomes_the_composed_absolute_target_and_nothing_else_changes():
    action = compose_with_current_pose(FIXED_DELTA, CURRENT)
    assert action.eef_target == apply_delta(CURRENT, FIXED_DELTA.eef_target)
    assert action.eef_target_mode is EefTargetMode.ABSOLUTE
    assert (action.gripper_command, action.confidence) == (0.25, 0.5)


@pytest.mark.parametrize(
    "action, current",
    [
        (FIXED_DELTA, None),  # no current pose: the delta stays a delta
        (FIXED_ABSOLUTE, CURRENT),  # absolute already: never composed twice
        (PolicyAction.hold(), CURRENT),  # no target
    ],
)
def test_without_a_delta_and_a_current_pose_the_action_is_unchanged(action, current):
    assert compose_with_current_pose(action, current) is action


def test_composing_twice_is_composing_once():
    once = compose_with_current_pose(FIXED_DELTA, CURRENT)
    assert compose_with_current_pose(once, CURRENT) is once


@pytest.mark.parametrize(
    "answer", [ValueError("a failed prediction"), {"eef_target": "not an action"}]
)
def test_what_is_not_an_answer_is_passed_on_as_given(answer):
    assert with_current_pose(answer, Observation(eef_pose=CURRENT)) is answer


@pytest.mark.parametrize(
    "answer",
    [
        PolicyAction(eef_target={"x": 1.0}),  # the wrong type: the server's check names it
        PolicyAction(eef_target=Pose(Vector3("a", 0.0, 0.0))),
        PolicyAction(eef_target=Pose(orientation=Quaternion(math.nan, 0.0, 0.0, 1.0))),
    ],
)
def test_an_action_that_is_not_a_well_typed_delta_is_passed_on_uncomposed(answer):
    chunk = with_current_pose(answer, Observation(eef_pose=CURRENT))
    assert isinstance(chunk, ActionChunk) and len(chunk) == 1 and chunk.actions[0] is answer


def test_predictor_and_batch_predictor_compose_each_answer_with_its_own_pose():
    backend = FixedDeltaBackend()
    other = Pose(Vector3(-0.1, 0.3, 0.6))
    observations = [Observation(eef_pose=CURRENT), Observation(), Observation(eef_pose=other)]
    backend.predict_batch = lambda items: [backend.predict(o) for o in items]
    batch = batch_predictor(backend)(observations)
    assert batch == [predictor(backend)(o) for o in observations]
    assert batch[0].actions[0].eef_target == apply_delta(CURRENT, FIXED_DELTA.eef_target)
    assert batch[1] == ActionChunk.of(FIXED_DELTA)
    assert batch[2].actions[0].eef_target == apply_delta(other, FIXED_DELTA.eef_target)


def test_batch_predictor_leaves_a_wrong_length_batch_for_the_caller_to_refuse():
    backend = FixedDeltaBackend()
    backend.predict_batch = lambda items: [FIXED_DELTA]
    assert batch_predictor(backend)([Observation(eef_pose=CURRENT)] * 2) == [FIXED_DELTA]
    assert batch_predictor(FixedDeltaBackend()) is None  # no predict_batch
