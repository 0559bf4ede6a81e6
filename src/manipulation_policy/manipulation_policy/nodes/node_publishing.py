"""The policy node's outputs: each command as a PolicyOutput (an answer's action at
once, or a step of the action timeline when it is due), each accepted chunk whole
as a PolicyActionChunk, and the diagnostics of the action executor and the guard.

Every command passes the safety guard (``robot/safety_guard.SafetyGuard``, on the
node's guard parameters) right before it becomes a PolicyOutput: what goes out is
the guard's action, clamped. A refused one goes out as a hold, the plan is dropped
(the executor cleared, the guard's references reset), the refusal is counted,
logged and reported on /diagnostics; the node goes on. The chunk message shows
each step as the guard would let it out from the guard's state when the chunk
arrives (a copy of the guard runs through the steps at their due times; after a
refused step, holds): no value the guard would stop is on the chunk topic. Each
command is checked again when it is due, against the references of that moment.

This mixin of ``PolicyNodeBase`` owns the publishers, the guard and what a
published command needs to know of the chunk it comes from (``_chunks``, under
``_chunks_lock``). Nothing is published once the node is closing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput
from manipulation_policy.core.policy_types import (
    ActionChunk,
    Observation,
    PolicyAction,
)
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.nodes.guard_diagnostics import guard_status, refusal_total
from manipulation_policy.robot.executor import DueCommand
from manipulation_policy.robot.guarded_commands import ChunkOrigin, guard_preview
from manipulation_policy.robot.node_parameters import GUARD_PARAMETER_NAMES
from manipulation_policy.robot.node_shared import LOG_THROTTLE_SEC, Job
from manipulation_policy.robot.safety_guard import (
    GuardContext,
    GuardLimits,
    GuardResult,
    SafetyGuard,
)

EXECUTOR_DIAGNOSTICS_PERIOD_SEC = 1.0
DIAGNOSTICS_TOPIC = "/diagnostics"
REMEMBERED_CHUNKS = 64


class NodePublishing:
    """Publishing of ``PolicyNodeBase`` (a mixin)."""

    def _init_publishing(self) -> None:
        self._chunks_lock = threading.Lock()
        self._chunks: dict[str, ChunkOrigin] = {}  # request id -> its accepted chunk
        # The timer and the worker threads publish due steps: one at a time, in order.
        self._due_lock = threading.Lock()
        self._reported_underruns = 0
        # Commands go out only while active (lifecycle); the lock orders the last command
        # before deactivation's hold, and nothing after it.
        self._publish_lock = threading.RLock()
        self._publishing = False
        self._reported_refusals = 0
        try:
            limits = GuardLimits.from_values(self.parameter_values())
        except ValueError as exc:  # inconsistent start values (each alone was checked)
            raise ValueError(f"safety guard parameters: {exc}") from None
        self._guard = SafetyGuard(limits)

    @property
    def safety_guard(self) -> SafetyGuard:
        return self._guard

    def _guard_parameters_changed(self, changes: dict[str, Any]) -> None:
        # Checked together when set (changes_problem): consistent here.
        if GUARD_PARAMETER_NAMES.intersection(changes):
            self._guard.update_limits(GuardLimits.from_values(self.parameter_values()))

    def _guarded(self, action: PolicyAction, context: GuardContext) -> GuardResult:
        """The guard's verdict on ``action``; a refusal drops the plan and is logged."""
        result = self._guard.check(action, context)
        if result.refused:
            self._executor.clear()
            self._guard.reset()
            self.get_logger().warning(
                f"safety guard refused an action: {result.refusal}; publishing a hold, "
                f"plan dropped (refusals so far: {refusal_total(self._guard.counts())})",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif result.clamped:
            self.get_logger().info(
                f"safety guard clamped an action to {', '.join(result.clamped)}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        return result

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
        observation = job.observation
        context = GuardContext(
            stamp_ns / 1e9, observation.joint_state, observation.eef_pose, stamp_ns / 1e9
        )
        checked = self._guarded(action, context).action
        return self._send(
            lambda: ros_conversion.command_to_policy_output(
                checked, job.frame.stamp, stamp_ns, 0, 1, request_id
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
        self,
        chunk: ActionChunk,
        stamp: Any,
        stamp_ns: int,
        request_id: str,
        observation: Observation,
    ) -> None:
        """What the steps of a chunk need to be published. Called before the executor
        accepts the chunk: its tick, on the other thread, may publish a step at once."""
        with self._chunks_lock:
            self._chunks[request_id] = ChunkOrigin.of(chunk, stamp, stamp_ns, observation)
            while len(self._chunks) > REMEMBERED_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))

    def _publish_chunk(self, chunk: ActionChunk, stamp: Any, request_id: str) -> None:
        """Publish an accepted chunk whole on the chunk topic (logged when it cannot be:
        its steps will fail too)."""
        try:
            shown = self._guard_preview(chunk, request_id)
            msg = ros_conversion.chunk_to_msg(shown, stamp, request_id)
            with self._publish_lock:
                if not self._closing and self._publishing:
                    self._chunk_output_publisher().publish(msg)
        except Exception as exc:  # noqa: BLE001 - unpublishable: its steps will fail too
            self._count("publish_failed")
            self.get_logger().error(
                f"action chunk not publishable: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )

    def _guard_preview(self, chunk: ActionChunk, request_id: str) -> ActionChunk:
        """``chunk``'s steps as a copy of the guard lets them out at their due times
        (holds from a refused step on); the guard itself is not touched."""
        with self._chunks_lock:
            info = self._chunks.get(request_id)
        if info is None:
            return chunk
        return guard_preview(self._guard, chunk, info)

    def _publish_due(self) -> Optional[bool]:
        """Publish the commands due now: None when none was, else whether all went out.
        After a refused one (a hold went out, the plan was dropped) none follows."""
        with self._due_lock:
            commands = self._executor.due()
            if not commands:
                return None
            sent_all = True
            for command in commands:
                sent, refused = self._publish_command(command)
                sent_all = sent_all and sent
                if refused:
                    break
            return sent_all

    def _publish_command(self, command: DueCommand) -> tuple[bool, bool]:
        """Publish a due command, guarded: (whether it went out, whether it was refused)."""
        if self.hold_reason() is not None:
            return True, False  # the stop dropped the plan and published its hold
        with self._chunks_lock:
            info = self._chunks.get(command.request_id)
        if info is None:  # forgotten (cannot happen with REMEMBERED_CHUNKS > 1)
            return False, False
        step, due_ns = info.step_and_due_ns(command)
        if command.is_underrun_hold:
            self._count("underrun_holds")
            self.get_logger().warning(
                "action timeline ran dry before the next chunk arrived: publishing a hold "
                f"(underruns so far: {self.counters['underrun_holds']}; refill_horizon_sec "
                f"in effect {self._executor.refill_horizon_sec():.3f})",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        result = self._guarded(command.action, info.guard_context(due_ns))
        sent = self._send(
            lambda: ros_conversion.command_to_policy_output(
                result.action, info.stamp, due_ns, step, info.length, command.request_id
            ),
            None,
        )
        return sent, result.refused

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
            # Requests awaiting an answer, of at most max_in_flight (remote_max_in_flight).
            KeyValue(key="in_flight", value=str(self._executor.in_flight())),
            KeyValue(key="max_in_flight", value=str(self.max_in_flight())),
            KeyValue(key="projected_remaining_sec",
                     value=f"{self._executor.projected_remaining_sec():.3f}"),
            # Sets not sent for a missing or off camera, or a state that cannot be made.
            KeyValue(key="incomplete_inputs", value=str(self.counters["incomplete_inputs"])),
            KeyValue(key="inputs_problem", value=self.inputs_problem or ""),
        ]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        guard_counts = self._guard.counts()
        msg.status = [
            status,
            self._safety_status(self.lifecycle_state),
            guard_status(self.get_fully_qualified_name(), guard_counts,
                         self._guard.newest_refusal(), self._reported_refusals),
        ]
        self._reported_refusals = refusal_total(guard_counts)
        if not self._closing:
            self._executor_diagnostics.publish(msg)

