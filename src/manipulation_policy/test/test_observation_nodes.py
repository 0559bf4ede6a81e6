"""Both nodes read upstream's aggregated observation over real DDS, as upstream's node does.

The rig plays upstream's perception node (manipulation_msgs/Observation on
observation_topic: a bgr8 image, joint states, base_to_ee) beside the raw
camera, joint-state and end-effector-pose topics, each with different
content, so every output tells which source it came from:

- a fresh aggregated observation gives the image, the joint states and, from
  base_to_ee, the current end-effector pose (the delta becomes absolute
  around it);
- a stale one (or none, or use_observation off) leaves the raw topics;
- a part it lacks comes from the raw topic.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped
from node_harness import (
    JOINT_NAMES,
    JOINT_POSITIONS,
    Rig,
    ScriptedPolicyServer,
    assert_actions_close,
    jpeg_roundtrip,
    sample_image,
    wait_until,
)

from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.backends import predictor
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import (
    JointStateData,
    Observation,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import policy_output_to_action, pose_to_msg

RAW_IMAGE = sample_image(seed=0)
AGG_IMAGE = 255 - sample_image(seed=1)  # another mean colour: another stub answer
RAW_JOINTS = JointStateData(name=JOINT_NAMES, position=JOINT_POSITIONS)
AGG_JOINTS = JointStateData(name=("joint1", "joint2"), position=(0.5, -0.25))
RAW_EEF = Pose(Vector3(0.1, 0.2, 0.3), Quaternion(0.0, 0.0, 0.0, 1.0))
AGG_EEF = Pose(Vector3(0.35, -0.05, 0.22), Quaternion(0.0, 0.0, 0.6, 0.8))


class RecordingStub(StubBackend):
    """The stub, remembering every observation it was asked about."""

    def __init__(self) -> None:
        self.observations: list[Observation] = []
        self.lock = threading.Lock()

    def predict(self, observation: Observation):
        with self.lock:
            self.observations.append(observation)
        return super().predict(observation)

    def last(self) -> Observation:
        with self.lock:
            return self.observations[-1]

    def count(self) -> int:
        with self.lock:
            return len(self.observations)


def stub_answer(image, joints: JointStateData, eef: Pose):
    observation = Observation(joint_state=joints, image=image, reference_frame="base_link",
                              instruction="pick up the object", eef_pose=eef)  # fmt: skip
    (action,) = predictor(StubBackend())(observation).actions  # a chunk of one
    return action


def stream_raw_inputs(rig: Rig) -> None:
    """Camera, joint states and the current end-effector pose on the raw topics."""

    def publish_pose():
        msg = PoseStamped()
        msg.header.stamp = rig.now()
        msg.header.frame_id = "base_link"
        msg.pose = pose_to_msg(RAW_EEF)
        rig.eef_pub.publish(msg)

    rig.stream_camera(RAW_IMAGE)
    rig.stream_joint_states()
    rig.stream(50.0, publish_pose)


def stream_observations(rig: Rig, age_sec: float = 0.0, rate_hz: float = 20.0, **parts):
    """Upstream's perception node: aggregated observations stamped ``age_sec`` ago."""
    parts = {"rgb": AGG_IMAGE, "joints": AGG_JOINTS, "base_to_ee": AGG_EEF, **parts}
    return rig.stream(rate_hz, lambda: rig.publish_observation(rig.stamp_ago(age_sec), **parts))


def used_aggregated(observation: Observation) -> bool:
    return observation.joint_state == AGG_JOINTS


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


def start_policy_node(rig: Rig, backend: StubBackend, **parameters) -> PolicyNode:
    values = {"backend": "stub", "inference_rate": 20.0, **parameters}
    return rig.add(PolicyNode(backend=backend, **rig.node_kwargs(**values)))


def test_policy_node_uses_a_fresh_aggregated_observation_and_falls_back_when_it_stops(rig):
    backend = RecordingStub()
    node = start_policy_node(rig, backend)
    stream_raw_inputs(rig)
    perception = stream_observations(rig)

    # Its image, joint states and base_to_ee as the current pose, nothing of the raw topics.
    assert wait_until(lambda: backend.count() >= 3 and used_aggregated(backend.last()))
    seen = backend.last()
    assert np.array_equal(seen.image, AGG_IMAGE)  # bgr8 in the message, RGB to the policy
    assert seen.eef_pose == AGG_EEF
    assert node.counters["from_observation"] >= 1 and node.counters["observations"] >= 1
    absolute = [m for m in rig.outputs() if m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE]
    assert absolute
    assert_actions_close(policy_output_to_action(absolute[-1]),
                         stub_answer(AGG_IMAGE, AGG_JOINTS, AGG_EEF))  # fmt: skip

    # The perception node stops: once its last observation is stale, the raw topics.
    perception.cancel()
    count = backend.count()
    assert wait_until(lambda: backend.count() > count and not used_aggregated(backend.last()))
    seen = backend.last()
    assert np.array_equal(seen.image, RAW_IMAGE)
    assert seen.joint_state == RAW_JOINTS and seen.eef_pose == RAW_EEF
    rig.clear_outputs()
    assert wait_until(lambda: rig.outputs())
    assert_actions_close(policy_output_to_action(rig.outputs()[-1]),
                         stub_answer(RAW_IMAGE, RAW_JOINTS, RAW_EEF))  # fmt: skip


