"""Shared test equipment for the policy node tests: real rclpy, real HTTP, loopback only.

- ``Rig``: its own rclpy context, one SingleThreadedExecutor spinning in a
  background thread (as in production: a node that blocked it would starve
  every other callback), and a test node that plays camera, joint states,
  instruction, EEF pose and aggregated observation (as upstream's perception
  node) publishers and records PolicyOutputs.
- ``ScriptedPolicyServer`` and the other helpers that need no ROS live in
  remote_harness (the remote client's tests use them without ROS); they are
  re-exported here.
The project's policy server process comes from manipulation_policy.server.process.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped, TransformStamped
from parameter_services import ParameterServices
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from remote_harness import (  # noqa: F401 (the ROS-free part, re-exported for the node tests)
    WAIT_SEC,
    ScriptedPolicyServer,
    assert_actions_close,
    jpeg_roundtrip,
    sample_image,
    wait_until,
)
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from manipulation_msgs.msg import Observation as ObservationMsg
from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.backends import predictor
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import JointStateData, Observation, PolicyAction, Pose
from manipulation_policy.nodes import ros_conversion

_rig_numbers = itertools.count()

JOINT_NAMES = ("shoulder", "elbow", "wrist")
JOINT_POSITIONS = (0.3, -0.2, 0.9)


# ---------------------------------------------------------------- ROS rig


class Rig:
    """A private rclpy context with a spinning executor and a publisher/recorder node."""

    def __init__(self) -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        prefix = f"/rig{os.getpid()}_{next(_rig_numbers)}"
        self.namespace = prefix  # nodes under test go here: no name clash between tests
        self.topics = {
            "camera_topic": f"{prefix}/camera/image_raw",
            "joint_states_topic": f"{prefix}/joint_states",
            "instruction_topic": f"{prefix}/instruction",
            "eef_pose_topic": f"{prefix}/eef_pose",
            "observation_topic": f"{prefix}/observation",
            "output_topic": f"{prefix}/policy_output",
            "preview_topic": f"{prefix}/policy_output_preview",
            "chunk_preview_topic": f"{prefix}/policy_chunk_preview",
            "estop_topic": f"{prefix}/estop",
        }
        self.node = Node("test_rig", context=self.context)
        node = self.node
        self.image_pub = node.create_publisher(
            Image, self.topics["camera_topic"], qos_profile_sensor_data
        )
        self.compressed_pub = node.create_publisher(
            CompressedImage, self.topics["camera_topic"] + "/compressed", qos_profile_sensor_data
        )
        self.joint_pub = node.create_publisher(JointState, self.topics["joint_states_topic"], 10)
        self.instruction_pub = node.create_publisher(String, self.topics["instruction_topic"], 10)
        self.eef_pub = node.create_publisher(PoseStamped, self.topics["eef_pose_topic"], 10)
        # As upstream's perception node publishes it: reliable, depth 10.
        self.observation_pub = node.create_publisher(
            ObservationMsg, self.topics["observation_topic"], 10
        )
        self._lock = threading.Lock()
        self._outputs: list[tuple[float, PolicyOutput]] = []
        node.create_subscription(PolicyOutput, self.topics["output_topic"], self._on_output, 10)
        self._nodes: list[Node] = [node]
        self.executor.add_node(node)
        self._timers: list[Any] = []
        self._parameter_clients: dict[str, ParameterServices] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="rig_executor", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def _on_output(self, msg: PolicyOutput) -> None:
        with self._lock:
            self._outputs.append((time.monotonic(), msg))

    # -------------------------------------------------------- nodes

    def parameters(self, **values: Any) -> list[Parameter]:
        """Parameter overrides for a node under test: the rig's topics plus ``values``."""
        return [Parameter(name, value=value) for name, value in {**self.topics, **values}.items()]

    def node_kwargs(self, **values: Any) -> dict[str, Any]:
        """Constructor keywords for a node under test in this rig."""
        return {
            "context": self.context,
            "namespace": self.namespace,
            "parameter_overrides": self.parameters(**values),
        }

    def add(self, node: Node) -> Node:
        self._nodes.append(node)
        self.executor.add_node(node)
        return node

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._stop.set()
        self._thread.join(5.0)
        for node in reversed(self._nodes):
            self.executor.remove_node(node)
            node.destroy_node()
        self.executor.shutdown(timeout_sec=2.0)
        rclpy.shutdown(context=self.context)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- outputs

    def outputs(self) -> list[PolicyOutput]:
        with self._lock:
            return [msg for _, msg in self._outputs]

    def timed_outputs(self) -> list[tuple[float, PolicyOutput]]:
        with self._lock:
            return list(self._outputs)

    def clear_outputs(self) -> None:
        with self._lock:
            self._outputs.clear()

    def wait_for_outputs(self, count: int, timeout: float = WAIT_SEC) -> list[PolicyOutput]:
        wait_until(lambda: len(self.outputs()) >= count, timeout)
        return self.outputs()

    # -------------------------------------------------------- inputs

    def now(self) -> Time:
        return self.node.get_clock().now().to_msg()

    def stamp_ago(self, seconds: float) -> Time:
        nanoseconds = self.node.get_clock().now().nanoseconds - int(seconds * 1e9)
        return ros_conversion.nanoseconds_to_stamp(nanoseconds)

    def publish_image(self, rgb: np.ndarray, stamp: Optional[Time] = None) -> Time:
        stamp = stamp or self.now()
        self.image_pub.publish(ros_conversion.rgb_to_image(rgb, stamp))
        return stamp

    def publish_joint_state(
        self, names: Iterable[str] = JOINT_NAMES, positions: Iterable[float] = JOINT_POSITIONS
    ) -> None:
        msg = JointState()
        msg.header.stamp = self.now()
        msg.name = list(names)
        msg.position = [float(v) for v in positions]
        self.joint_pub.publish(msg)

    def publish_joint_state_with(self, **fields: list[float]) -> None:
        """The rig's joint state with other velocity/effort arrays."""
        msg = JointState()
        msg.header.stamp = self.now()
        msg.name = list(JOINT_NAMES)
        msg.position = list(JOINT_POSITIONS)
        for name, values in fields.items():
            setattr(msg, name, values)
        self.joint_pub.publish(msg)

    def publish_observation(self, stamp: Optional[Time] = None, **parts: Any) -> Time:
        """An aggregated observation stamped ``stamp`` (default: now); see observation_msg."""
        stamp = stamp or self.now()
        self.observation_pub.publish(observation_msg(stamp, **parts))
        return stamp

    def stream(self, rate_hz: float, publish: Callable[[], Any]) -> Any:
        """Call ``publish`` at ``rate_hz`` on the rig's executor until close or cancel."""
        timer = self.node.create_timer(1.0 / rate_hz, publish)
        self._timers.append(timer)
        return timer

    def stream_camera(self, rgb: np.ndarray, rate_hz: float = 20.0) -> Any:
        return self.stream(rate_hz, lambda: self.publish_image(rgb))

    def stream_joint_states(self, rate_hz: float = 50.0) -> Any:
        return self.stream(rate_hz, self.publish_joint_state)

    # -------------------------------------------------------- parameters

    def set_parameters(self, node_name: str, **values: Any):
        """Set parameters through the node's real /set_parameters service (as `ros2 param set`)."""
        client = self._parameter_clients.get(node_name)
        if client is None:  # kept: its service clients live as long as the rig node
            client = ParameterServices(self.node, f"{self.namespace}/{node_name}")
            self._parameter_clients[node_name] = client
        assert client.wait_for_services(timeout_sec=WAIT_SEC), "parameter services missing"
        future = client.set_parameters(
            [Parameter(name, value=value) for name, value in values.items()]
        )
        assert wait_until(future.done, WAIT_SEC), "set_parameters got no answer"
        return future.result().results


