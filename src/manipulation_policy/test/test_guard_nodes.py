"""The safety guard in both nodes over real DDS: one misbehaving model, the same commands.

ChunkedBackend's ``reckless`` chunk (server_test_backends.reckless_chunk: leaps,
a target outside the workspace, a base hint too fast, then an unsure step) runs
in the in-process node, and behind a real policy server process for the remote
node. Both publish the same clamped steps and the same hold for the same reason,
each exactly what the guard alone makes of the chunk; the chunk message shows no
value the guard would stop; /diagnostics reports the refusal; a live parameter
change lets the unsure step through.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from node_harness import (
    JOINT_NAMES,
    JOINT_POSITIONS,
    Rig,
    assert_actions_close,
    sample_image,
    wait_until,
)
from server_test_backends import (
    JOINT_LEAP_LIMITS,
    RECKLESS_LIMITS,
    RECKLESS_PERIOD_SEC,
    ChunkedBackend,
    chunked_server,
    joint_leap_chunk,
    reckless_chunk,
)

from manipulation_msgs.msg import PolicyActionChunk
from manipulation_policy.core.policy_types import JointStateData
from manipulation_policy.nodes.guard_diagnostics import guard_status
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import (
    policy_output_to_action,
    stamp_to_nanoseconds,
)
from manipulation_policy.robot.safety_guard import GuardContext, GuardLimits, SafetyGuard

WAIT_SEC = 20.0
PERIOD_NS = round(RECKLESS_PERIOD_SEC * 1e9)
REFUSED_STEP = 3
REASON = "confidence 0.1 below min_confidence=0.3"
# PolicyOutput's gripper_command is a float32, and the gripper rate's time step comes
# from due times in seconds since the epoch (a double: ~2e-7 s apart).
FLOAT32_TOL = 1e-6


class Recorder:
    """The chunk topic and the node's safety guard status on /diagnostics."""

    def __init__(self, rig: Rig):
        self._lock = threading.Lock()
        self.chunks: list[PolicyActionChunk] = []
        self.statuses: list[DiagnosticStatus] = []
        self.topic = f"{rig.namespace}/policy_chunk"
        self._prefix = f"{rig.namespace}/"
        rig.node.create_subscription(PolicyActionChunk, self.topic, self._on_chunk, 50)
        rig.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)

    def _on_chunk(self, msg: PolicyActionChunk) -> None:
        with self._lock:
            self.chunks.append(msg)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(self._prefix) and status.name.endswith(": safety guard"):
                with self._lock:
                    self.statuses.append(status)

    def chunk_messages(self) -> list[PolicyActionChunk]:
        with self._lock:
            return list(self.chunks)

    def guard_statuses(self) -> list[DiagnosticStatus]:
        with self._lock:
            return list(self.statuses)


@pytest.fixture(scope="module")
def chunk_server():
    with chunked_server() as process:
        yield process.base_url
    assert "Traceback" not in process.log()


def node_values(recorder: Recorder, **values):
    return {
        "chunk_topic": recorder.topic,
        "instruction": "reckless",
        "inference_rate": 20.0,
        "refill_horizon_sec": 0.0,  # each chunk runs out before the next is asked for
        **RECKLESS_LIMITS,
        **values,
    }


def in_process_node(rig: Rig, recorder: Recorder, **values) -> PolicyNode:
    return rig.add(PolicyNode(
        backend=ChunkedBackend(), **rig.node_kwargs(**node_values(recorder, **values))
    ))


def remote_node(rig: Rig, recorder: Recorder, url: str, **values) -> RemotePolicyNode:
    return rig.add(RemotePolicyNode(
        **rig.node_kwargs(**node_values(recorder, remote_url=url, remote_timeout_sec=5.0,
                                        **values))
    ))


def expected_steps():
    """What the guard alone makes of the reckless chunk, step by step, to the refusal."""
    guard = SafetyGuard(replace(GuardLimits(), **RECKLESS_LIMITS))
    chunk = reckless_chunk("base_link", len(JOINT_NAMES))
    results = [guard.check(action, GuardContext(i * RECKLESS_PERIOD_SEC))
               for i, action in enumerate(chunk.actions[: REFUSED_STEP + 1])]
    assert results[-1].refusal == REASON and not any(r.refused for r in results[:-1])
    return [r.action for r in results]


def first_plan(rig: Rig, recorder: Recorder):
    """The commands of the first chunk, once its refused step went out, as
    (step, due offset, action)."""
    rig.stream_joint_states()
    rig.stream_camera(sample_image(), rate_hz=20.0)
    assert wait_until(lambda: recorder.chunk_messages(), WAIT_SEC)
    first = recorder.chunk_messages()[0].actions[0].request_id
    assert wait_until(
        lambda: any(m.request_id == first and m.step_index == REFUSED_STEP
                    for m in rig.outputs()), WAIT_SEC,
    )
    return first, [
        (m.step_index, stamp_to_nanoseconds(m.due) - stamp_to_nanoseconds(m.header.stamp),
         policy_output_to_action(m))
        for m in rig.outputs() if m.request_id == first
    ]


