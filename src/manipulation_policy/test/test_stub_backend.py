import sys

import numpy as np
import pytest

from manipulation_policy.backends import UnknownBackendError, create_backend, predictor
from manipulation_policy.core.errors import BackendStartupError
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    Observation,
    Pose,
    Vector3,
)


def test_unknown_backend_lists_choices():
    with pytest.raises(UnknownBackendError, match="openvla, stub"):
        create_backend("octo")


def test_stub_without_image_or_joints_is_still_a_valid_action():
    action = create_backend("stub").predict(Observation())
    assert action.eef_target is not None and action.eef_target_mode is EefTargetMode.DELTA
    assert action.joint_deltas is None and action.gripper_command is None
    assert action.confidence > 0


def test_stub_answers_depend_on_the_observation():
    stub = create_backend("stub")
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255
    a = stub.predict(Observation(image=red))
    b = stub.predict(Observation(image=blue))
    assert a.eef_target.position.x > 0 > b.eef_target.position.x
    assert a == stub.predict(Observation(image=red))  # deterministic


def test_stub_joint_deltas_pull_towards_zero_and_are_bounded():
    joints = JointStateData(("a", "b", "c"), (0.2, -0.1, 3.0))
    action = create_backend("stub").predict(Observation(joint_state=joints))
    assert action.joint_deltas == pytest.approx((-0.02, 0.01, -0.05))


def test_stub_answers_a_delta_which_its_caller_composes_with_eef_pose():
    current = Pose(Vector3(0.4, 0.1, 0.2))
    stub = create_backend("stub")
    assert stub.predict(Observation(eef_pose=current)).eef_target_mode is EefTargetMode.DELTA
    chunk = predictor(stub)(Observation(eef_pose=current))
    assert len(chunk) == 1  # a single-step model answers a chunk of one
    action = chunk.actions[0]
    assert action.eef_target_mode is EefTargetMode.ABSOLUTE
    assert action.eef_target.position == Vector3(0.4, 0.1, 0.2)


def test_backend_whose_dependency_is_missing_says_what_to_install(monkeypatch):
    # As on a robot or server without the GPU stack: importing torch fails.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "manipulation_policy.backends.openvla", raising=False)
    with pytest.raises(BackendStartupError, match="needs the Python package 'torch'.*requirements"):
        create_backend("openvla", model="openvla/openvla-7b")


def test_joint_steps_match_the_clipped_proportional_rule():
    from manipulation_policy.backends.stub import JOINT_GAIN, MAX_JOINT_STEP, joint_steps

    rng = np.random.default_rng(4)
    positions = np.concatenate([rng.normal(0, 1, 50), [np.nan, np.inf, -np.inf, 0.0, -0.0]])
    expected = np.where(
        np.isfinite(positions),
        np.clip(-JOINT_GAIN * positions, -MAX_JOINT_STEP, MAX_JOINT_STEP),
        0.0,
    )
    steps = joint_steps(tuple(float(p) for p in positions))
    assert all(type(step) is float for step in steps)
    np.testing.assert_array_equal(steps, expected)
