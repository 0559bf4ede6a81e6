"""The in-process policy node over real DDS: outputs, encodings, staleness, skipping, parameters."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped
from node_harness import (
    JOINT_NAMES,
    JOINT_POSITIONS,
    Rig,
    assert_actions_close,
    expected_stub_action,
    sample_image,
    wait_until,
)
from sensor_msgs.msg import CompressedImage
from server_test_backends import FIXED_DELTA, ChunkedBackend, FixedDeltaBackend, chunk_step
from std_msgs.msg import String

from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.imaging import decode_image_bytes, encode_jpeg
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    Observation,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.core.pose_math import apply_delta
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.ros_conversion import (
    policy_output_to_action,
    pose_to_msg,
    rgb_to_image,
    stamp_to_nanoseconds,
)


class RecordingBackend(StubBackend):
    """The stub, remembering every observation; optionally slow."""

    def __init__(self, delay_sec: float = 0.0):
        self.delay_sec = delay_sec
        self.observations: list[Observation] = []
        self.lock = threading.Lock()

    def predict(self, observation: Observation):
        with self.lock:
            self.observations.append(observation)
        if self.delay_sec:
            time.sleep(self.delay_sec)
        return super().predict(observation)

    def count(self) -> int:
        with self.lock:
            return len(self.observations)


def stream_current_pose(rig: Rig, pose: Pose) -> None:
    """The arm's current end-effector pose in base_link, published at 50 Hz."""

    def publish_pose():
        msg = PoseStamped()
        msg.header.stamp = rig.now()
        msg.header.frame_id = "base_link"
        msg.pose = pose_to_msg(pose)
        rig.eef_pub.publish(msg)

    rig.stream(50.0, publish_pose)


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


def start_node(rig: Rig, backend_instance=None, **parameters) -> PolicyNode:
    """``parameters`` override the node's; ``backend_instance`` replaces the backend parameter."""
    values = {"backend": "stub", "inference_rate": 20.0, **parameters}
    return rig.add(PolicyNode(backend=backend_instance, **rig.node_kwargs(**values)))


def test_stub_backend_output_is_the_backends_answer_stamped_with_the_image(rig):
    node = start_node(rig, reference_frame="arm_base", instruction="stack the blocks")
    image = sample_image()
    published = set()
    rig.stream_joint_states()
    rig.stream(20.0, lambda: published.add(stamp_to_nanoseconds(rig.publish_image(image))))

    outputs = rig.wait_for_outputs(3)
    assert len(outputs) >= 3, node.counters
    want = expected_stub_action(image, "stack the blocks", "arm_base")
    for msg in outputs[-2:]:  # after the first, joint states have certainly arrived
        assert msg.header.frame_id == "arm_base"
        assert stamp_to_nanoseconds(msg.header.stamp) in published
        # DDS carries float64 exactly: the in-process answer is the backend's, bit for bit.
        assert_actions_close(policy_output_to_action(msg), want, tol=0.0)
        assert msg.eef_target_mode == PolicyOutput.EEF_TARGET_DELTA


def test_current_eef_pose_turns_the_delta_into_an_absolute_target(rig):
    start_node(rig)
    image = sample_image()
    current = Pose(Vector3(0.4, -0.1, 0.3), Quaternion(0.0, 0.0, 0.0, 1.0))
    stream_current_pose(rig, current)
    rig.stream_joint_states()
    rig.stream_camera(image)
    assert wait_until(
        lambda: any(m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE for m in rig.outputs())
    )
    msg = next(m for m in rig.outputs() if m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE)
    got = policy_output_to_action(msg)
    assert got.eef_target_mode is EefTargetMode.ABSOLUTE
    assert_actions_close(got, expected_stub_action(image, eef_pose=current))
    # The stub's absolute target is its delta composed with the pose that was published.
    delta = expected_stub_action(image).eef_target
    assert got.eef_target == apply_delta(current, delta)