def observation_msg(
    stamp: Time,
    rgb: Optional[np.ndarray] = None,
    joints: Optional[JointStateData] = None,
    base_to_ee: Optional[Pose] = None,
    base_frame: str = "base_link",
) -> ObservationMsg:
    """A manipulation_msgs/Observation as upstream's perception node fills it: the image
    as bgr8 (cv_bridge's BGR8), stamped like the observation; the parts not given are
    absent (has_* false)."""
    msg = ObservationMsg()
    msg.header.stamp = stamp
    msg.header.frame_id = base_frame
    msg.base_frame = base_frame
    msg.camera_frame = "camera_color_optical_frame"
    msg.ee_frame = "link6"
    if rgb is not None:
        image = ros_conversion.rgb_to_image(np.ascontiguousarray(rgb[:, :, ::-1]), stamp,
                                            msg.camera_frame)  # fmt: skip
        image.encoding = "bgr8"
        msg.rgb_image = image
        msg.has_rgb_image = True
    if joints is not None:
        msg.joint_states.header.stamp = stamp
        msg.joint_states.name = list(joints.name)
        msg.joint_states.position = list(joints.position)
        msg.has_joint_states = True
    if base_to_ee is not None:
        transform = TransformStamped()
        transform.header.stamp = stamp
        transform.header.frame_id = base_frame
        transform.child_frame_id = msg.ee_frame
        p, q = base_to_ee.position, base_to_ee.orientation
        t, r = transform.transform.translation, transform.transform.rotation
        t.x, t.y, t.z = p.x, p.y, p.z
        r.x, r.y, r.z, r.w = q.x, q.y, q.z, q.w
        msg.base_to_ee = transform
        msg.has_base_to_ee = True
    return msg


def expected_stub_action(
    image: Optional[np.ndarray],
    instruction: str = "",
    reference_frame: str = "base_link",
    eef_pose: Optional[Pose] = None,
) -> PolicyAction:
    """The stub's answer to the rig's joint state plus ``image``, as the node publishes
    it (a delta composed with ``eef_pose`` when given)."""
    observation = Observation(
        joint_state=JointStateData(name=JOINT_NAMES, position=JOINT_POSITIONS),
        image=image,
        reference_frame=reference_frame,
        instruction=instruction,
        eef_pose=eef_pose,
    )
    (action,) = predictor(StubBackend())(observation).actions  # a chunk of one
    return action

