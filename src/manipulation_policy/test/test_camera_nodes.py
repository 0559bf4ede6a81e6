"""Several named cameras and the robot's state vector through the nodes, over real DDS.

Two cameras of different colours, one raw (``wrist``) and one JPEG-compressed
(``front``), and joint states. The in-process node runs ``CamerasAndStateBackend``, the
remote node talks to the project's policy server serving it. It declares that it reads
cameras wrist and front and a state of 3 values and answers with what it received
(each camera's mean red value, the state, the length of robot_id), so an output proves
which frame reached which name, the state's order and who sent it. A set with a
camera missing or off by more than camera_sync_tolerance_sec, or a state that cannot
be made, sends nothing; a configuration that does not fit the policy fails configure
with one line.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from camera_test_backends import CamerasAndStateBackend
from diagnostic_msgs.msg import DiagnosticArray
from node_harness import (
    JOINT_NAMES,
    JOINT_POSITIONS,
    Rig,
    wait_until,
)
from rclpy.exceptions import ParameterException
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.imaging import decode_image_bytes, encode_jpeg
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.server.process import ServerProcess


def solid(red: int, green: int, blue: int) -> np.ndarray:
    image = np.empty((48, 64, 3), dtype=np.uint8)
    image[...] = (red, green, blue)
    return image


WRIST = solid(200, 30, 30)
FRONT = solid(40, 180, 90)
FRONT_JPEG = encode_jpeg(FRONT, 90)
# The rig's joints are shoulder, elbow, wrist at 0.3, -0.2, 0.9: the state takes
# them in another order.
STATE_JOINTS = ["wrist", "shoulder", "elbow"]
EXPECTED_STATE = (0.9, 0.3, -0.2)
assert dict(zip(JOINT_NAMES, JOINT_POSITIONS, strict=True))["wrist"] == 0.9


class Cameras:
    """The rig's two cameras: wrist (sensor_msgs/Image) and front (CompressedImage)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.wrist_topic = f"{rig.namespace}/wrist/image_raw"
        self.front_topic = f"{rig.namespace}/front/image_raw/compressed"
        self.wrist_pub = rig.node.create_publisher(
            Image, self.wrist_topic, qos_profile_sensor_data
        )
        self.front_pub = rig.node.create_publisher(
            CompressedImage, self.front_topic, qos_profile_sensor_data
        )
        self.front_offset_sec = 0.0  # the front camera's stamp, relative to the wrist's
        self.front_on = True

    def publish(self) -> None:
        now = self.rig.node.get_clock().now().nanoseconds
        self.wrist_pub.publish(
            ros_conversion.rgb_to_image(WRIST, ros_conversion.nanoseconds_to_stamp(now))
        )
        if self.front_on:
            msg = CompressedImage(format="rgb8; jpeg compressed bgr8")
            msg.header.stamp = ros_conversion.nanoseconds_to_stamp(
                now + int(self.front_offset_sec * 1e9)
            )
            msg.data = FRONT_JPEG
            self.front_pub.publish(msg)

    def parameters(self, **values):
        return {
            "camera_topics": [self.wrist_topic, self.front_topic],
            "camera_names": ["wrist", "front"],
            "state_joints": STATE_JOINTS,
            **values,
        }