def test_a_backend_that_never_composes_gets_its_delta_composed_once_by_the_node(rig):
    start_node(rig, backend_instance=FixedDeltaBackend())
    current = Pose(Vector3(0.4, -0.1, 0.3), Quaternion(0.0, 0.0, 0.0, 1.0))
    stream_current_pose(rig, current)
    rig.stream_joint_states()
    rig.stream_camera(sample_image())
    assert wait_until(
        lambda: any(m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE for m in rig.outputs())
    )
    msg = next(m for m in rig.outputs() if m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE)
    assert policy_output_to_action(msg).eef_target == apply_delta(current, FIXED_DELTA.eef_target)


def test_of_a_chunk_the_node_publishes_the_first_action_composed_with_the_current_pose(rig):
    # Until the executor is wired in: each answer's first action, as a single step's.
    node = start_node(rig, backend_instance=ChunkedBackend(), instruction="chunk 5")
    current = Pose(Vector3(0.4, -0.1, 0.3), Quaternion(0.0, 0.0, 0.0, 1.0))
    stream_current_pose(rig, current)
    rig.stream_joint_states()
    rig.stream_camera(sample_image())
    assert wait_until(
        lambda: any(m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE for m in rig.outputs())
    ), node.counters
    msg = next(m for m in rig.outputs() if m.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE)
    first = chunk_step(0, "base_link", len(JOINT_NAMES))
    action = policy_output_to_action(msg)
    assert action.eef_target == apply_delta(current, first.eef_target)
    assert action.joint_deltas == first.joint_deltas
    assert action.gripper_command == first.gripper_command


def test_bgr8_with_row_padding_gives_the_same_answer_as_rgb8(rig):
    start_node(rig)
    image = sample_image()
    height, width = image.shape[:2]
    padded = np.zeros((height, width * 3 + 7), dtype=np.uint8)  # 7 bytes of row padding
    padded[:, : width * 3] = image[:, :, ::-1].reshape(height, width * 3)

    def publish_bgr():
        msg = rgb_to_image(image, rig.now())
        msg.encoding, msg.step = "bgr8", width * 3 + 7
        msg.data = padded.tobytes()
        rig.image_pub.publish(msg)

    rig.stream_joint_states()
    rig.stream(20.0, publish_bgr)
    outputs = rig.wait_for_outputs(3)
    assert len(outputs) >= 3
    assert_actions_close(policy_output_to_action(outputs[-1]), expected_stub_action(image))


def test_unsupported_encoding_is_logged_once_and_skipped(rig, capfd):
    node = start_node(rig)
    image = sample_image()

    def publish_yuv():
        msg = rgb_to_image(image, rig.now())
        msg.encoding = "yuv422"
        rig.image_pub.publish(msg)

    timer = rig.stream(20.0, publish_yuv)
    assert wait_until(lambda: node.counters["unsupported_images"] >= 6)
    timer.cancel()
    assert not wait_until(rig.outputs, timeout=0.3)  # a few ticks that publish nothing
    log = capfd.readouterr()
    assert (log.out + log.err).count("unsupported image encoding 'yuv422'") == 1

    # The node is still alive and uses the next supported frame.
    rig.stream_camera(image)
    assert rig.wait_for_outputs(1)


def test_stale_images_are_not_used(rig):
    node = start_node(rig, max_observation_age_sec=0.5)
    image = sample_image()
    timer = rig.stream(20.0, lambda: rig.publish_image(image, rig.stamp_ago(2.0)))
    assert wait_until(lambda: node.counters["stale_skipped"] >= 5)
    assert rig.outputs() == []
    assert node.counters["inferences"] == 0
    timer.cancel()

    rig.stream_camera(image)  # fresh stamps: used again
    assert rig.wait_for_outputs(1)


