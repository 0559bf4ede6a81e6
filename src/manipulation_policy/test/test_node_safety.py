"""Stops, dry run and lifecycle of both policy nodes over real DDS (issue 18).

- the e-stop (std_msgs/Bool, reliable, transient local): holds only, no inference, an
  explicit false to release; a stop latched before the node starts holds too;
- dry run: every command on the preview topics, nothing on the command topics;
- the input watchdog: a camera that stops gives one hold, the plan is dropped, and
  commands come back with the camera;
- lifecycle through the node's real lifecycle services (as `ros2 lifecycle` calls
  them): configure, activate, deactivate (one hold, then nothing), cleanup (the
  model released), a failed configure (missing weights, no server) leaving the node
  unconfigured with its reason, and autostart retrying for a server that comes up.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from node_harness import Rig, sample_image, wait_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from server_test_backends import ChunkedBackend
from std_msgs.msg import Bool

from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import policy_output_to_action
from manipulation_policy.server.process import ServerProcess, free_port

LATCHED = QoSProfile(
    depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


class Recorder:
    """Messages of one type on one topic, in arrival order."""

    def __init__(self, rig: Rig, kind: type, topic: str) -> None:
        self._lock = threading.Lock()
        self._messages: list[Any] = []
        rig.node.create_subscription(kind, topic, self._on_message, 50)

    def _on_message(self, msg: Any) -> None:
        with self._lock:
            self._messages.append(msg)

    def messages(self) -> list[Any]:
        with self._lock:
            return list(self._messages)


class ClosableStub(StubBackend):
    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def is_hold(msg: PolicyOutput) -> bool:
    return policy_output_to_action(msg).is_hold


def start_local(rig: Rig, backend_instance=None, **parameters) -> PolicyNode:
    values = {"backend": "stub", "inference_rate": 20.0, **parameters}
    return rig.add(PolicyNode(backend=backend_instance, **rig.node_kwargs(**values)))


def estop_publisher(rig: Rig):
    return rig.node.create_publisher(Bool, rig.topics["estop_topic"], LATCHED)


def streaming(rig: Rig) -> None:
    rig.stream_joint_states()
    rig.stream_camera(sample_image())


# ---------------------------------------------------------------- e-stop


def test_estop_publishes_a_hold_then_only_holds_and_needs_an_explicit_false(rig):
    node = start_local(rig)
    streaming(rig)
    assert wait_until(lambda: any(not is_hold(m) for m in rig.outputs()))
    estop = estop_publisher(rig)

    estop.publish(Bool(data=True))
    assert wait_until(lambda: node.counters["stop_holds"] == 1)
    assert wait_until(lambda: rig.outputs() and is_hold(rig.outputs()[-1]))
    rig.clear_outputs()
    inferences = node.counters["inferences"]
    # The camera keeps streaming: a second of frames starts no inference, publishes nothing.
    assert not wait_until(lambda: node.counters["inferences"] > inferences + 1, 1.0)
    assert [m for m in rig.outputs() if not is_hold(m)] == []

    estop.publish(Bool(data=True))  # again: still stopped, no second stop hold
    assert not wait_until(lambda: node.counters["stop_holds"] > 1, 0.5)
    estop.publish(Bool(data=False))
    assert wait_until(lambda: any(not is_hold(m) for m in rig.outputs()))


def test_a_stop_latched_before_the_node_started_holds_it(rig):
    estop = estop_publisher(rig)
    estop.publish(Bool(data=True))
    streaming(rig)
    node = start_local(rig)
    assert wait_until(lambda: node.hold_reason() == "emergency stop engaged")
    assert not wait_until(lambda: node.counters["inferences"] > 0, 1.5)
    assert [m for m in rig.outputs() if not is_hold(m)] == []

    estop.publish(Bool(data=False))
    assert wait_until(lambda: any(not is_hold(m) for m in rig.outputs()))


def test_estop_drops_the_rest_of_a_chunk_on_both_paths(rig):
    node = start_local(rig, ChunkedBackend(), instruction="chunk 200",
                       refill_horizon_sec=0.0, inference_rate=2.0)
    streaming(rig)
    assert wait_until(lambda: node.counters["chunks_accepted"] >= 1)
    estop_publisher(rig).publish(Bool(data=True))
    assert wait_until(lambda: node.counters["stop_holds"] == 1)
    assert wait_until(lambda: is_hold(rig.outputs()[-1]))
    published = node.counters["published"]
    # 200 steps at 0.1 s were planned; none of them goes out after the stop.
    assert not wait_until(lambda: node.counters["published"] > published, 1.0)
    assert node.chunk_executor.remaining_sec() == 0.0


# ---------------------------------------------------------------- dry run


def test_dry_run_sends_everything_to_the_preview_topics_and_nothing_to_the_robot(rig):
    preview = Recorder(rig, PolicyOutput, rig.topics["preview_topic"])
    chunk_preview = Recorder(rig, PolicyActionChunk, rig.topics["chunk_preview_topic"])
    chunk_topic = "/dry_run_test/policy_chunk"
    chunks = Recorder(rig, PolicyActionChunk, chunk_topic)
    node = start_local(rig, ChunkedBackend(), instruction="chunk 3", dry_run=True,
                       chunk_topic=chunk_topic)
    streaming(rig)
    assert wait_until(lambda: len(preview.messages()) >= 6 and chunk_preview.messages())
    assert node.counters["inferences"] >= 2
    assert rig.outputs() == [] and chunks.messages() == []
    assert {m.step_index for m in preview.messages()} >= {0, 1, 2}

    [result] = rig.set_parameters("policy_node", dry_run=False)
    assert result.successful
    assert wait_until(lambda: len(rig.outputs()) >= 3 and chunks.messages())
    previewed = len(preview.messages())
    assert not wait_until(lambda: len(preview.messages()) > previewed + 1, 0.5)


# ---------------------------------------------------------------- input watchdog


def test_a_camera_that_stops_gives_one_hold_a_report_and_no_more_steps(rig):
    diagnostics = Recorder(rig, DiagnosticArray, "/diagnostics")
    node = start_local(rig, ChunkedBackend(), instruction="chunk 100", input_timeout_sec=0.5,
                       refill_horizon_sec=0.0, inference_rate=2.0)
    rig.stream_joint_states()
    camera = rig.stream_camera(sample_image())
    assert wait_until(lambda: node.counters["chunks_accepted"] >= 1)
    camera.cancel()
    assert wait_until(lambda: node.counters["stop_holds"] == 1, 5.0)
    # The counter moves when the hold is published; DDS delivers it a moment later.
    assert wait_until(lambda: any(is_hold(m) for m in rig.outputs()), 5.0)
    outputs = rig.outputs()
    first_hold = next(i for i, m in enumerate(outputs) if is_hold(m))
    assert all(is_hold(m) for m in outputs[first_hold:])
    assert node.hold_reason().startswith("no camera frame for 0.5")
    published = node.counters["published"]
    assert not wait_until(lambda: node.counters["published"] > published, 1.0)

    def safety_reports() -> list:
        return [
            status for array in diagnostics.messages() for status in array.status
            if status.name.endswith("policy_node: safety")
            and status.message.startswith("holding: no camera frame")
        ]

    assert wait_until(safety_reports, 5.0)

    rig.stream_camera(sample_image())
    assert wait_until(lambda: node.hold_reason() is None)
    assert wait_until(lambda: node.counters["published"] > published + 2)


# ---------------------------------------------------------------- lifecycle


class Lifecycle:
    """The node's lifecycle services, as `ros2 lifecycle get/set` call them."""

    def __init__(self, rig: Rig, node_name: str) -> None:
        base = f"{rig.namespace}/{node_name}"
        self._rig = rig
        self._get = rig.node.create_client(GetState, f"{base}/get_state")
        self._change = rig.node.create_client(ChangeState, f"{base}/change_state")
        assert self._get.wait_for_service(timeout_sec=30.0)
        assert self._change.wait_for_service(timeout_sec=30.0)

    def state(self) -> str:
        future = self._get.call_async(GetState.Request())
        assert wait_until(future.done)
        return future.result().current_state.label

    def change(self, transition_id: int) -> bool:
        future = self._change.call_async(
            ChangeState.Request(transition=Transition(id=transition_id))
        )
        assert wait_until(future.done, 60.0)
        return future.result().success


