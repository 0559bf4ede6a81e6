"""The policy node's stops and dry run: the emergency stop topic, the input watchdog,
and where commands go (the command topics, or the preview topics in a dry run).

What a stop means is ROS-free (``robot/safety_stops.py``). Here: the e-stop
subscription (reliable, transient local, so a stop latched before the node started
holds), the watchdog's check on every executor tick while active, one hold published
when a stop begins, logs and the "safety" status on /diagnostics. This mixin of
``PolicyNodeBase`` owns ``_stops`` and ``_watchdog``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Bool

from manipulation_policy.core.policy_types import PolicyAction
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.robot.safety_stops import (
    EstopGate,
    InputWatchdog,
    SafetyStops,
)

# As a latched topic: a late subscriber gets the last stop published before it started.
ESTOP_QOS = QoSProfile(
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


class NodeSafety:
    """E-stop, input watchdog and dry run of ``PolicyNodeBase`` (a mixin)."""

    def _init_safety(self, values: dict[str, Any]) -> None:
        self._stops = SafetyStops()
        self._watchdog = InputWatchdog(time.monotonic_ns)
        self._estop_gate = EstopGate(time.monotonic)
        self._estop_topic = values["estop_topic"]
        self.create_subscription(Bool, self._estop_topic, self._on_estop, ESTOP_QOS)

    def hold_reason(self) -> Optional[str]:
        """Why only holds may go out now (the e-stop, stale inputs), or None."""
        return self._stops.hold_reason()

    def estop_state_known(self) -> bool:
        """False in the moments after activation when a latched stop may still be on its
        way (robot/safety_stops.EstopGate): no inference starts then."""
        return self._estop_gate.is_open(
            self._stops.estop_heard, lambda: self.count_publishers(self._estop_topic)
        )

    def _on_estop(self, msg: Bool) -> None:
        change = self._stops.set_estop(bool(msg.data))
        if change is None:
            return
        if msg.data:
            self.get_logger().warning(
                f"EMERGENCY STOP engaged on {self._estop_topic}: only holds are published and "
                "no inference starts until an explicit false"
            )
            self._stop_now()
        else:
            self.get_logger().warning(
                f"emergency stop released on {self._estop_topic}"
                + (f"; still holding: {change.reason}" if change.holding else "")
            )

    def _check_inputs(self) -> None:
        """The watchdog's verdict (each executor tick while active); a hold when it trips."""
        problem = self._watchdog.problem(self.parameter_values()["input_timeout_sec"])
        change = self._stops.set_input_problem(problem)
        if change is None:
            return
        if problem is not None:
            self.get_logger().warning(f"input watchdog: {problem}; holding until inputs return")
            self._stop_now()
        else:
            self.get_logger().info("input watchdog: camera and joint states are fresh again")

    def _stop_now(self) -> None:
        """A stop began: drop the planned steps and publish one hold (when active)."""
        self._executor.clear()
        self._guard.reset()
        if self._publishing:
            self._count("stop_holds")
            self._publish_hold_now()

    def _publish_hold_now(self) -> bool:
        """A hold stamped now, outside any plan."""
        frame = self.parameter_values()["reference_frame"]
        stamp = self.get_clock().now().to_msg()
        stamp_ns = ros_conversion.stamp_to_nanoseconds(stamp)
        return self._send(
            lambda: ros_conversion.command_to_policy_output(
                PolicyAction.hold(frame), stamp, stamp_ns, 0, 1, ""
            ),
            None,
        )

    # ------------------------------------------------------------ dry run

    def _command_publisher(self):
        """Where commands go now: the preview topic in a dry run, else the command topic."""
        return self._preview_publisher if self.parameter_values()["dry_run"] else self._publisher

    def _chunk_output_publisher(self):
        if self.parameter_values()["dry_run"]:
            return self._chunk_preview_publisher
        return self._chunk_publisher

    def _dry_run_changed(self, dry_run: bool) -> None:
        values = self.parameter_values()
        if dry_run:
            self.get_logger().warning(
                f"dry run: commands go to {values['preview_topic']}, nothing to "
                f"{values['output_topic']}"
            )
        else:
            self.get_logger().warning(f"dry run off: commands go to {values['output_topic']}")

    # ------------------------------------------------------------ diagnostics

    def _safety_status(self, lifecycle_state: str) -> DiagnosticStatus:
        return safety_status(
            self.get_fully_qualified_name(),
            lifecycle_state,
            self._stops.estop_engaged,
            self._stops.input_problem,
            self.parameter_values()["dry_run"],
            self._stops.counts(),
        )


def safety_status(
    node: str,
    lifecycle_state: str,
    estop: bool,
    input_problem: Optional[str],
    dry_run: bool,
    counts: dict[str, int],
) -> DiagnosticStatus:
    """The "safety" entry of /diagnostics: ERROR while the e-stop is engaged, WARN while
    the inputs are stale or the node is not active, OK otherwise."""
    status = DiagnosticStatus()
    status.name = f"{node}: safety"
    status.hardware_id = node
    if estop:
        status.level, status.message = DiagnosticStatus.ERROR, "emergency stop engaged"
    elif input_problem is not None:
        status.level, status.message = DiagnosticStatus.WARN, f"holding: {input_problem}"
    elif lifecycle_state != "active":
        status.level, status.message = DiagnosticStatus.WARN, f"not active ({lifecycle_state})"
    else:
        status.level = DiagnosticStatus.OK
        status.message = "dry run: commands on the preview topic" if dry_run else "ok"
    status.values = [
        KeyValue(key="lifecycle_state", value=lifecycle_state),
        KeyValue(key="estop", value=str(estop).lower()),
        KeyValue(key="input_problem", value=input_problem or ""),
        KeyValue(key="dry_run", value=str(dry_run).lower()),
    ] + [KeyValue(key=name, value=str(value)) for name, value in counts.items()]
    return status
