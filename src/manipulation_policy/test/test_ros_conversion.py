"""ROS messages <-> plain types, on real generated message classes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image, JointState

from manipulation_msgs.msg import Observation as ObservationMsg
from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    PolicyAction,
    Pose,
    Quaternion,
    Twist,
    Vector3,
)
from manipulation_policy.nodes.ros_conversion import (
    action_to_policy_output,
    compressed_image_to_rgb,
    image_to_rgb,
    joint_state_to_data,
    nanoseconds_to_stamp,
    observation_eef_pose,
    observation_image_stamp,
    observation_joint_state,
    policy_output_to_action,
    pose_stamped_to_pose,
    rgb_to_image,
    stamp_to_nanoseconds,
    unsupported_encoding,
)
from manipulation_policy.robot.scheduling import StampedPose

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
STAMP = Time(sec=1_700_000_001, nanosec=250_000_000)


def raw_image(pixels: np.ndarray, encoding: str, padding: int) -> Image:
    """An Image whose rows are ``padding`` bytes longer than the pixels (as some drivers do)."""
    height, width = pixels.shape[:2]
    row = pixels.reshape(height, -1)
    padded = np.full((height, row.shape[1] + padding), 0xAB, dtype=np.uint8)
    padded[:, : row.shape[1]] = row
    msg = Image(height=height, width=width, encoding=encoding, step=padded.shape[1])
    msg.data = padded.tobytes()
    return msg


@pytest.mark.parametrize(
    ("encoding", "pixels", "expected"),
    [
        ("rgb8", RGB, RGB),
        ("bgr8", RGB[:, :, ::-1], RGB),
        ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)]), RGB),
        ("bgra8", np.dstack([RGB[:, :, ::-1], np.full(RGB.shape[:2], 9, np.uint8)]), RGB),
        ("mono8", RGB[:, :, 0], np.repeat(RGB[:, :, :1], 3, axis=2)),
    ],
)
@pytest.mark.parametrize("padding", [0, 3])
def test_raw_encodings_with_row_padding(encoding, pixels, expected, padding):
    msg = raw_image(np.ascontiguousarray(pixels), encoding, padding)
    assert unsupported_encoding(msg) is None
    rgb = image_to_rgb(msg)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, expected)


def test_unsupported_encoding_is_named():
    msg = raw_image(RGB, "yuv422", 0)
    assert unsupported_encoding(msg) == "yuv422"
    with pytest.raises(InputError) as error:
        image_to_rgb(msg)
    assert error.value.field == "encoding"


def test_truncated_image_data_is_an_input_error():
    msg = raw_image(RGB, "rgb8", 0)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(InputError) as error:
        image_to_rgb(msg)
    assert error.value.field == "data"


def test_rgb_to_image_round_trips():
    msg = rgb_to_image(RGB, STAMP, "cam")
    assert (msg.encoding, msg.step, msg.header.frame_id) == ("rgb8", 21, "cam")
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("rgb8; png compressed", "PNG"),
                                                 ("jpeg", "JPEG"), ("bgr8; jpeg compressed bgr8",
                                                                    "JPEG")])
def test_compressed_images_decode_to_rgb(fmt, pil_format):
    buffer = io.BytesIO()
    PILImage.fromarray(RGB).save(buffer, format=pil_format)
    msg = CompressedImage(format=fmt)
    msg.data = buffer.getvalue()
    rgb = compressed_image_to_rgb(msg)
    assert rgb.shape == RGB.shape
    if pil_format == "PNG":
        np.testing.assert_array_equal(rgb, RGB)  # lossless


def test_compressed_image_in_an_unknown_format_or_corrupt_is_an_input_error():
    msg = CompressedImage(format="theora")
    msg.data = b"xyz"
    with pytest.raises(InputError) as error:
        compressed_image_to_rgb(msg)
    assert error.value.field == "format"
    msg.format = "jpeg"
    with pytest.raises(InputError):
        compressed_image_to_rgb(msg)


def test_joint_state_and_pose():
    msg = JointState(name=["a", "b"], position=[0.5, -1.0], velocity=[], effort=[1.0, 2.0])
    data = joint_state_to_data(msg)
    assert data.name == ("a", "b") and data.position == (0.5, -1.0)
    assert data.velocity == () and data.effort == (1.0, 2.0)

    pose = PoseStamped()
    pose.pose.position.x, pose.pose.position.z = 0.4, 0.2
    pose.pose.orientation.z, pose.pose.orientation.w = math.sqrt(0.5), math.sqrt(0.5)
    assert pose_stamped_to_pose(pose) == Pose(
        Vector3(0.4, 0.0, 0.2), Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5))
    )


def test_stamps():
    assert stamp_to_nanoseconds(STAMP) == 1_700_000_001_250_000_000
    assert nanoseconds_to_stamp(1_700_000_001_250_000_000) == STAMP


FULL_ACTION = PolicyAction(
    reference_frame="arm_base",
    eef_target=Pose(Vector3(0.1, 0.2, 0.3), Quaternion(0.0, 0.0, 0.6, 0.8)),
    eef_target_mode=EefTargetMode.ABSOLUTE,
    joint_deltas=(0.01, -0.02),
    gripper_command=0.75,
    base_velocity_hint=Twist(Vector3(0.2, 0.0, 0.0), Vector3(0.0, 0.0, -0.1)),
    confidence=0.9,
)


def test_action_to_policy_output_carries_stamp_frame_and_every_field():
    msg = action_to_policy_output(FULL_ACTION, STAMP)
    assert msg.header.stamp == STAMP
    assert msg.header.frame_id == msg.reference_frame == "arm_base"
    assert msg.has_eef_target and msg.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE
    assert msg.eef_target_pose.orientation.z == 0.6
    assert msg.has_joint_deltas and list(msg.joint_deltas) == [0.01, -0.02]
    assert msg.gripper_active and msg.gripper_command == 0.75
    assert msg.has_base_hint and msg.base_velocity_hint.angular.z == -0.1
    assert msg.confidence == 0.9
    assert policy_output_to_action(msg) == FULL_ACTION


def test_absolute_joint_targets_and_their_names_travel_in_the_message():
    action = PolicyAction(joint_positions=(0.5, -1.25), joint_deltas=(0.01, 0.02),
                          joint_names=("shoulder", "elbow"), gripper_command=1.0)
    msg = action_to_policy_output(action, STAMP)
    assert msg.has_joint_positions and list(msg.joint_positions) == [0.5, -1.25]
    assert list(msg.joint_names) == ["shoulder", "elbow"]
    assert msg.has_joint_deltas and list(msg.joint_deltas) == [0.01, 0.02]
    assert policy_output_to_action(msg) == action
    unnamed = action_to_policy_output(PolicyAction(joint_positions=(0.3,)), STAMP)
    assert unnamed.has_joint_positions and list(unnamed.joint_names) == []
    assert policy_output_to_action(unnamed).joint_names is None
    plain = action_to_policy_output(FULL_ACTION, STAMP)
    assert not plain.has_joint_positions and list(plain.joint_positions) == []


def test_delta_mode_constant():
    msg = action_to_policy_output(PolicyAction(eef_target=Pose()), STAMP)
    assert msg.eef_target_mode == PolicyOutput.EEF_TARGET_DELTA


def test_hold_publishes_nothing_to_move():
    msg = action_to_policy_output(PolicyAction.hold("odom"), STAMP)
    assert not (msg.has_eef_target or msg.has_joint_deltas or msg.gripper_active
                or msg.has_base_hint or msg.has_joint_positions)
    assert msg.confidence == 0.0 and msg.header.frame_id == "odom"
    assert policy_output_to_action(msg).is_hold


def test_aggregated_observation_parts():
    msg = ObservationMsg()
    msg.header.stamp = STAMP
    msg.base_frame = "base_link"
    # Parts whose has_* flag is false are absent, whatever the fields hold.
    msg.joint_states.name = ["j1"]
    msg.joint_states.position = [0.5]
    msg.base_to_ee.transform.rotation.w = 1.0
    assert observation_joint_state(msg) is None and observation_eef_pose(msg) is None
    msg.has_joint_states = msg.has_base_to_ee = True
    assert observation_joint_state(msg) == JointStateData(name=("j1",), position=(0.5,))
    later = Time(sec=STAMP.sec + 1, nanosec=0)
    msg.base_to_ee.header.stamp = later
    t, r = msg.base_to_ee.transform.translation, msg.base_to_ee.transform.rotation
    t.x, t.y, t.z = 0.35, -0.05, 0.22
    r.x, r.y, r.z, r.w = 0.0, 0.0, 0.6, 0.8
    # base_to_ee: the end effector's pose in the base frame, stamped as the transform;
    # without a parent frame on the transform, the observation's base_frame.
    pose = Pose(Vector3(0.35, -0.05, 0.22), Quaternion(0.0, 0.0, 0.6, 0.8))
    assert observation_eef_pose(msg) == StampedPose(pose, stamp_to_nanoseconds(later),
                                                    "base_link")  # fmt: skip
    msg.base_to_ee.header.frame_id = "arm_base"
    assert observation_eef_pose(msg).frame_id == "arm_base"
    r.w = r.z = 0.0
    assert observation_eef_pose(msg) is None  # no rotation: not a pose
    # The image's own stamp, else (unstamped image) the observation's.
    assert observation_image_stamp(msg) == STAMP
    msg.rgb_image.header.stamp = later
    assert observation_image_stamp(msg) == later