def test_lifecycle_transitions_start_and_stop_commands_and_release_the_model(rig):
    backend = ClosableStub()
    node = start_local(rig, backend, autostart=False)
    lifecycle = Lifecycle(rig, "policy_node")
    streaming(rig)
    assert lifecycle.state() == "unconfigured"
    assert not wait_until(lambda: rig.outputs(), 1.0)  # nothing before activation

    assert lifecycle.change(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.state() == "inactive"
    assert not wait_until(lambda: rig.outputs(), 1.0)
    assert node.counters["inferences"] == 0

    assert lifecycle.change(Transition.TRANSITION_ACTIVATE)
    assert lifecycle.state() == "active"
    assert wait_until(lambda: any(not is_hold(m) for m in rig.outputs()))

    assert lifecycle.change(Transition.TRANSITION_DEACTIVATE)
    assert lifecycle.state() == "inactive"
    assert wait_until(lambda: is_hold(rig.outputs()[-1]))  # the last word is a hold
    count = len(rig.outputs())
    assert not wait_until(lambda: len(rig.outputs()) > count, 1.0)

    assert lifecycle.change(Transition.TRANSITION_CLEANUP)
    assert lifecycle.state() == "unconfigured"
    assert backend.closed.is_set()
    assert node.action_source is None

    # Configured again: a working node again.
    assert lifecycle.change(Transition.TRANSITION_CONFIGURE)
    assert lifecycle.change(Transition.TRANSITION_ACTIVATE)
    rig.clear_outputs()
    assert wait_until(lambda: any(not is_hold(m) for m in rig.outputs()))
    assert lifecycle.change(Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert lifecycle.state() == "finalized"


def test_missing_weights_leave_the_node_unconfigured_with_one_reason(rig):
    node = start_local(rig, None, backend="server_test_backends:UnloadableBackend")
    lifecycle = Lifecycle(rig, "policy_node")
    assert lifecycle.state() == "unconfigured"
    assert node.configure_problem == "OSError: no weights at /models/missing"
    streaming(rig)
    assert not wait_until(lambda: rig.outputs(), 1.0)
    assert not lifecycle.change(Transition.TRANSITION_CONFIGURE)  # still missing
    assert lifecycle.state() == "unconfigured"


def test_remote_node_configures_only_once_its_server_answers(rig):
    port = free_port()
    values = {"remote_url": f"http://127.0.0.1:{port}", "inference_rate": 10.0}
    node = rig.add(RemotePolicyNode(**rig.node_kwargs(**values)))
    assert node.lifecycle_state == "unconfigured"
    assert "unreachable" in node.configure_problem and str(port) in node.configure_problem
    streaming(rig)
    assert not wait_until(lambda: rig.outputs(), 1.0)
    with ServerProcess("--backend", "stub", port=port):
        # autostart asks again every AUTOSTART_RETRY_SEC, then activates.
        assert wait_until(lambda: node.lifecycle_state == "active", 15.0)
        assert wait_until(lambda: any(not is_hold(m) for m in rig.outputs()))
    assert State.PRIMARY_STATE_ACTIVE == 3  # the id `ros2 lifecycle get` prints: active [3]
