"""remote_max_in_flight over real DDS against a real policy server process.

The server's plugin backend (server_test_backends.StampRecordingBackend) takes
0.5 s per prediction and records which frame each prediction was for and when
it ended. Each camera frame's colour names it, and the test keeps its stamp.

The node hands a frame over only while it is at most ``max_observation_age_sec``
(MAX_AGE_SEC) old by the node clock, and an answer reaches the node after its
prediction ended. So a frame b stamped before frame a's prediction ended by more
than MAX_AGE_SEC was handed over before a's answer arrived: two observations were
in flight. With remote_max_in_flight 1 that cannot happen (the next frame is handed
over only once the answer is in); with 2 it must. The node's own count of
outstanding requests, polled, says the same from the inside.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from node_harness import Rig, wait_until
from server_test_backends import (
    CHUNK_PERIOD_SEC,
    FRAME_INDEX_COUNT,
    PIPELINE_RECORD_ENV,
    indexed_frame,
)

from manipulation_msgs.msg import PolicyActionChunk
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import stamp_to_nanoseconds
from manipulation_policy.server.process import ServerProcess

LENGTH = 8  # x 0.1 s: a chunk spans 0.8 s
MAX_AGE_SEC = 0.15
PREDICTIONS = 8
WAIT_SEC = 60.0


def recording_server(record_file) -> ServerProcess:
    return ServerProcess(
        "--backend", "server_test_backends:StampRecordingBackend", "--no-access-log",
        env={API_KEY_ENV: "", PIPELINE_RECORD_ENV: str(record_file)},
        extra_pythonpath=[str(Path(__file__).resolve().parent)],
    )  # fmt: skip


class ChunkTopic:
    """The accepted chunks, as the chunk topic shows them, and the executor's figures on
    /diagnostics."""

    def __init__(self, rig: Rig):
        self._lock = threading.Lock()
        self._chunks: list[PolicyActionChunk] = []
        self.executor_statuses: list[dict[str, str]] = []
        self.topic = f"{rig.namespace}/policy_chunk"
        self._status_prefix = f"{rig.namespace}/"
        rig.node.create_subscription(PolicyActionChunk, self.topic, self._on_chunk, 50)
        rig.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)

    def _on_chunk(self, msg: PolicyActionChunk) -> None:
        with self._lock:
            self._chunks.append(msg)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(self._status_prefix) and status.name.endswith(
                ": action executor"
            ):
                with self._lock:
                    self.executor_statuses.append({kv.key: kv.value for kv in status.values})

    def statuses(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.executor_statuses)

    def chunk_messages(self) -> list[PolicyActionChunk]:
        with self._lock:
            return list(self._chunks)


class IndexedCamera:
    """Publishes frame i (its colour names i) at 20 Hz and keeps each one's stamp."""

    def __init__(self, rig: Rig):
        self._rig = rig
        self._lock = threading.Lock()
        self.stamps_ns: dict[int, int] = {}
        self._next = 0
        rig.stream(20.0, self._publish)

    def _publish(self) -> None:
        index = self._next % FRAME_INDEX_COUNT
        self._next += 1
        stamp = self._rig.publish_image(indexed_frame(index))
        with self._lock:
            self.stamps_ns[index] = stamp_to_nanoseconds(stamp)

    def stamp_ns(self, index: int) -> int:
        with self._lock:
            return self.stamps_ns[index]


def predictions(record_file) -> list[tuple[int, int]]:
    """(frame index, prediction end in ns), in the order the server predicted them."""
    if not record_file.exists():
        return []
    rows = []
    for line in record_file.read_text().splitlines():
        index, ended = line.split()
        rows.append((int(index), round(float(ended) * 1e9)))
    return rows


def run_pipeline(tmp_path, max_in_flight: int, then_lowered: bool = False):
    record_file = tmp_path / "predictions.txt"
    with recording_server(record_file) as server, Rig() as rig:
        recorder = ChunkTopic(rig)
        node = rig.add(RemotePolicyNode(**rig.node_kwargs(
            chunk_topic=recorder.topic,
            instruction=f"chunk {LENGTH}",
            inference_rate=20.0,
            refill_horizon_sec=0.6,
            max_observation_age_sec=MAX_AGE_SEC,
            max_gripper_rate=0.0,
            remote_url=server.base_url,
            remote_timeout_sec=5.0,
            remote_max_in_flight=max_in_flight,
        )))
        camera = IndexedCamera(rig)
        most_in_flight = 0
        deadline = time.monotonic() + WAIT_SEC
        while len(predictions(record_file)) < PREDICTIONS:
            assert time.monotonic() < deadline, (node.counters, predictions(record_file))
            most_in_flight = max(most_in_flight, node.chunk_executor.in_flight())
            time.sleep(0.005)
        assert wait_until(lambda: len(recorder.chunk_messages()) >= PREDICTIONS - 1, WAIT_SEC)
        assert wait_until(lambda: recorder.statuses(), WAIT_SEC)
        status = recorder.statuses()[-1]
        assert status["max_in_flight"] == str(max_in_flight)
        assert 0 <= int(status["in_flight"]) <= max_in_flight
        assert float(status["projected_remaining_sec"]) >= float(status["remaining_sec"])
        time.sleep(0.2)
        if then_lowered:
            lower_live(rig, node)
        outputs, chunks = rig.outputs(), recorder.chunk_messages()
        counts = node.chunk_executor.counts()
        rows = [(camera.stamp_ns(index), ended) for index, ended in predictions(record_file)]
    assert "Traceback" not in server.log()
    return rows, outputs, chunks, counts, most_in_flight


