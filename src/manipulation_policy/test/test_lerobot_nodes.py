"""A LeRobot ACT checkpoint (lerobot_checkpoints: cameras wrist and front, a state of 6)
driving both nodes over real DDS: the in-process policy_node runs the lerobot backend,
the remote node talks to the real policy server serving the same checkpoint. Two
camera topics and the arm's joint_states in; the chunk each node accepts (the chunk
topic) is the checkpoint's, absolute joint targets named by the action layout, and
the same inputs give the same chunk both ways (up to the wire's JPEG), whatever size
the robot's cameras or the remote node's image_width x image_height: the backend resizes
a frame to the checkpoint's size as LeRobot's async inference does."""

from __future__ import annotations

import threading

import lerobot_checkpoints as lc
import numpy as np
import pytest

lc.require_lerobot()

import torch  # noqa: E402
from lerobot.async_inference.helpers import resize_robot_observation_image  # noqa: E402
from node_harness import Rig, wait_until  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from manipulation_msgs.msg import PolicyActionChunk  # noqa: E402
from manipulation_policy.backends.lerobot import LeRobotBackend  # noqa: E402
from manipulation_policy.core.api_key import API_KEY_ENV  # noqa: E402
from manipulation_policy.core.policy_types import Observation  # noqa: E402
from manipulation_policy.nodes import ros_conversion  # noqa: E402
from manipulation_policy.nodes.policy_node import PolicyNode  # noqa: E402
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode  # noqa: E402
from manipulation_policy.server.process import ServerProcess  # noqa: E402

ARM_JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll",
              "gripper"]
ARM_POSITIONS = [0.1, -0.4, 0.6, 0.2, -0.1, 0.3]
FRAMES = {"wrist": (200, 40, 40), "front": (30, 160, 90)}
WAIT_SEC = 120.0  # the first chunk includes loading torch kernels on a loaded machine


def solid(color) -> np.ndarray:
    image = np.empty((lc.IMAGE_SIZE, lc.IMAGE_SIZE, 3), dtype=np.uint8)
    image[...] = color
    return image


class ArmInputs:
    """The arm's two cameras (sensor_msgs/Image) and its joint_states, streamed."""

    def __init__(self, rig: Rig, frames: dict[str, np.ndarray] | None = None) -> None:
        self.rig = rig
        self.frames = frames or {name: solid(color) for name, color in FRAMES.items()}
        self.topics = {name: f"{rig.namespace}/{name}/image_raw" for name in FRAMES}
        self.publishers = {
            name: rig.node.create_publisher(Image, topic, qos_profile_sensor_data)
            for name, topic in self.topics.items()
        }
        self.chunk_topic = f"{rig.namespace}/policy_chunk"
        self._lock = threading.Lock()
        self.chunks: list[PolicyActionChunk] = []
        rig.node.create_subscription(PolicyActionChunk, self.chunk_topic, self._on_chunk, 10)

    def _on_chunk(self, msg: PolicyActionChunk) -> None:
        with self._lock:
            self.chunks.append(msg)

    def first_chunk(self) -> PolicyActionChunk:
        wait_until(lambda: bool(self.chunks), WAIT_SEC)
        with self._lock:
            return self.chunks[0]

    def publish_frames(self) -> None:
        stamp = self.rig.now()
        for name, publisher in self.publishers.items():
            publisher.publish(ros_conversion.rgb_to_image(self.frames[name], stamp))

    def start(self) -> None:
        self.rig.stream(50.0, lambda: self.rig.publish_joint_state(ARM_JOINTS, ARM_POSITIONS))
        self.rig.stream(20.0, self.publish_frames)

    def parameters(self, **values):
        return {
            "camera_topics": [self.topics["wrist"], self.topics["front"]],
            "camera_names": ["wrist", "front"],
            "state_joints": ARM_JOINTS,
            "chunk_topic": self.chunk_topic,
            "inference_rate": 5.0,
            "max_joint_delta": 1000.0,
            **values,
        }


def as_matrix(chunk: PolicyActionChunk) -> np.ndarray:
    return np.array([list(a.joint_positions) + [a.gripper_command] for a in chunk.actions])


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


@pytest.fixture(scope="module")
def act_server(act_checkpoint):
    with ServerProcess(
        "--backend", "lerobot", "--model", str(act_checkpoint), "--action-layout",
        lc.ARM_LAYOUT, "--device", "cpu", "--no-access-log",
        env={API_KEY_ENV: ""}, startup_timeout=180.0,
    ) as server:  # fmt: skip
        yield server
    assert "Traceback" not in server.log()


