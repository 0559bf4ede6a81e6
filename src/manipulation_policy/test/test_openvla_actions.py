import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from manipulation_policy.core.policy_types import (
    ActionOverrides,
    EefTargetMode,
    Observation,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.core.pose_math import (
    apply_delta,
    compose_with_current_pose,
    quaternion_from_rpy,
    rpy_from_quaternion,
)
from manipulation_policy.core.upstream_compat import (
    VECTOR_CONFIDENCE,
    ActionConversionOptions,
    convert_action_vector,
    gripper_command,
    limit_length,
    normalize_gripper,
)

FRAME = "odom"


def convert(raw, eef_pose=None, **options):
    observation = Observation(reference_frame=FRAME, eef_pose=eef_pose)
    return convert_action_vector(raw, observation, ActionConversionOptions(**options))


def position(action):
    p = action.eef_target.position
    return np.array([p.x, p.y, p.z])


def rpy(action):
    return np.array(rpy_from_quaternion(action.eef_target.orientation))


def test_plain_delta_keeps_the_model_numbers_and_frame():
    result = convert([0.01, -0.02, 0.005, 0.1, -0.2, 0.3, 1.0])
    action = result.action
    assert result.hold_reason is None
    assert action.reference_frame == FRAME
    assert action.eef_target_mode is EefTargetMode.DELTA
    np.testing.assert_allclose(position(action), [0.01, -0.02, 0.005])
    assert action.eef_target.orientation == quaternion_from_rpy(0.1, -0.2, 0.3)
    np.testing.assert_allclose(rpy(action), [0.1, -0.2, 0.3], atol=1e-12)
    assert action.joint_deltas is None and action.base_velocity_hint is None
    assert action.confidence == VECTOR_CONFIDENCE > 0 and not action.is_hold


def test_zero_rotation_is_the_identity_quaternion():
    action = convert([0, 0, 0, 0, 0, 0, 0.5]).action
    assert action.eef_target.orientation == Quaternion(0.0, 0.0, 0.0, 1.0)


# PolicyOutput's gripper meaning is upstream's and OpenVLA's: 0 = closed, 1 = open.
# A raw value outside [0, 1] is read as a [-1, 1] model's, (v + 1) / 2, as upstream does.
@pytest.mark.parametrize(
    "model_gripper, open_is_one, close_is_one",
    [
        (1.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
        (0.25, 0.25, 0.75),
        (0.996, 0.996, 0.004),
        (1.7, 1.0, 0.0),
        (1.2, 1.0, 0.0),  # (1.2 + 1) / 2 = 1.1, clamped
        (-0.4, 0.3, 0.7),
        (-1.0, 0.0, 1.0),
        (-0.5, 0.25, 0.75),
        (-7.0, 0.0, 1.0),
    ],
)
def test_gripper_conventions_map_to_message_range_and_clamp(
    model_gripper, open_is_one, close_is_one
):
    raw = [0, 0, 0, 0, 0, 0, model_gripper]
    assert convert(raw).action.gripper_command == pytest.approx(open_is_one)
    assert convert(raw, gripper_convention="open_is_one").action.gripper_command == pytest.approx(
        open_is_one
    )
    assert convert(raw, gripper_convention="close_is_one").action.gripper_command == pytest.approx(
        close_is_one
    )
    assert gripper_command(model_gripper, "close_is_one") == pytest.approx(close_is_one)


def test_gripper_command_rejects_unknown_convention():
    with pytest.raises(ValueError, match="gripper_convention"):
        gripper_command(0.5, "open_is_zero")


def test_scales_apply_per_component():
    raw = [0.01, 0.02, -0.03, 0.1, 0.2, -0.3, 1.0]
    action = convert(raw, position_scale=2.0, rotation_scale=0.5).action
    np.testing.assert_allclose(position(action), [0.02, 0.04, -0.06])
    np.testing.assert_allclose(rpy(action), [0.05, 0.1, -0.15], atol=1e-12)
    assert action.gripper_command == 1.0  # the gripper is not scaled


def test_zero_scale_is_refused_as_everywhere_else():
    # A scale of 0 would silently stop that part of the motion; the node parameter,
    # the server flag and the per-request field refuse it too (core.options.scale).
    with pytest.raises(ValueError, match="position_scale must be a finite number > 0"):
        ActionConversionOptions(position_scale=0.0)
    action = convert([0.01, 0.02, 0.03, 0.1, 0.2, 0.3, 0.0], position_scale=1e-9).action
    np.testing.assert_allclose(position(action), [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(rpy(action), [0.1, 0.2, 0.3], atol=1e-12)


def test_position_step_limit_caps_length_and_keeps_direction():
    raw = [0.03, 0.04, 0.0, 0, 0, 0, 0]  # 5 cm
    action = convert(raw, max_position_step=0.01).action
    np.testing.assert_allclose(position(action), [0.006, 0.008, 0.0])
    small = convert([0.003, 0.004, 0, 0, 0, 0, 0], max_position_step=0.01).action
    np.testing.assert_allclose(position(small), [0.003, 0.004, 0.0])  # under the limit: untouched


def test_rotation_step_limit_caps_euler_vector_length():
    action = convert([0, 0, 0, 0.0, 0.3, 0.4, 0], max_rotation_step=0.1).action
    np.testing.assert_allclose(rpy(action), [0.0, 0.06, 0.08], atol=1e-12)
    assert convert([0, 0, 0, 0.0, 0.03, 0.04, 0], max_rotation_step=0.1).action.eef_target == Pose(
        position=Vector3(0.0, 0.0, 0.0), orientation=quaternion_from_rpy(0.0, 0.03, 0.04)
    )


def test_scale_is_applied_before_the_limit():
    action = convert([0.004, 0, 0, 0, 0, 0, 0], position_scale=5.0, max_position_step=0.01).action
    np.testing.assert_allclose(position(action), [0.01, 0, 0])


def test_limit_length_helper():
    np.testing.assert_allclose(limit_length(np.array([3.0, 4.0]), None), [3, 4])
    np.testing.assert_allclose(limit_length(np.array([3.0, 4.0]), 1.0), [0.6, 0.8])
    np.testing.assert_allclose(limit_length(np.array([0.0, 0.0]), 1.0), [0, 0])


@pytest.mark.parametrize("index, name", [(0, "dx"), (4, "dpitch"), (6, "gripper")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_output_becomes_hold_with_reason(index, name, bad):
    raw = [0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    raw[index] = bad
    result = convert(raw, eef_pose=Pose())
    assert result.action.is_hold
    assert result.action.reference_frame == FRAME
    assert result.hold_reason is not None and name in result.hold_reason
    assert "holding" in result.hold_reason


def test_eef_pose_gives_absolute_target_composed_with_apply_delta():
    current = Pose(Vector3(0.5, -0.1, 0.3), quaternion_from_rpy(0.0, 0.0, math.pi / 2))
    raw = [0.01, 0.02, -0.01, 0.0, 0.0, 0.1, 0.0]
    delta = convert(raw, eef_pose=current).action
    assert delta.eef_target_mode is EefTargetMode.DELTA  # the backend's caller composes
    action = compose_with_current_pose(delta, current)
    assert action.eef_target_mode is EefTargetMode.ABSOLUTE
    expected = apply_delta(
        current, Pose(Vector3(0.01, 0.02, -0.01), quaternion_from_rpy(0.0, 0.0, 0.1))
    )
    assert action.eef_target == expected
    np.testing.assert_allclose(position(action), [0.51, -0.08, 0.29])
    np.testing.assert_allclose(rpy(action), [0.0, 0.0, math.pi / 2 + 0.1], atol=1e-12)


def test_absolute_target_uses_the_scaled_and_limited_delta():
    current = Pose(Vector3(1.0, 0.0, 0.0))
    delta = convert([0.05, 0, 0, 0, 0, 0, 0], eef_pose=current, max_position_step=0.02).action
    action = compose_with_current_pose(delta, current)
    np.testing.assert_allclose(position(action), [1.02, 0, 0])


@pytest.mark.parametrize("raw", [[0.0] * 6, [0.0] * 8, [[0.0] * 7, [0.0] * 7]])
def test_wrong_action_size_is_refused(raw):
    with pytest.raises(ValueError, match="7 numbers"):
        convert(raw)


def test_accepts_numpy_and_2d_single_row():
    action = convert(np.array([[0.01, 0, 0, 0, 0, 0, 1]], dtype=np.float32)).action
    np.testing.assert_allclose(position(action), [0.01, 0, 0], rtol=1e-6)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"gripper_convention": "open"}, "gripper_convention"),
        ({"position_scale": -1.0}, "position_scale"),
        ({"rotation_scale": math.nan}, "rotation_scale"),
        ({"position_scale": "2"}, "position_scale"),
        ({"rotation_scale": True}, "rotation_scale"),
        ({"max_position_step": 0.0}, "max_position_step"),
        ({"max_rotation_step": -0.1}, "max_rotation_step"),
        ({"max_position_step": math.inf}, "max_position_step"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, field):
    with pytest.raises(ValueError, match=field):
        ActionConversionOptions(**options)


def test_default_options_are_used_when_none_given():
    observation = Observation(reference_frame=FRAME)
    result = convert_action_vector([0, 0, 0, 0, 0, 0, 1.0], observation)
    assert result.action.gripper_command == 1.0  # open_is_one by default: 1 stays open


def upstream_gripper(value):
    """Upstream MobileManipulationCore's documented mapping of OpenVLA's gripper value."""
    if value < 0.0 or value > 1.0:
        value = (value + 1.0) * 0.5
    return max(0.0, min(1.0, value))


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
def test_gripper_matches_upstream_for_every_finite_input(value):
    assert normalize_gripper(value) == upstream_gripper(value)
    assert convert([0, 0, 0, 0, 0, 0, value]).action.gripper_command == upstream_gripper(value)


def test_clip_actions_clamps_each_axis_then_the_server_cap_still_applies():
    raw = [0.5, -0.02, 2.0, 0.0, -3.0, 0.1, 1.5]
    options = dict(clip_actions=True, position_bounds=(-0.1, 0.1), rotation_bounds=(-0.35, 0.35),
                   gripper_bounds=(0.0, 0.8))
    action = convert(raw, **options).action
    np.testing.assert_allclose(position(action), [0.1, -0.02, 0.1])
    np.testing.assert_allclose(rpy(action), [0.0, -0.35, 0.1], atol=1e-12)
    assert action.gripper_command == pytest.approx(0.8)  # raw clamped before normalising
    capped = convert(raw, max_position_step=0.05, **options).action
    assert np.linalg.norm(position(capped)) == pytest.approx(0.05)


def test_clip_is_off_by_default():
    np.testing.assert_allclose(position(convert([2.0, 0, 0, 0, 0, 0, 0]).action), [2.0, 0, 0])


def test_per_request_overrides_replace_scaling_and_clipping_but_not_the_caps():
    overrides = ActionOverrides(position_scale=10.0, rotation_scale=2.0, clip_actions=True,
                                position_bounds=(-0.05, 0.05))
    observation = Observation(reference_frame=FRAME, action_overrides=overrides)
    options = ActionConversionOptions(position_scale=3.0, max_position_step=0.06)
    action = convert_action_vector([0.001, 0.02, -0.003, 0.1, 0, 0, 1.0], observation,
                                    options).action
    np.testing.assert_allclose(position(action), [0.01, 0.05, -0.03])  # 10x, then clamped
    np.testing.assert_allclose(rpy(action), [0.2, 0, 0], atol=1e-12)
    capped = convert_action_vector([0.05, 0.05, 0.05, 0, 0, 0, 1.0], observation,
                                    options).action
    assert np.linalg.norm(position(capped)) == pytest.approx(0.06)  # the server's cap wins


@pytest.mark.parametrize(
    "options, field",
    [
        ({"position_bounds": (1.0, -1.0)}, "position_bounds"),
        ({"rotation_bounds": (0.0, math.inf)}, "rotation_bounds"),
        ({"gripper_bounds": (0.0,)}, "gripper_bounds"),
        ({"clip_actions": "yes"}, "clip_actions"),
    ],
)
def test_bad_clip_options_are_refused(options, field):
    with pytest.raises(ValueError, match=field):
        ActionConversionOptions(**options)