class ExecutorDiagnostics:
    """The node's ``action executor`` status on /diagnostics, newest last."""

    def __init__(self, rig: Rig) -> None:
        self._lock = threading.Lock()
        self.values: list[dict] = []
        self._prefix = f"{rig.namespace}/"
        rig.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_message, 50)

    def _on_message(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(self._prefix) and status.name.endswith(": action executor"):
                with self._lock:
                    self.values.append({kv.key: kv.value for kv in status.values})

    def newest(self) -> dict:
        with self._lock:
            return self.values[-1] if self.values else {}


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


@pytest.fixture(scope="module")
def camera_server():
    """The project's policy server serving CamerasAndStateBackend."""
    with ServerProcess(
        "--backend", "camera_test_backends:CamerasAndStateBackend", "--no-access-log",
        env={API_KEY_ENV: ""}, extra_pythonpath=[str(Path(__file__).resolve().parent)],
    ) as server:  # fmt: skip
        yield server


def start_node(rig: Rig, backend, **parameters) -> PolicyNode:
    # The backend answers with red values up to 255 as joint deltas: no cap on them.
    values = {"backend": "stub", "inference_rate": 20.0, "max_joint_delta": 1000.0,
              **parameters}  # fmt: skip
    return rig.add(PolicyNode(backend=backend, **rig.node_kwargs(**values)))


def start_remote_node(rig: Rig, url: str, **parameters) -> RemotePolicyNode:
    values = {"remote_url": url, "inference_rate": 20.0, "max_joint_delta": 1000.0,
              "remote_fallback_on_failure": False, **parameters}  # fmt: skip
    return rig.add(RemotePolicyNode(**rig.node_kwargs(**values)))


def test_two_cameras_and_the_state_reach_the_policy_by_name_and_in_order(rig):
    backend = CamerasAndStateBackend()
    cameras = Cameras(rig)
    node = start_node(rig, backend, **cameras.parameters())
    assert node.lifecycle_state == "active", node.configure_problem
    rig.stream_joint_states()
    rig.stream(20.0, cameras.publish)
    outputs = rig.wait_for_outputs(3)
    assert len(outputs) >= 3
    observation = backend.received()[-1]
    assert observation.image is None
    assert set(observation.images) == {"wrist", "front"}
    assert np.array_equal(observation.images["wrist"], WRIST)  # raw: exact
    assert np.array_equal(observation.images["front"], decode_image_bytes(FRONT_JPEG, "JPEG"))
    assert observation.state == EXPECTED_STATE
    assert observation.robot_id == node.get_fully_qualified_name()
    # What the policy answered from them went out as the node's command.
    deltas = list(outputs[-1].joint_deltas)
    assert deltas[0] == pytest.approx(200.0, abs=0.01)
    assert deltas[1] == pytest.approx(40.0, abs=2.0)
    assert deltas[2:5] == pytest.approx(list(EXPECTED_STATE))
    assert deltas[5] == len(node.get_fully_qualified_name())


def test_the_remote_node_sends_both_cameras_the_state_and_its_name(rig, camera_server):
    cameras = Cameras(rig)
    node = start_remote_node(rig, camera_server.base_url, **cameras.parameters())
    assert node.lifecycle_state == "active", node.configure_problem
    rig.stream_joint_states()
    rig.stream(20.0, cameras.publish)
    outputs = rig.wait_for_outputs(3)
    assert len(outputs) >= 3
    # Answered by the server's backend from the decoded request: each camera resized
    # to 224x224 and JPEG-encoded (a solid colour survives within a unit or two).
    deltas = list(outputs[-1].joint_deltas)
    assert deltas[0] == pytest.approx(200.0, abs=2.0)
    assert deltas[1] == pytest.approx(40.0, abs=2.0)
    assert deltas[2:5] == pytest.approx(list(EXPECTED_STATE))
    assert deltas[5] == len(node.get_fully_qualified_name())


def test_a_missing_or_stale_camera_or_joint_sends_nothing_until_the_set_is_whole(rig):
    backend = CamerasAndStateBackend()
    cameras = Cameras(rig)
    cameras.front_on = False
    diagnostics = ExecutorDiagnostics(rig)
    node = start_node(rig, backend, **cameras.parameters(camera_sync_tolerance_sec=0.05))
    rig.stream_joint_states()
    rig.stream(20.0, cameras.publish)
    # Only the wrist camera: no set.
    assert wait_until(lambda: node.counters["incomplete_inputs"] >= 5)
    assert node.inputs_problem == "camera front: no frame yet"
    # The front camera's frames 0.3 s older than the wrist's: still no set.
    cameras.front_offset_sec = -0.3
    cameras.front_on = True
    assert wait_until(lambda: (node.inputs_problem or "").startswith("camera front: newest"))
    assert node.inputs_problem == (
        "camera front: newest frame is 0.300 s before wrist's (camera_sync_tolerance_sec=0.05)"
    )
    assert wait_until(lambda: diagnostics.newest().get("inputs_problem", "").startswith(
        "camera front: newest frame is 0.300 s before wrist's"))
    seen = node.counters["incomplete_inputs"]
    assert wait_until(lambda: node.counters["incomplete_inputs"] >= seen + 5)
    assert backend.received() == [] and rig.outputs() == []
    # Within a tolerance set live: sets go.
    [result] = rig.set_parameters("policy_node", camera_sync_tolerance_sec=0.5)
    assert result.successful, result.reason
    outputs = rig.wait_for_outputs(2)
    assert len(outputs) >= 2
    assert set(backend.received()[-1].images) == {"wrist", "front"}
    assert node.inputs_problem is None
    assert wait_until(lambda: diagnostics.newest().get("inputs_problem") == "")


def test_a_joint_of_the_state_missing_from_the_joint_states_sends_nothing(rig):
    backend = CamerasAndStateBackend()
    cameras = Cameras(rig)
    node = start_node(
        rig, backend, **cameras.parameters(state_joints=["wrist", "gripper", "elbow"])
    )
    rig.stream_joint_states()
    rig.stream(20.0, cameras.publish)
    assert wait_until(lambda: node.counters["incomplete_inputs"] >= 5)
    assert node.inputs_problem == (
        "state: joint 'gripper' is not in the joint states (shoulder, elbow, wrist)"
    )
    assert backend.received() == [] and rig.outputs() == []


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ({"camera_names": ["wrist", "top"]},
         "the policy does not fit this robot: images.front is missing: the policy reads "
         "cameras front, wrist, the robot sends top, wrist (camera_names)"),
        ({"state_joints": ["wrist", "elbow"]},
         "the policy does not fit this robot: state has 2 values, but the policy reads 3 "
         "(state_joints has 2)"),
        ({"state_joints": ["wrist", "elbow", "shoulder"], "state_eef_pose": True},
         "the policy does not fit this robot: state has 10 values, but the policy reads 3 "
         "(state_joints has 3 + 7 with state_eef_pose)"),
        ({"camera_topics": [], "camera_names": []},
         "the policy does not fit this robot: images.wrist is missing: the policy reads "
         "cameras front, wrist, the robot sends none (camera_names)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("remote", [False, True], ids=["in_process", "remote"])
def test_a_configuration_the_policy_cannot_read_fails_configure_in_one_line(
    rig, request, remote, parameters, reason
):
    cameras = Cameras(rig)
    if remote:  # the server's /info says what its backend reads
        url = request.getfixturevalue("camera_server").base_url
        node = start_remote_node(rig, url, **cameras.parameters(**parameters))
    else:
        node = start_node(rig, CamerasAndStateBackend(), **cameras.parameters(**parameters))
    assert node.lifecycle_state == "unconfigured"
    assert node.configure_problem == reason


def test_camera_names_must_name_each_camera_topic_at_start(rig):
    cameras = Cameras(rig)
    with pytest.raises(ValueError, match="camera_names must name each of camera_topics"):
        PolicyNode(backend=CamerasAndStateBackend(),
                   **rig.node_kwargs(backend="stub", **cameras.parameters(camera_names=["w"])))
    with pytest.raises(ParameterException, match="'top view' is not a camera name"):
        PolicyNode(backend=CamerasAndStateBackend(), **rig.node_kwargs(
            backend="stub", **cameras.parameters(camera_names=["wrist", "top view"])))
