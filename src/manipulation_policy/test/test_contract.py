"""The wire contract: the original guide's fields, validation errors that name fields."""

import base64
import math

import numpy as np
import pytest

from manipulation_policy.core.contract import (
    InferResponse,
    action_to_response,
    observation_to_request,
    parse_request,
    parse_response,
    request_to_observation,
    response_to_action,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    Observation,
    PolicyAction,
    Pose,
    Quaternion,
    Twist,
    Vector3,
)

MINIMAL_GUIDE_REQUEST = {
    "reference_frame": "base_link",
    "joint_states": {"name": [], "position": [], "velocity": [], "effort": []},
}

RESPONSE_FIELDS = {
    "has_eef_target", "eef_target_pose", "has_joint_deltas", "joint_deltas",
    "gripper_command", "gripper_active", "has_base_hint", "base_velocity_hint",
    "reference_frame", "confidence",
}


def test_minimal_guide_request_is_valid():
    request = parse_request(MINIMAL_GUIDE_REQUEST)
    observation = request_to_observation(request)
    assert observation.image is None
    assert observation.joint_state == JointStateData()
    assert observation.reference_frame == "base_link"


def test_empty_body_uses_defaults_and_unknown_fields_are_ignored():
    request = parse_request({"future_field": {"anything": 1}})
    assert request.reference_frame == "base_link"
    assert request.joint_states.name == []


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"joint_states": {"name": ["a"], "position": ["0.1"]}}, "joint_states.position[0]"),
        # NaN is "unknown" in joint arrays only; elsewhere a number is required.
        ({"eef_pose": {"position": {"x": math.nan}}}, "eef_pose.position.x"),
        ({"openvla_xyz_scaling": math.inf}, "openvla_xyz_scaling"),
        ({"openvla_xyz_scaling": 0.0}, "openvla_xyz_scaling"),
        ({"openvla_rotation_scaling": 1000.0}, "openvla_rotation_scaling"),  # over the cap
        ({"openvla_clip_actions": "true"}, "openvla_clip_actions"),
        ({"openvla_position_bounds": [0.1]}, "openvla_position_bounds"),
        ({"openvla_rotation_bounds": [1.0, -1.0]}, "openvla_rotation_bounds"),
        ({"openvla_gripper_bounds": [0.0, math.nan]}, "openvla_gripper_bounds[1]"),
        ({"task": 7}, "task"),
        ({"task_text": "x" * 1025}, "task_text"),
        ({"joint_states": {"name": ["a", "b"], "position": [0.1]}}, "joint_states.position"),
        ({"joint_states": {"name": [], "effort": [1.0]}}, "joint_states.effort"),
        ({"joint_states": {"name": [1]}}, "joint_states.name[0]"),
        ({"joint_states": []}, "joint_states"),
        ({"reference_frame": 5}, "reference_frame"),
        ({"image_width": 0}, "image_width"),
        ({"image_height": "480"}, "image_height"),
        ({"image": 123}, "image"),
        ({"eef_pose": {"position": {"x": "far"}}}, "eef_pose.position.x"),
    ],
)
def test_bad_fields_are_named(payload, field):
    with pytest.raises(InputError) as caught:
        parse_request(payload)
    assert caught.value.field == field


def test_body_must_be_an_object():
    with pytest.raises(InputError) as caught:
        parse_request([1, 2])
    assert caught.value.field == "body"


def test_observation_round_trips_through_request_json():
    rgb = np.zeros((24, 32, 3), dtype=np.uint8)
    rgb[:, :, 0] = 200
    observation = Observation(
        joint_state=JointStateData(("j1", "j2"), (0.1, -0.2), (0.0, 0.5), ()),
        image=rgb,
        reference_frame="arm_base",
        instruction="pick up the cup",
        eef_pose=Pose(Vector3(0.3, 0.0, 0.2), Quaternion(0.0, 0.0, 0.0, 1.0)),
    )
    body = observation_to_request(observation, request_id="r-1")
    assert body["image_width"] == 32 and body["image_height"] == 24
    assert base64.b64decode(body["image"])[:2] == b"\xff\xd8"  # a real JPEG
    decoded = request_to_observation(parse_request(body))
    assert decoded.joint_state == observation.joint_state
    assert decoded.instruction == "pick up the cup"
    assert decoded.eef_pose == observation.eef_pose
    assert decoded.image.shape == (24, 32, 3)
    assert abs(int(decoded.image[..., 0].mean()) - 200) <= 3  # JPEG is lossy


def test_declared_image_size_must_match():
    body = {
        "image": base64.b64encode(encode_jpeg(np.zeros((10, 20, 3), np.uint8))).decode(),
        "image_width": 21,
    }
    with pytest.raises(InputError) as caught:
        request_to_observation(parse_request(body))
    assert caught.value.field == "image_width"


def test_hold_action_response_has_every_guide_field():
    body = action_to_response(PolicyAction.hold("odom"))
    assert RESPONSE_FIELDS <= body.keys()
    assert body["has_eef_target"] is False and body["gripper_active"] is False
    assert body["confidence"] == 0.0 and body["reference_frame"] == "odom"
    assert response_to_action(parse_response(body)).is_hold


def test_full_action_round_trips_through_response_json():
    action = PolicyAction(
        reference_frame="base_link",
        eef_target=Pose(Vector3(0.1, 0.2, 0.3), Quaternion(0.0, 0.0, 1.0, 0.0)),
        eef_target_mode=EefTargetMode.ABSOLUTE,
        joint_deltas=(0.01, -0.02),
        gripper_command=0.8,
        base_velocity_hint=Twist(Vector3(0.2, 0.0, 0.0), Vector3(0.0, 0.0, 0.1)),
        confidence=0.9,
    )
    body = action_to_response(action, request_id="abc", inference_time_ms=3.5)
    assert body["eef_target_mode"] == "absolute"
    assert body["request_id"] == "abc"
    assert response_to_action(InferResponse.model_validate(body)) == action


def test_non_finite_action_never_reaches_the_wire():
    with pytest.raises(ValueError, match="field confidence$"):
        action_to_response(PolicyAction(confidence=math.nan))
    with pytest.raises(ValueError, match=r"field joint_deltas\[1\]$"):
        action_to_response(PolicyAction(joint_deltas=(0.0, math.inf)))
    with pytest.raises(ValueError, match=r"field eef_target_pose\.position\.y$"):
        action_to_response(PolicyAction(eef_target=Pose(position=Vector3(0.0, -math.inf, 0.0))))