def in_process_chunk(rig: Rig, checkpoint, frames=None, backend=None) -> PolicyActionChunk:
    inputs = ArmInputs(rig, frames)
    backend = backend or LeRobotBackend(model=str(checkpoint), action_layout=lc.ARM_LAYOUT,
                                        device="cpu")
    node = rig.add(PolicyNode(backend=backend, **rig.node_kwargs(
        backend="lerobot", **inputs.parameters())))
    assert node.lifecycle_state == "active", node.configure_problem
    inputs.start()
    return inputs.first_chunk()


def test_the_in_process_node_publishes_the_checkpoints_chunk(rig, act_checkpoint):
    chunk = in_process_chunk(rig, act_checkpoint)
    assert len(chunk.actions) == lc.ACT_CHUNK
    assert chunk.action_period_sec == pytest.approx(1 / lc.ACT_FPS)
    first = chunk.actions[0]
    assert first.has_joint_positions and list(first.joint_names) == ARM_JOINTS[:5]
    assert len(first.joint_positions) == 5 and not first.joint_deltas
    assert 0.0 <= first.gripper_command <= 1.0 and first.confidence == 1.0


def test_a_camera_of_another_size_is_resized_as_lerobots_async_inference_does(
        rig, act_checkpoint):
    rng = np.random.default_rng(3)
    frames = {"wrist": rng.integers(0, 256, (120, 160, 3), np.uint8),
              "front": rng.integers(0, 256, (72, 128, 3), np.uint8)}
    backend = LeRobotBackend(model=str(act_checkpoint), action_layout=lc.ARM_LAYOUT,
                             device="cpu")
    published = as_matrix(in_process_chunk(rig, act_checkpoint, frames, backend))
    # The same frames resized beforehand by LeRobot's own helper, to the same backend.
    shape = (3, lc.IMAGE_SIZE, lc.IMAGE_SIZE)
    resized = {name: resize_robot_observation_image(torch.tensor(rgb), shape)
               .permute(1, 2, 0).numpy() for name, rgb in frames.items()}
    chunk = backend.predict(Observation(images=resized, state=tuple(ARM_POSITIONS),
                                        instruction="pick up the object"))
    expected = np.array([a.joint_positions + (a.gripper_command,) for a in chunk.actions])
    np.testing.assert_allclose(published, expected, atol=1e-6)


# None: the remote node's default image_width x image_height (224x224), which the
# server resizes back to the checkpoint's 96x96.
@pytest.mark.parametrize("sent_size", [lc.IMAGE_SIZE, None])
def test_the_same_inputs_give_the_same_chunk_both_ways(act_checkpoint, act_server, sent_size):
    with Rig() as rig:
        local = as_matrix(in_process_chunk(rig, act_checkpoint))
    size = {} if sent_size is None else {"image_width": sent_size, "image_height": sent_size}
    with Rig() as rig:
        inputs = ArmInputs(rig)
        node = rig.add(RemotePolicyNode(**rig.node_kwargs(**inputs.parameters(
            remote_url=act_server.base_url, remote_timeout_sec=30.0,
            remote_fallback_on_failure=False, **size))))
        assert node.lifecycle_state == "active", node.configure_problem
        inputs.start()
        remote = as_matrix(inputs.first_chunk())
    # The remote node sends each frame as JPEG: a solid colour comes through it (and
    # through both resizes) whole here (measured: equal); the bound leaves room for
    # another libjpeg's rounding.
    np.testing.assert_allclose(remote, local, atol=1e-4)


def test_a_robot_that_does_not_fit_the_checkpoint_fails_configure(rig, act_checkpoint):
    inputs = ArmInputs(rig)
    backend = LeRobotBackend(model=str(act_checkpoint), action_layout=lc.ARM_LAYOUT, device="cpu")
    node = rig.add(PolicyNode(backend=backend, **rig.node_kwargs(
        backend="lerobot", **inputs.parameters(state_joints=ARM_JOINTS[:5]))))
    assert node.lifecycle_state == "unconfigured"
    assert node.configure_problem == (
        "the policy does not fit this robot: state has 5 values, but the policy reads 6 "
        "(state_joints has 5)")
