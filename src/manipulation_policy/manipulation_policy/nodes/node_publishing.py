"""The policy node's outputs: each command as a PolicyOutput (an answer's action at
once, or a step of the action timeline when it is due), each accepted chunk whole
as a PolicyActionChunk, and the action executor's diagnostics.

This mixin of ``PolicyNodeBase`` owns the publishers and what a published command
needs to know of the chunk it comes from (``_chunks``, under ``_chunks_lock``).
Nothing is published once the node is closing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput
from manipulation_policy.core.policy_types import ActionChunk, PolicyAction
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.robot.executor import DueCommand
from manipulation_policy.robot.node_shared import LOG_THROTTLE_SEC, Job

EXECUTOR_DIAGNOSTICS_PERIOD_SEC = 1.0
DIAGNOSTICS_TOPIC = "/diagnostics"
REMEMBERED_CHUNKS = 64


@dataclass(frozen=True)
class _ChunkInfo:
    """What a published command needs to know of the chunk it comes from."""

    stamp: Any  # builtin_interfaces/Time of the observation
    stamp_ns: int
    length: int
    period: float


class NodePublishing:
    """Publishing of ``PolicyNodeBase`` (a mixin)."""

    def _init_publishing(self) -> None:
        self._chunks_lock = threading.Lock()
        self._chunks: dict[str, _ChunkInfo] = {}  # request id -> its accepted chunk
        self._reported_underruns = 0
        # Commands go out only while active (lifecycle); the lock orders the last command
        # before deactivation's hold, and nothing after it.
        self._publish_lock = threading.RLock()
        self._publishing = False

    def _create_publishers(self, values: dict[str, Any]) -> None:
        self._publisher = self.create_publisher(PolicyOutput, values["output_topic"], 10)
        self._chunk_publisher = self.create_publisher(
            PolicyActionChunk, values["chunk_topic"], 10
        )
        self._preview_publisher = self.create_publisher(PolicyOutput, values["preview_topic"], 10)
        self._chunk_preview_publisher = self.create_publisher(
            PolicyActionChunk, values["chunk_preview_topic"], 10
        )
        self._executor_diagnostics = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)

    def _start_diagnostics(self) -> None:
        self.create_timer(EXECUTOR_DIAGNOSTICS_PERIOD_SEC, self._publish_executor_diagnostics)

    def _publish(self, action: PolicyAction, job: Job, request_id: str = "") -> bool:
        """Publish ``action`` for ``job``'s frame at once; False (logged) when it cannot be.
        While a stop holds (e-stop, stale inputs), a hold goes out instead."""
        if self.hold_reason() is not None and not action.is_hold:
            self._count("held_by_stop")
            action = PolicyAction.hold(action.reference_frame)
        stamp_ns = ros_conversion.stamp_to_nanoseconds(job.frame.stamp)
        return self._send(
            lambda: ros_conversion.command_to_policy_output(
                action, job.frame.stamp, stamp_ns, 0, 1, request_id
            ),
            job.task_generation,
        )

    def _send(self, build: Callable[[], PolicyOutput], task_generation: Optional[int]) -> bool:
        try:
            msg = build()
            with self._publish_lock:
                if self._closing or not self._publishing:
                    return True  # not active: nothing goes out, and nothing failed
                self._command_publisher().publish(msg)
            self._count("published")
            if task_generation is not None:
                self._count_task_step(task_generation)
            return True
        except Exception as exc:  # noqa: BLE001 - e.g. text ROS cannot carry: this cycle fails
            self._count("publish_failed")
            self.get_logger().error(
                f"policy output not publishable: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            return False

    def _remember_chunk(
        self, chunk: ActionChunk, stamp: Any, stamp_ns: int, request_id: str
    ) -> None:
        """What the steps of a chunk need to be published. Called before the executor
        accepts the chunk: its tick, on the other thread, may publish a step at once."""
        with self._chunks_lock:
            self._chunks[request_id] = _ChunkInfo(
                stamp, stamp_ns, len(chunk), chunk.action_period_sec
            )
            while len(self._chunks) > REMEMBERED_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))

    def _publish_chunk(self, chunk: ActionChunk, stamp: Any, request_id: str) -> None:
        """Publish an accepted chunk whole on the chunk topic (logged when it cannot be:
        its steps will fail too)."""
        try:
            msg = ros_conversion.chunk_to_msg(chunk, stamp, request_id)
            with self._publish_lock:
                if not self._closing and self._publishing:
                    self._chunk_output_publisher().publish(msg)
        except Exception as exc:  # noqa: BLE001 - unpublishable: its steps will fail too
            self._count("publish_failed")
            self.get_logger().error(
                f"action chunk not publishable: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )

    def _publish_due(self) -> Optional[bool]:
        """Publish the commands due now: None when none was, else whether all went out."""
        commands = self._executor.due()
        if not commands:
            return None
        return all([self._publish_command(command) for command in commands])

    def _publish_command(self, command: DueCommand) -> bool:
        if self.hold_reason() is not None:
            return True  # the stop dropped the plan and published its hold
        with self._chunks_lock:
            info = self._chunks.get(command.request_id)
        if info is None:  # forgotten (cannot happen with REMEMBERED_CHUNKS > 1)
            return False
        if command.is_underrun_hold:
            step, due_ns = info.length, round(command.due_sec * 1e9)
            self._count("underrun_holds")
            self.get_logger().warning(
                "action timeline ran dry before the next chunk arrived: publishing a hold "
                f"(underruns so far: {self.counters['underrun_holds']}; refill_horizon_sec "
                f"in effect {self._executor.refill_horizon_sec():.3f})",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        else:
            step = command.step_index
            due_ns = ros_conversion.step_due_nanoseconds(info.stamp_ns, step, info.period)
        return self._send(
            lambda: ros_conversion.command_to_policy_output(
                command.action, info.stamp, due_ns, step, info.length, command.request_id
            ),
            None,
        )

    def _publish_executor_diagnostics(self) -> None:
        counts = self._executor.counts()
        underruns = counts["underruns"]
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: action executor"
        status.hardware_id = self.get_fully_qualified_name()
        if underruns > self._reported_underruns:
            status.level = DiagnosticStatus.WARN
            status.message = f"{underruns - self._reported_underruns} underrun(s): holds published"
        else:
            status.level = DiagnosticStatus.OK
            status.message = "ok"
        self._reported_underruns = underruns
        settings = self._executor.settings
        status.values = [KeyValue(key=name, value=str(value)) for name, value in counts.items()]
        status.values += [
            KeyValue(key="chunk_merge", value=settings.chunk_merge.value),
            KeyValue(key="refill_horizon_sec", value=f"{self._executor.refill_horizon_sec():.3f}"),
            KeyValue(key="remaining_sec", value=f"{self._executor.remaining_sec():.3f}"),
        ]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status, self._safety_status(self.lifecycle_state)]
        if not self._closing:
            self._executor_diagnostics.publish(msg)

