"""A fully populated PolicyOutput survives a real DDS publish/subscribe on loopback."""

import math
import time

import pytest
import rclpy
from geometry_msgs.msg import Pose, Twist
from std_msgs.msg import Header

from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput

FIELDS = [
    "has_eef_target",
    "eef_target_mode",
    "has_joint_deltas",
    "gripper_command",
    "gripper_active",
    "has_base_hint",
    "reference_frame",
    "confidence",
    "due",
    "step_index",
    "chunk_length",
    "request_id",
    "has_joint_positions",
]


def make_full_output() -> PolicyOutput:
    msg = PolicyOutput()
    msg.header = Header(frame_id="arm_base_link")
    msg.header.stamp.sec = 1_700_000_123
    msg.header.stamp.nanosec = 456_789
    msg.has_eef_target = True
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = 0.31, -0.12, 0.47
    half = math.sqrt(0.5)
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (
        0.0, half, 0.0, half,
    )
    msg.eef_target_pose = pose
    msg.eef_target_mode = PolicyOutput.EEF_TARGET_ABSOLUTE
    msg.has_joint_deltas = True
    msg.joint_deltas = [0.01, -0.02, 0.03, -0.04, 0.05, -0.06, 0.07]
    msg.gripper_command = 0.75
    msg.gripper_active = True
    msg.has_base_hint = True
    twist = Twist()
    twist.linear.x, twist.linear.y, twist.linear.z = 0.2, 0.05, 0.0
    twist.angular.x, twist.angular.y, twist.angular.z = 0.0, 0.0, -0.3
    msg.base_velocity_hint = twist
    msg.reference_frame = "arm_base_link"
    msg.confidence = 0.875
    msg.due.sec, msg.due.nanosec = 1_700_000_123, 300_456_789  # step 3 of a 0.1 s period
    msg.step_index = 3
    msg.chunk_length = 8
    msg.request_id = "c89d3af380c84d4d-42"
    msg.has_joint_positions = True
    msg.joint_positions = [0.5, -1.25, 2.0]
    msg.joint_names = ["shoulder", "elbow", "wrist"]
    return msg


@pytest.fixture
def node():
    rclpy.init()
    n = rclpy.create_node("policy_output_roundtrip")
    yield n
    n.destroy_node()
    rclpy.shutdown()


# The upstream MobileManipulationCore message, field by field, in its order
# (read from its msg/PolicyOutput.msg); code built against it must build here.
UPSTREAM_FIELDS = [
    ("header", "std_msgs/Header"),
    ("eef_target_pose", "geometry_msgs/Pose"),
    ("has_eef_target", "boolean"),
    ("joint_deltas", "sequence<double>"),
    ("has_joint_deltas", "boolean"),
    ("gripper_command", "double"),
    ("gripper_active", "boolean"),
    ("base_velocity_hint", "geometry_msgs/Twist"),
    ("has_base_hint", "boolean"),
    ("reference_frame", "string"),
    ("confidence", "float"),
]


def test_constants_are_distinct():
    assert PolicyOutput.EEF_TARGET_ABSOLUTE != PolicyOutput.EEF_TARGET_DELTA
    # Upstream's (and OpenVLA's) gripper meaning: 0 = closed, 1 = open.
    assert PolicyOutput.GRIPPER_CLOSED == 0.0
    assert PolicyOutput.GRIPPER_OPEN == 1.0


def test_upstream_fields_come_first_in_upstream_order_and_types():
    fields = list(PolicyOutput.get_fields_and_field_types().items())
    assert fields[: len(UPSTREAM_FIELDS)] == UPSTREAM_FIELDS
    assert fields[len(UPSTREAM_FIELDS):] == [
        ("eef_target_mode", "uint8"),
        ("due", "builtin_interfaces/Time"),
        ("step_index", "uint16"),
        ("chunk_length", "uint16"),
        ("request_id", "string"),
        ("joint_positions", "sequence<double>"),
        ("has_joint_positions", "boolean"),
        ("joint_names", "sequence<string>"),
    ]


def test_full_policy_output_round_trips_over_dds(node):
    received = []
    node.create_subscription(PolicyOutput, "/test/policy_output", received.append, 10)
    publisher = node.create_publisher(PolicyOutput, "/test/policy_output", 10)
    sent = make_full_output()

    deadline = time.monotonic() + 10.0
    while not received and time.monotonic() < deadline:
        publisher.publish(sent)
        rclpy.spin_once(node, timeout_sec=0.1)
    assert received, "no PolicyOutput came back over DDS within 10 s"
    got = received[0]

    assert got is not sent
    for name in FIELDS:
        assert getattr(got, name) == getattr(sent, name), name
    assert got.header.frame_id == sent.header.frame_id
    assert got.header.stamp.sec == sent.header.stamp.sec
    assert got.header.stamp.nanosec == sent.header.stamp.nanosec
    assert list(got.joint_deltas) == list(sent.joint_deltas)
    assert list(got.joint_positions) == list(sent.joint_positions)
    assert list(got.joint_names) == list(sent.joint_names)
    for part in ("x", "y", "z"):
        assert getattr(got.eef_target_pose.position, part) == getattr(
            sent.eef_target_pose.position, part
        )
        assert getattr(got.base_velocity_hint.linear, part) == getattr(
            sent.base_velocity_hint.linear, part
        )
        assert getattr(got.base_velocity_hint.angular, part) == getattr(
            sent.base_velocity_hint.angular, part
        )
    for part in ("x", "y", "z", "w"):
        assert getattr(got.eef_target_pose.orientation, part) == getattr(
            sent.eef_target_pose.orientation, part
        )
    # The whole message compares equal too (generated __eq__ covers every field).
    assert got == sent


def test_action_chunk_round_trips_over_dds(node):
    received = []
    node.create_subscription(PolicyActionChunk, "/test/policy_chunk", received.append, 10)
    publisher = node.create_publisher(PolicyActionChunk, "/test/policy_chunk", 10)
    sent = PolicyActionChunk()
    sent.header = make_full_output().header
    sent.action_period_sec = 0.1
    sent.actions = [make_full_output() for _ in range(3)]
    for index, action in enumerate(sent.actions):
        action.step_index, action.chunk_length = index, 3

    deadline = time.monotonic() + 10.0
    while not received and time.monotonic() < deadline:
        publisher.publish(sent)
        rclpy.spin_once(node, timeout_sec=0.1)
    assert received, "no PolicyActionChunk came back over DDS within 10 s"
    assert received[0] == sent
    assert [a.step_index for a in received[0].actions] == [0, 1, 2]
    assert list(PolicyActionChunk.get_fields_and_field_types()) == [
        "header", "actions", "action_period_sec"
    ]
