"""Action chunks through both nodes over real DDS: the executor's timeline as published.

A chunk-predicting backend (server_test_backends.ChunkedBackend) in the
in-process node, and behind a real policy server process for the remote node.
Each step goes out once as PolicyOutput with header.stamp = the observation's
stamp and due = stamp + step_index * period exactly; each accepted chunk goes
out whole as PolicyActionChunk. Timing is checked loosely (counts, order and
stamps, never wall-clock instants): the test machine may be loaded.
"""

from __future__ import annotations

import threading
import time

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from node_harness import Rig, assert_actions_close, sample_image, wait_until
from server_test_backends import CHUNK_PERIOD_SEC, ChunkedBackend, chunk_steps, chunked_server

from manipulation_msgs.msg import PolicyActionChunk
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import PolicyAction
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import (
    policy_output_to_action,
    stamp_to_nanoseconds,
)
from manipulation_policy.robot.executor_settings import ChunkMerge

LENGTH = 5
PERIOD_NS = round(CHUNK_PERIOD_SEC * 1e9)
WAIT_SEC = 20.0


class SlowChunkedBackend(ChunkedBackend):
    """Answers ``chunk <n>`` after a pause: the timeline runs dry before the next chunk."""

    name = "slow-chunked"

    def predict(self, observation):
        time.sleep(0.15)
        return super().predict(observation)


class Recorder:
    """The chunk topic and /diagnostics, as a consumer sees them."""

    def __init__(self, rig: Rig):
        self._lock = threading.Lock()
        self.chunks: list[PolicyActionChunk] = []
        self.executor_statuses: list[dict] = []
        self.topic = f"{rig.namespace}/policy_chunk"
        rig.node.create_subscription(PolicyActionChunk, self.topic, self._on_chunk, 50)
        rig.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
        self._status_prefix = f"{rig.namespace}/"

    def _on_chunk(self, msg: PolicyActionChunk) -> None:
        with self._lock:
            self.chunks.append(msg)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(self._status_prefix) and status.name.endswith(
                ": action executor"
            ):
                with self._lock:
                    self.executor_statuses.append(
                        {**{kv.key: kv.value for kv in status.values}, "level": status.level}
                    )

    def chunk_messages(self) -> list[PolicyActionChunk]:
        with self._lock:
            return list(self.chunks)


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


@pytest.fixture(scope="module")
def chunk_server():
    with chunked_server() as process:
        yield process.base_url
    assert "Traceback" not in process.log()


def node_values(recorder: Recorder, **values):
    return {
        "chunk_topic": recorder.topic,
        "instruction": f"chunk {LENGTH}",
        "inference_rate": 20.0,
        "refill_horizon_sec": 0.2,
        # ChunkedBackend's gripper jumps by up to 0.4 where a new chunk takes over, at
        # once: the safety guard would rightly slow that (test_guard_nodes); these tests
        # are about the timeline, every step as its chunk says.
        "max_gripper_rate": 0.0,
        **values,
    }


def in_process_node(rig: Rig, recorder: Recorder, backend=None, **values) -> PolicyNode:
    return rig.add(PolicyNode(
        backend=backend or ChunkedBackend(), **rig.node_kwargs(**node_values(recorder, **values))
    ))


def remote_node(rig: Rig, recorder: Recorder, url: str, **values) -> RemotePolicyNode:
    return rig.add(RemotePolicyNode(
        **rig.node_kwargs(**node_values(recorder, remote_url=url, remote_timeout_sec=5.0,
                                        **values))
    ))


def steps_of(outputs):
    return [m for m in outputs if m.step_index < m.chunk_length]


def check_timeline(outputs, chunks, length=LENGTH):
    """Every command: its chunk's stamp, due exactly at stamp + i * period, its chunk's
    action at that step; each chunk's steps once each, in order; dues in order (a new
    chunk's latest due step, published at once, may be due a little before the step of
    the old one published last: within one period)."""
    by_request = {c.actions[0].request_id: c for c in chunks}
    assert outputs
    last_due = 0
    seen: dict[str, list[int]] = {}
    for msg in steps_of(outputs):
        assert msg.chunk_length == length
        chunk = by_request[msg.request_id]
        stamp_ns = stamp_to_nanoseconds(msg.header.stamp)
        assert stamp_ns == stamp_to_nanoseconds(chunk.header.stamp)
        due_ns = stamp_to_nanoseconds(msg.due)
        assert due_ns == stamp_ns + msg.step_index * PERIOD_NS
        assert due_ns > last_due - PERIOD_NS
        last_due = due_ns
        assert_actions_close(
            policy_output_to_action(msg),
            policy_output_to_action(chunk.actions[msg.step_index]),
            1e-9,
        )
        seen.setdefault(msg.request_id, []).append(msg.step_index)
    for steps in seen.values():
        assert steps == sorted(set(steps))  # each step once, in order