def test_stale_aggregated_observations_leave_the_raw_topics(rig):
    backend = RecordingStub()
    node = start_policy_node(rig, backend, observation_timeout_sec=0.3)
    stream_raw_inputs(rig)
    stream_observations(rig, age_sec=1.0)  # fresh enough for a camera, not for this timeout
    assert wait_until(lambda: node.counters["observations"] >= 10 and backend.count() >= 10)
    assert not any(used_aggregated(o) for o in backend.observations)
    assert node.counters["from_observation"] == 0
    # Longer limits, set live, make the same observations fresh (both apply: its image
    # must be young enough for any camera frame too).
    [result] = rig.set_parameters("policy_node", observation_timeout_sec=2)
    assert result.successful, result.reason
    assert not wait_until(lambda: used_aggregated(backend.last()), timeout=0.5)
    [result] = rig.set_parameters("policy_node", max_observation_age_sec=2.0)
    assert result.successful, result.reason
    assert wait_until(lambda: used_aggregated(backend.last()))


def test_use_observation_off_ignores_it_and_on_again_uses_it(rig):
    backend = RecordingStub()
    node = start_policy_node(rig, backend, use_observation=False)
    stream_raw_inputs(rig)
    stream_observations(rig)
    assert wait_until(lambda: backend.count() >= 10)
    assert not any(used_aggregated(o) for o in backend.observations)
    assert node.counters["observations"] == 0  # not even subscribed
    [result] = rig.set_parameters("policy_node", use_observation=True)
    assert result.successful, result.reason
    assert wait_until(lambda: used_aggregated(backend.last()))
    assert backend.last().eef_pose == AGG_EEF


def test_parts_the_aggregated_observation_lacks_come_from_the_raw_topics(rig):
    backend = RecordingStub()
    start_policy_node(rig, backend)
    stream_raw_inputs(rig)
    stream_observations(rig, rgb=None, base_to_ee=None)  # joint states only
    assert wait_until(lambda: backend.count() >= 3 and used_aggregated(backend.last()))
    seen = backend.last()
    assert np.array_equal(seen.image, RAW_IMAGE) and seen.eef_pose == RAW_EEF


def test_base_to_ee_in_another_frame_than_reference_frame_is_not_the_current_pose(rig):
    backend = RecordingStub()
    start_policy_node(rig, backend, reference_frame="piper_base_link")
    rig.stream_camera(RAW_IMAGE)
    stream_observations(rig, base_frame="base_link")
    assert wait_until(lambda: backend.count() >= 3 and used_aggregated(backend.last()))
    # A delta composed in the wrong frame would be a wrong target: the delta goes as it is.
    assert backend.last().eef_pose is None
    assert wait_until(lambda: rig.outputs())
    assert rig.outputs()[-1].eef_target_mode == PolicyOutput.EEF_TARGET_DELTA


def test_remote_node_sends_the_aggregated_observation_and_falls_back_when_stale(rig):
    with ScriptedPolicyServer() as server:
        node = rig.add(RemotePolicyNode(**rig.node_kwargs(remote_url=server.url,
                                                          inference_rate=20.0)))  # fmt: skip
        stream_raw_inputs(rig)
        perception = stream_observations(rig)
        assert wait_until(lambda: server.observations()
                          and used_aggregated(server.observations()[-1]))  # fmt: skip
        sent = server.observations()[-1]
        assert sent.eef_pose == AGG_EEF
        want = jpeg_roundtrip(AGG_IMAGE, 224, 224)
        assert np.abs(sent.image.astype(int) - want.astype(int)).max() <= 2
        assert node.counters["from_observation"] >= 1

        perception.cancel()
        stream_observations(rig, age_sec=2.0)  # still arriving, but stale
        count = len(server.observations())
        assert wait_until(lambda: len(server.observations()) > count
                          and not used_aggregated(server.observations()[-1]))  # fmt: skip
        sent = server.observations()[-1]
        assert sent.joint_state.position == JOINT_POSITIONS and sent.eef_pose == RAW_EEF
        want = jpeg_roundtrip(RAW_IMAGE, 224, 224)
        assert np.abs(sent.image.astype(int) - want.astype(int)).max() <= 2