def lower_live(rig: Rig, node: RemotePolicyNode) -> None:
    """remote_max_in_flight 2 -> 1 while running: the requests in flight end as usual,
    and from then on one at a time; answers keep coming."""
    [result] = rig.set_parameters(node.get_name(), remote_max_in_flight=1)
    assert result.successful
    assert node.action_source.client.settings.max_in_flight == 1
    assert wait_until(lambda: node.chunk_executor.in_flight() <= 1, WAIT_SEC)
    accepted = node.chunk_executor.counts()["accepted"]
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert node.chunk_executor.in_flight() <= 1
        time.sleep(0.005)
    assert wait_until(lambda: node.chunk_executor.counts()["accepted"] > accepted + 1, WAIT_SEC)
    assert node.action_source.client.posters.size() <= 1


def overlaps(rows) -> list[tuple[int, int]]:
    """Pairs (a, b) of predictions where frame b (newer than a) was handed over before
    a's answer reached the node: b's stamp + MAX_AGE_SEC < a's prediction end."""
    margin_ns = round(MAX_AGE_SEC * 1e9)
    return [
        (a, b)
        for a, (stamp_a, ended_a) in enumerate(rows)
        for b, (stamp_b, _) in enumerate(rows)
        if stamp_b > stamp_a and stamp_b + margin_ns < ended_a
    ]


def check_published(outputs, chunks):
    """Every command comes from an accepted chunk (one on the chunk topic), due at its
    step of that chunk; chunks and commands in stamp order."""
    by_request = {c.actions[0].request_id: c for c in chunks}
    steps = [m for m in outputs if m.step_index < m.chunk_length]
    assert steps
    period_ns = round(CHUNK_PERIOD_SEC * 1e9)
    for msg in steps:
        chunk = by_request[msg.request_id]  # KeyError: a command of no accepted chunk
        stamp_ns = stamp_to_nanoseconds(msg.header.stamp)
        assert stamp_ns == stamp_to_nanoseconds(chunk.header.stamp)
        assert stamp_to_nanoseconds(msg.due) == stamp_ns + msg.step_index * period_ns
    stamps = [stamp_to_nanoseconds(m.header.stamp) for m in steps]
    assert stamps == sorted(stamps)
    chunk_stamps = [stamp_to_nanoseconds(c.header.stamp) for c in chunks]
    assert chunk_stamps == sorted(chunk_stamps)


def test_two_in_flight_hands_the_next_frame_over_before_the_answer_arrives(tmp_path):
    rows, outputs, chunks, counts, most_in_flight = run_pipeline(tmp_path, 2, then_lowered=True)
    assert overlaps(rows), rows
    assert most_in_flight == 2
    check_published(outputs, chunks)
    # A refused (stale) answer publishes nothing: accepted ones are all on the topic.
    assert counts["accepted"] >= len(chunks) - 1
    assert counts["refused_foreign"] == 0


def test_one_in_flight_never_hands_a_frame_over_before_the_answer(tmp_path):
    rows, outputs, chunks, counts, most_in_flight = run_pipeline(tmp_path, 1)
    assert overlaps(rows) == []
    assert most_in_flight == 1
    check_published(outputs, chunks)
    assert counts["refused_stale"] == counts["refused_foreign"] == 0


@pytest.mark.parametrize("value", [0, 5])
def test_remote_max_in_flight_outside_1_to_4_is_refused_live(value):
    with Rig() as rig:
        node = rig.add(RemotePolicyNode(**rig.node_kwargs(autostart=False)))
        [result] = rig.set_parameters(node.get_name(), remote_max_in_flight=value)
        assert not result.successful
        assert result.reason == f"remote_max_in_flight must be between 1 and 4, got {value}"
        [result] = rig.set_parameters(node.get_name(), remote_max_in_flight=3)
        assert result.successful and node.max_in_flight() == 3