def test_the_same_reckless_model_gives_the_same_commands_and_holds_through_both_nodes(
    chunk_server,
):
    expected = expected_steps()
    plans = []
    for start in (
        lambda rig, recorder: in_process_node(rig, recorder),
        lambda rig, recorder: remote_node(rig, recorder, chunk_server),
    ):
        with Rig() as rig:
            recorder = Recorder(rig)
            node = start(rig, recorder)
            first, plan = first_plan(rig, recorder)
            plans.append(plan)
            # Each step is the guard's: clamped, then the hold for the unsure step, and
            # nothing of the dropped plan after it.
            assert [step for step, _, _ in plan] == list(range(REFUSED_STEP + 1))
            assert [offset for _, offset, _ in plan] == [
                i * PERIOD_NS for i in range(REFUSED_STEP + 1)]
            for (_, _, got), want in zip(plan, expected, strict=True):
                assert_actions_close(got, want, FLOAT32_TOL)
            assert plan[-1][2].is_hold
            # The chunk message shows no value the guard would stop.
            [message] = [c for c in recorder.chunk_messages()
                         if c.actions[0].request_id == first]
            shown = [policy_output_to_action(m) for m in message.actions]
            for got, want in zip(shown, expected, strict=False):
                assert_actions_close(got, want, FLOAT32_TOL)
            assert shown[REFUSED_STEP + 1].is_hold  # after the refusal, holds
            # Counted, and reported on /diagnostics with the reason.
            assert node.safety_guard.counts()["refused_confidence"] >= 1
            assert node.safety_guard.newest_refusal() == REASON
            name = f"{node.get_fully_qualified_name()}: safety guard"
            assert wait_until(lambda recorder=recorder, name=name: any(
                s.name == name and s.level == DiagnosticStatus.WARN and REASON in s.message
                for s in recorder.guard_statuses()), WAIT_SEC)
    local, remote = plans
    assert [p[:2] for p in local] == [p[:2] for p in remote]
    for (_, _, a), (_, _, b) in zip(local, remote, strict=True):
        assert_actions_close(a, b, FLOAT32_TOL)


def test_absolute_joint_targets_are_guarded_by_name_the_same_through_both_nodes(chunk_server):
    # What the guard alone makes of the chunk, from the joint states the rig streams:
    # the wrist steps 0.1 from 0.9 each step, the elbow 0.1 from -0.2 down to its minimum.
    guard = SafetyGuard(replace(GuardLimits(), **{
        key: tuple(value) for key, value in JOINT_LEAP_LIMITS.items()
        if key != "max_joint_delta"}, max_joint_delta=0.1))
    joints = JointStateData(JOINT_NAMES, JOINT_POSITIONS)
    chunk = joint_leap_chunk()
    expected = [guard.check(action, GuardContext(i * RECKLESS_PERIOD_SEC, joints, None, 0.0))
                .action for i, action in enumerate(chunk.actions)]
    assert [v for a in expected for v in a.joint_positions] == pytest.approx(
        [1.0, -0.3, 1.1, -0.35, 1.2, -0.35, 1.3, -0.35])
    last_step = len(chunk) - 1
    plans = []
    for start in (
        lambda rig, recorder: in_process_node(rig, recorder, instruction="leap",
                                              **JOINT_LEAP_LIMITS),
        lambda rig, recorder: remote_node(rig, recorder, chunk_server, instruction="leap",
                                          **JOINT_LEAP_LIMITS),
    ):
        with Rig() as rig:
            recorder = Recorder(rig)
            start(rig, recorder)
            rig.stream_joint_states()
            rig.stream_camera(sample_image(), rate_hz=20.0)
            assert wait_until(lambda recorder=recorder: recorder.chunk_messages(), WAIT_SEC)
            first = recorder.chunk_messages()[0].actions[0].request_id
            assert wait_until(lambda rig=rig, first=first: any(
                m.request_id == first and m.step_index == last_step for m in rig.outputs()),
                WAIT_SEC)
            plan = {m.step_index: policy_output_to_action(m)
                    for m in rig.outputs() if m.request_id == first}
            assert sorted(plan) == list(range(len(chunk)))
            for step, want in enumerate(expected):
                assert_actions_close(plan[step], want, FLOAT32_TOL)
            plans.append(plan)
    local, remote = plans
    for step in range(len(chunk)):
        assert_actions_close(local[step], remote[step], FLOAT32_TOL)


def test_guard_limits_are_live():
    with Rig() as rig:
        recorder = Recorder(rig)
        node = in_process_node(rig, recorder)
        first_plan(rig, recorder)
        [result] = rig.set_parameters("policy_node", min_confidence=0.05)
        assert result.successful, result.reason
        assert node.safety_guard.limits.min_confidence == 0.05
        # The unsure step now goes out, and the plan runs to its end.
        assert wait_until(lambda: any(
            m.step_index == REFUSED_STEP + 1 for m in rig.outputs()), WAIT_SEC)
        late = next(m for m in rig.outputs() if m.step_index == REFUSED_STEP + 1)
        assert not policy_output_to_action(late).is_hold
        [result] = rig.set_parameters("policy_node", workspace_min=[0.0, 0.0, 2.0])
        assert not result.successful
        assert result.reason == "workspace_min[2]=2 must be below workspace_max[2]=1.5"


def test_the_guard_status_warns_with_the_newest_reason_only_for_new_refusals():
    counts = {"refused_confidence": 2, "refused_non_finite": 1, "clamped_workspace": 7}
    status = guard_status("/robot1/policy_node", counts, REASON, reported_refusals=1)
    assert status.name == "/robot1/policy_node: safety guard"
    assert status.level == DiagnosticStatus.WARN
    assert status.message == f"2 action(s) refused, holds published: {REASON}"
    assert {kv.key: kv.value for kv in status.values} == {k: str(v) for k, v in counts.items()}
    quiet = guard_status("/robot1/policy_node", counts, REASON, reported_refusals=3)
    assert quiet.level == DiagnosticStatus.OK and quiet.message == "ok"