def check_chunk_messages(chunks, length=LENGTH, period=CHUNK_PERIOD_SEC):
    expected = chunk_steps(length)
    for chunk in chunks:
        assert len(chunk.actions) == length
        assert chunk.action_period_sec == pytest.approx(period)
        stamp_ns = stamp_to_nanoseconds(chunk.header.stamp)
        for i, (msg, action) in enumerate(zip(chunk.actions, expected.actions, strict=True)):
            assert (msg.step_index, msg.chunk_length) == (i, length)
            assert stamp_to_nanoseconds(msg.due) == stamp_ns + i * PERIOD_NS
            assert msg.header.stamp == chunk.header.stamp
            assert_actions_close(policy_output_to_action(msg), action, 1e-9)


def run_chunks(rig: Rig, recorder: Recorder, chunk_count: int = 3):
    rig.stream_camera(sample_image(), rate_hz=20.0)
    assert wait_until(lambda: len(recorder.chunk_messages()) >= chunk_count, WAIT_SEC)
    time.sleep(0.1)
    return rig.outputs(), recorder.chunk_messages()


def test_in_process_node_publishes_each_step_of_a_chunk_when_due(rig):
    recorder = Recorder(rig)
    node = in_process_node(rig, recorder)
    outputs, chunks = run_chunks(rig, recorder)
    check_chunk_messages(chunks)
    check_timeline(outputs, chunks)
    # More commands than chunks: the steps between answers come from the timeline.
    assert len(steps_of(outputs)) > len(chunks)
    # The first chunk's first step goes out on arrival.
    assert outputs[0].step_index == 0 and outputs[0].request_id == chunks[0].actions[0].request_id
    counts = node.chunk_executor.counts()
    assert counts["accepted"] >= 3 and counts["refused_stale"] == counts["refused_foreign"] == 0


def test_remote_node_with_a_real_server_publishes_the_chunk_at_its_cadence(rig, chunk_server):
    recorder = Recorder(rig)
    node = remote_node(rig, recorder, chunk_server)
    outputs, chunks = run_chunks(rig, recorder)
    check_chunk_messages(chunks)
    check_timeline(outputs, chunks)
    assert len(steps_of(outputs)) > len(chunks)
    # The request id is the one sent on the wire, fresh per request.
    ids = [c.actions[0].request_id for c in chunks]
    assert len(set(ids)) == len(ids) and all(ids)
    assert node.chunk_executor.counts()["accepted"] >= 3


def test_the_same_chunked_stub_gives_the_same_sequence_through_both_nodes(chunk_server):
    """Both nodes run the same executor on the same answers: the chunks are equal, and
    each command is its chunk's action at its step, due at the same offset."""
    sequences = []
    for start in (
        lambda rig, recorder: in_process_node(rig, recorder, refill_horizon_sec=0.0),
        lambda rig, recorder: remote_node(rig, recorder, chunk_server, refill_horizon_sec=0.0),
    ):
        with Rig() as rig:
            recorder = Recorder(rig)
            start(rig, recorder)
            outputs, chunks = run_chunks(rig, recorder, chunk_count=1)
            first = chunks[0].actions[0].request_id
            # The first chunk, run out in full (no refill before it is dry).
            assert wait_until(
                lambda rig=rig, first=first: any(
                    m.request_id == first and m.step_index == LENGTH - 1 for m in rig.outputs()
                ),
                WAIT_SEC,
            )
            sequences.append([
                (m.step_index, stamp_to_nanoseconds(m.due) - stamp_to_nanoseconds(m.header.stamp),
                 policy_output_to_action(m))
                for m in rig.outputs() if m.request_id == first
            ])
            check_chunk_messages(recorder.chunk_messages())
    local, remote = sequences
    assert [s[:2] for s in local] == [s[:2] for s in remote]
    assert [s[0] for s in local][0] == 0 and local[-1][0] == LENGTH - 1
    for (_, _, a), (_, _, b) in zip(local, remote, strict=True):
        assert_actions_close(a, b, 1e-9)


def test_underrun_publishes_a_hold_counted_and_on_diagnostics(rig):
    recorder = Recorder(rig)
    node = in_process_node(
        rig, recorder, SlowChunkedBackend(), instruction="chunk 3", refill_horizon_sec=0.0
    )
    rig.stream_camera(sample_image(), rate_hz=20.0)
    assert wait_until(lambda: node.counters["underrun_holds"] >= 2, WAIT_SEC), node.counters
    holds = [m for m in rig.outputs() if m.step_index == m.chunk_length]
    assert holds
    for hold in holds:
        assert policy_output_to_action(hold).is_hold and hold.confidence == 0.0
        assert hold.chunk_length == 3
        # Due when the timeline ran dry: not before its chunk's end.
        assert stamp_to_nanoseconds(hold.due) >= (
            stamp_to_nanoseconds(hold.header.stamp) + 3 * PERIOD_NS - 1000
        )
    assert wait_until(
        lambda: any(int(s.get("underruns", 0)) >= 1 for s in recorder.executor_statuses),
        WAIT_SEC,
    )