def test_slow_inference_skips_frames_instead_of_queueing_them(rig):
    backend = RecordingBackend(delay_sec=0.3)
    node = start_node(rig, backend_instance=backend, inference_rate=30.0)
    image = sample_image()
    published: list[int] = []
    rig.stream_joint_states(100.0)
    camera = rig.stream(
        30.0, lambda: published.append(stamp_to_nanoseconds(rig.publish_image(image)))
    )

    assert wait_until(lambda: backend.count() >= 4)
    joint_states_during = node.counters["joint_states"]
    camera.cancel()
    calls_at_stop = backend.count()
    # A queue would keep feeding the backend now; skipping does not: at most the one
    # already running finishes.
    assert not wait_until(lambda: backend.count() > calls_at_stop + 1, timeout=1.0)
    assert node.counters["busy_skipped"] > 0
    # The executor thread kept receiving joint states while the backend slept.
    assert joint_states_during > 4 * 0.3 * 100 * 0.5

    # The backend's answers (not the input watchdog's hold once the camera stopped).
    answers = [m for m in rig.outputs() if not policy_output_to_action(m).is_hold]
    stamps = [stamp_to_nanoseconds(m.header.stamp) for m in answers]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    positions = [published.index(s) for s in stamps]
    # While the camera ran, the frames that came in during an inference were skipped, not
    # processed later (the last pair may be the camera's final frame, rightly the newest).
    gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)][:-1]
    assert gaps and all(gap > 1 for gap in gaps), positions


def test_parameters_change_live_through_the_parameter_service(rig):
    backend = RecordingBackend()
    node = start_node(rig, backend_instance=backend)
    image = sample_image()
    rig.stream_joint_states()
    rig.stream_camera(image)
    assert wait_until(lambda: backend.count() >= 1)

    [result] = rig.set_parameters("policy_node", instruction="open the drawer")
    assert result.successful, result.reason
    assert wait_until(lambda: backend.observations[-1].instruction == "open the drawer")

    rig.instruction_pub.publish(String(data="close the drawer"))
    assert wait_until(lambda: backend.observations[-1].instruction == "close the drawer")
    assert node.get_parameter("instruction").value == "close the drawer"

    [result] = rig.set_parameters("policy_node", inference_rate=2)  # an int, as ros2 param set
    assert result.successful, result.reason
    assert node._timer.timer_period_ns == 500_000_000
    assert node.parameter_values()["inference_rate"] == 2.0

    refused = {
        "inference_rate": 0.0,
        "max_observation_age_sec": -1.0,
        "instruction": "   ",
        "camera_topic": "/elsewhere",  # read at start only
    }
    for name, value in refused.items():
        [result] = rig.set_parameters("policy_node", **{name: value})
        assert not result.successful, name
        assert name in result.reason or "read-only" in result.reason, result.reason
    [result] = rig.set_parameters("policy_node", inference_rate="fast")
    assert not result.successful and "inference_rate expected float" in result.reason
    assert node.get_parameter("inference_rate").value == 2
    assert node._timer.timer_period_ns == 500_000_000


def test_joint_state_reaches_the_backend(rig):
    backend = RecordingBackend()
    start_node(rig, backend_instance=backend)
    rig.stream_joint_states()
    rig.stream_camera(sample_image())
    assert wait_until(
        lambda: backend.count() and backend.observations[-1].joint_state.name == JOINT_NAMES
    )
    assert backend.observations[-1].joint_state.position == JOINT_POSITIONS


def test_compressed_transport(rig):
    start_node(rig, image_transport="compressed")
    image = sample_image()
    jpeg = encode_jpeg(image, 90)

    def publish_jpeg():
        msg = CompressedImage(format="rgb8; jpeg compressed bgr8")
        msg.header.stamp = rig.now()
        msg.data = jpeg
        rig.compressed_pub.publish(msg)

    rig.stream_joint_states()
    rig.stream(20.0, publish_jpeg)
    outputs = rig.wait_for_outputs(3)
    assert len(outputs) >= 3
    decoded = decode_image_bytes(jpeg, "JPEG")  # what the node sees of the JPEG
    assert_actions_close(policy_output_to_action(outputs[-1]), expected_stub_action(decoded))


