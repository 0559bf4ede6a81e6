"""Observation: upstream's aggregated observation, field for field, and over real DDS.

Upstream MobileManipulationCore's perception package publishes it; the policy
nodes here read it. The field list below is upstream's msg/Observation.msg
(names, order, types), so code written against upstream's message builds
against this one, and both sides put the same bytes on the wire.
"""

import json
import time
from pathlib import Path

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data

from manipulation_msgs.msg import Observation, PolicyOutput

UPSTREAM_FIELDS = [
    ("header", "std_msgs/Header"),
    ("rgb_image", "sensor_msgs/Image"),
    ("has_rgb_image", "boolean"),
    ("depth_image", "sensor_msgs/Image"),
    ("has_depth_image", "boolean"),
    ("joint_states", "sensor_msgs/JointState"),
    ("has_joint_states", "boolean"),
    ("base_to_camera", "geometry_msgs/TransformStamped"),
    ("has_base_to_camera", "boolean"),
    ("base_to_ee", "geometry_msgs/TransformStamped"),
    ("has_base_to_ee", "boolean"),
    ("base_frame", "string"),
    ("camera_frame", "string"),
    ("ee_frame", "string"),
]

# Type hashes (ROS 2 Iron and later put them in the DDS discovery data) of upstream's
# messages at its commit 714a349, computed by building its msg files with this
# workspace's rosidl. Equal hash: the same type on the wire.
UPSTREAM_OBSERVATION_HASH = (
    "RIHS01_e45d687f6a2f7549896e716fca80184f29b30699e73d4e2ba7c583dd53ea2508"
)
UPSTREAM_POLICY_OUTPUT_HASH = (
    "RIHS01_1968421e26d240fbc8cf669d57a0b1243f35262629f657e9586e9d9ddfe46eb4"
)


def test_fields_are_upstreams_in_its_order_and_types():
    assert list(Observation.get_fields_and_field_types().items()) == UPSTREAM_FIELDS


def _type_hash(name: str) -> str:
    """The RIHS01 hash rosidl generated for manipulation_msgs/msg/<name> (Iron and later)."""
    packages = pytest.importorskip("ament_index_python.packages")
    try:
        share = Path(packages.get_package_share_directory("manipulation_msgs"))
    except packages.PackageNotFoundError:
        pytest.skip("workspace not built (make build)")
    description = share / "msg" / f"{name}.json"
    if not description.is_file():
        pytest.skip("this ROS 2 generates no type descriptions (Humble)")
    hashes = json.loads(description.read_text())["type_hashes"]
    wanted = f"manipulation_msgs/msg/{name}"
    return next(h["hash_string"] for h in hashes if h["type_name"] == wanted)


def test_observation_is_upstreams_type_on_the_wire_policy_output_is_not():
    assert _type_hash("Observation") == UPSTREAM_OBSERVATION_HASH
    # The added eef_target_mode makes another type (the README's migration section says so).
    assert _type_hash("PolicyOutput") != UPSTREAM_POLICY_OUTPUT_HASH
    assert "eef_target_mode" in list(PolicyOutput.get_fields_and_field_types())[11:]


def make_full_observation() -> Observation:
    msg = Observation()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_321, 123_456_789
    msg.header.frame_id = "base_link"
    msg.rgb_image.header = msg.header
    msg.rgb_image.header.frame_id = "camera_color_optical_frame"
    msg.rgb_image.height, msg.rgb_image.width = 2, 3
    msg.rgb_image.encoding = "bgr8"
    msg.rgb_image.step = 9
    msg.rgb_image.data = bytes(range(18))
    msg.has_rgb_image = True
    msg.depth_image.height, msg.depth_image.width = 2, 1
    msg.depth_image.encoding = "16UC1"
    msg.depth_image.is_bigendian = 0
    msg.depth_image.step = 2
    msg.depth_image.data = bytes([1, 2, 3, 4])
    msg.has_depth_image = True
    msg.joint_states.header.stamp = msg.header.stamp
    msg.joint_states.name = ["joint1", "joint2", "gripper"]
    msg.joint_states.position = [0.1, -0.4, 0.02]
    msg.joint_states.velocity = [0.0, 0.5, float("nan")]
    msg.joint_states.effort = []
    msg.has_joint_states = True
    for transform, child, xyz, xyzw in (
        (msg.base_to_camera, "camera_link", (-0.18, 0.0, 0.5), (0.0, 0.3826834, 0.0, 0.9238795)),
        (msg.base_to_ee, "link6", (0.35, -0.05, 0.22), (0.0, 0.0, 0.7071068, 0.7071068)),
    ):
        transform.header.stamp = msg.header.stamp
        transform.header.frame_id = "base_link"
        transform.child_frame_id = child
        t, r = transform.transform.translation, transform.transform.rotation
        t.x, t.y, t.z = xyz
        r.x, r.y, r.z, r.w = xyzw
    msg.has_base_to_camera = True
    msg.has_base_to_ee = True
    msg.base_frame = "base_link"
    msg.camera_frame = "camera_link"
    msg.ee_frame = "link6"
    return msg


@pytest.mark.parametrize("qos", ["reliable_10", "sensor_data"])
def test_full_observation_round_trips_over_dds(qos):
    """Upstream's perception publishes it reliable, depth 10; the policy nodes subscribe
    with the sensor-data profile, which matches such a publisher."""
    context = Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("observation_roundtrip", context=context)
        received = []
        profile = qos_profile_sensor_data if qos == "sensor_data" else 10
        node.create_subscription(Observation, "/test/observation", received.append, profile)
        publisher = node.create_publisher(Observation, "/test/observation", 10)
        sent = make_full_observation()
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 10.0
        while not received and time.monotonic() < deadline:
            publisher.publish(sent)
            executor.spin_once(timeout_sec=0.1)
        assert received, "no Observation came back over DDS within 10 s"
        got = received[0]
        assert got is not sent
        # NaN != NaN: compare the velocity apart, then the rest as whole messages.
        velocity = list(got.joint_states.velocity)
        assert velocity[:2] == [0.0, 0.5] and velocity[2] != velocity[2]
        got.joint_states.velocity = sent.joint_states.velocity = []
        assert got == sent
        assert bytes(got.rgb_image.data) == bytes(range(18))
        assert got.base_to_ee.transform.translation.x == 0.35
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