def test_single_step_answers_are_published_on_arrival_as_chunks_of_one(rig):
    recorder = Recorder(rig)
    in_process_node(rig, recorder, StubBackend(), instruction="pick up the object")
    rig.stream_camera(sample_image(), rate_hz=20.0)
    outputs = rig.wait_for_outputs(3)
    for msg in outputs:
        assert (msg.step_index, msg.chunk_length) == (0, 1)
        assert msg.due == msg.header.stamp
        assert msg.request_id
    assert wait_until(lambda: len(recorder.chunk_messages()) >= 1, WAIT_SEC)
    assert len(recorder.chunk_messages()[0].actions) == 1


def test_chunk_parameters_are_live_and_checked(rig):
    recorder = Recorder(rig)
    node = in_process_node(rig, recorder)
    [result] = rig.set_parameters(node.get_name(), chunk_merge="average")
    assert not result.successful and "chunk_merge" in result.reason
    assert "temporal_ensemble" in result.reason
    [result] = rig.set_parameters(node.get_name(), crossfade_steps=0)
    assert not result.successful and "crossfade_steps" in result.reason
    [result] = rig.set_parameters(node.get_name(), refill_horizon_sec=-5.0)
    assert not result.successful and "refill_horizon_sec" in result.reason
    assert node.chunk_executor.settings.chunk_merge is ChunkMerge.REPLACE
    results = rig.set_parameters(
        node.get_name(), chunk_merge="temporal_ensemble", chunk_ensemble_weight=0.5,
        crossfade_steps=2, refill_horizon_sec=-1.0,
    )
    assert all(r.successful for r in results)
    settings = node.chunk_executor.settings
    assert settings.chunk_merge is ChunkMerge.TEMPORAL_ENSEMBLE
    assert (settings.ensemble_weight, settings.crossfade_steps) == (0.5, 2)
    assert settings.refill_horizon_sec is None  # below 0: automatic


class FailingAfterOneChunk(ChunkedBackend):
    """One chunk, then every call fails."""

    def __init__(self):
        self.calls = 0

    def predict(self, observation):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("simulated CUDA error")
        return super().predict(observation)


class HoldingPolicyNode(PolicyNode):
    def action_on_failure(self, observation):
        return PolicyAction.hold(observation.reference_frame)


def test_a_failures_hold_ends_the_plan(rig):
    recorder = Recorder(rig)
    node = rig.add(HoldingPolicyNode(
        backend=FailingAfterOneChunk(),
        **rig.node_kwargs(**node_values(recorder, refill_horizon_sec=0.45)),
    ))
    rig.stream_camera(sample_image(), rate_hz=20.0)
    assert wait_until(lambda: any(policy_output_to_action(m).is_hold for m in rig.outputs()),
                      WAIT_SEC), node.counters
    time.sleep(0.6)  # the first chunk's remaining steps would be due by now
    outputs = rig.outputs()
    first = outputs[0].request_id
    hold_at = next(i for i, m in enumerate(outputs) if policy_output_to_action(m).is_hold)
    assert outputs[hold_at].request_id != first
    assert (outputs[hold_at].step_index, outputs[hold_at].chunk_length) == (0, 1)
    assert all(m.request_id != first for m in outputs[hold_at:])
    assert node.counters["underrun_holds"] == 0


class PendingRecordingBackend(ChunkedBackend):
    """ChunkedBackend that keeps the plan context each observation came with."""

    def __init__(self, **options):
        super().__init__(**options)
        self.seen: list[tuple[tuple[PolicyAction, ...], object]] = []

    def predict(self, observation):
        self.seen.append((observation.pending_actions, observation.pending_delay_sec))
        return super().predict(observation)


def test_the_next_observation_carries_the_rest_of_the_plan_and_the_delay(rig):
    recorder = Recorder(rig)
    backend = PendingRecordingBackend()
    in_process_node(rig, recorder, backend=backend)
    _, chunks = run_chunks(rig, recorder)
    assert backend.seen[0] == ((), None)  # no plan yet, no latency measured
    with_plan = [(i, p, d) for i, (p, d) in enumerate(backend.seen) if p]
    assert with_plan, backend.seen
    index, pending, delay = with_plan[0]
    assert 0 < len(pending) < LENGTH and delay is not None and 0.0 <= delay < 1.0
    # The unpublished tail of the chunk the robot was executing, as accepted.
    executing = [policy_output_to_action(m) for m in chunks[index - 1].actions]
    for got, want in zip(pending, executing[-len(pending):], strict=True):
        assert_actions_close(got, want, 1e-9)