def test_tiny_openvla_model_in_process(rig, tiny_openvla_dir):
    from manipulation_policy.backends.openvla import OpenVLABackend

    image = sample_image()
    node = start_node(
        rig, backend="openvla", model=str(tiny_openvla_dir), device="cpu",
        instruction="pick up the red cup", inference_rate=10.0,
    )
    rig.stream_joint_states()
    rig.stream_camera(image)
    outputs = rig.wait_for_outputs(2, timeout=30.0)
    assert len(outputs) >= 2, node.counters
    assert node.backend.describe()["backend"] == "openvla"

    # The same checkpoint loaded here, on the same observation: same answer (greedy, CPU).
    reference = OpenVLABackend(model=str(tiny_openvla_dir), device="cpu")
    want = reference.predict(
        Observation(
            joint_state=JointStateData(name=JOINT_NAMES, position=JOINT_POSITIONS),
            image=image,
            instruction="pick up the red cup",
        )
    )
    got = policy_output_to_action(outputs[-1])
    assert want.eef_target is not None and got.eef_target is not None
    assert_actions_close(got, want, tol=1e-9)


def test_action_conversion_parameters_reach_the_openvla_backend(rig, tiny_openvla_dir):
    """The server's action options are node parameters too: a scale and a step cap set
    on the node shape its answer exactly as the same options given to the backend."""
    from manipulation_policy.backends.openvla import OpenVLABackend

    options = {"position_scale": 40.0, "max_position_step": 0.002, "max_rotation_step": 0.01}
    image = sample_image()
    node = start_node(
        rig, backend="openvla", model=str(tiny_openvla_dir), device="cpu",
        instruction="pick up the red cup", inference_rate=10.0, **options,
    )
    rig.stream_joint_states()
    rig.stream_camera(image)
    outputs = rig.wait_for_outputs(1, timeout=30.0)
    assert outputs, node.counters
    got = policy_output_to_action(outputs[-1])
    position = got.eef_target.position
    length = float(np.linalg.norm([position.x, position.y, position.z]))
    assert length == pytest.approx(0.002, abs=1e-9)  # scaled past the cap, then capped

    reference = OpenVLABackend(model=str(tiny_openvla_dir), device="cpu", **options)
    want = reference.predict(
        Observation(
            joint_state=JointStateData(name=JOINT_NAMES, position=JOINT_POSITIONS),
            image=image,
            instruction="pick up the red cup",
        )
    )
    assert_actions_close(got, want, tol=1e-9)
    # Read at start: the node refuses a change instead of ignoring it.
    [result] = rig.set_parameters("policy_node", max_position_step=1.0)
    assert not result.successful


def test_a_frame_is_used_on_arrival_and_the_rate_still_caps_outputs(rig):
    # End to end; the rate's details are in test_scheduling. Period of 20 s: waiting for
    # the timer would leave the first frame unanswered for seconds; dispatching on arrival
    # answers it at once, and the cap holds back the rest.
    node = start_node(rig, inference_rate=0.05)
    image = sample_image()
    rig.stream_joint_states()
    # The node is up and its camera subscription matched: the first frame is not lost.
    assert wait_until(lambda: rig.image_pub.get_subscription_count() >= 1)
    assert wait_until(lambda: node.counters["joint_states"] >= 1)
    rig.publish_image(image)
    assert rig.wait_for_outputs(1, timeout=3.0), node.counters
    camera = rig.stream(20.0, lambda: rig.publish_image(image))
    assert wait_until(lambda: node.counters["images"] >= 20)
    camera.cancel()
    assert len(rig.outputs()) == 1
    assert node.counters["inferences"] == 1
