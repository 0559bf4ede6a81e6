"""The remote node's link to its policy server as a diagnostic_msgs/DiagnosticStatus.

ROS tools (rqt_robot_monitor, diagnostic_aggregator, `ros2 topic echo
/diagnostics`) read a node's health from /diagnostics; this is what the remote
node reports there about its server: OK while answers come, WARN while
decisions fail, ERROR while the circuit breaker is open.
"""

from __future__ import annotations

from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from manipulation_policy.robot.remote_client import BreakerState

DIAGNOSTICS_TOPIC = "/diagnostics"


@dataclass(frozen=True)
class ServerLinkState:
    server: str
    breaker: BreakerState
    failing: bool
    next_probe_sec: float
    last_failure: str

    def level(self) -> bytes:
        if self.breaker is BreakerState.OPEN:
            return DiagnosticStatus.ERROR
        return DiagnosticStatus.WARN if self.failing else DiagnosticStatus.OK

    def message(self) -> str:
        if self.breaker is BreakerState.OPEN:
            return f"circuit breaker open: {self.last_failure or 'server failing'}"
        if self.failing:
            return f"decisions failing: {self.last_failure or 'server failing'}"
        return "policy server answering"


def server_link_status(node_fqn: str, state: ServerLinkState) -> DiagnosticStatus:
    status = DiagnosticStatus()
    status.level = state.level()
    status.name = f"{node_fqn}: policy server"
    status.message = state.message()
    status.hardware_id = state.server
    status.values = [
        KeyValue(key="server", value=state.server),
        KeyValue(key="breaker", value=state.breaker.value),
        KeyValue(key="failing", value=str(state.failing).lower()),
        KeyValue(key="next_probe_sec", value=f"{state.next_probe_sec:.3f}"),
        KeyValue(key="last_failure", value=state.last_failure),
    ]
    return status
