"""`remote_policy_node`: the policy runs on a remote GPU host behind the HTTP policy server.

Each observation is resized to image_width x image_height, JPEG-encoded
into a contract request and posted by ``RemoteClient`` (a deadline per
attempt, bounded retries, circuit breaker, every answer's form validated)
from the base class's worker thread, never from the executor thread. Up to
``remote_max_in_flight`` observations are out at once, each on its own worker
thread and connection. When the
server cannot answer, or answers something that is not a valid action, the
node publishes a safe hold (``remote_fallback_on_failure``) or nothing. What
a valid answer may make the robot do is the safety guard's to say, as in the
in-process node (``node_publishing``).

The circuit breaker's state is logged when it opens and closes, and
reported on /diagnostics (diagnostic_msgs/DiagnosticArray) when it changes
and once a second, as ROS monitoring tools expect.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticArray

from manipulation_policy.core.api_key import ApiKeyUnusable
from manipulation_policy.core.contract import (
    parse_request,
    request_action_overrides,
)
from manipulation_policy.core.policy_types import Observation, PolicyAction
from manipulation_policy.core.upstream_compat import ActionConversionOptions
from manipulation_policy.nodes.policy_node_base import ConfigureFailed, PolicyNodeBase, run_node
from manipulation_policy.nodes.remote_diagnostics import (
    DIAGNOSTICS_TOPIC,
    ServerLinkState,
    server_link_status,
)
from manipulation_policy.robot.node_parameters import (
    REMOTE_NODE_PARAMETERS,
    UPSTREAM_ACTION_PARAMETERS,
    upstream_action_fields,
)
from manipulation_policy.robot.node_shared import LOG_THROTTLE_SEC
from manipulation_policy.robot.remote_action_source import (
    RemoteActionSource,
    remote_settings,
)
from manipulation_policy.robot.remote_client import BreakerState, RemoteClient
from manipulation_policy.robot.server_check import ServerCheckFailed, check_server_info

DIAGNOSTICS_PERIOD_SEC = 1.0
# Under autostart, a server that is not there yet is asked again this often.
AUTOSTART_RETRY_SEC = 2.0

# Parameters that make up RemoteSettings: a change to any of them updates the client.
SETTINGS_PARAMETERS = frozenset({
    "remote_url", "remote_timeout_sec", "remote_retry_attempts", "remote_api_key_file",
    "remote_max_response_bytes", "remote_retry_after_max_sec", "remote_max_in_flight",
})


class RemotePolicyNode(PolicyNodeBase):
    remote = True
    AUTOSTART_RETRY_SEC = AUTOSTART_RETRY_SEC

    def __init__(self, **node_kwargs: Any):
        super().__init__("remote_policy_node", REMOTE_NODE_PARAMETERS, **node_kwargs)

    def _upstream_action_fields(self) -> dict[str, Any]:
        """Upstream's openvla_* parameters, when given: request fields (read at start)."""
        given = self.declare_optional_start_parameters(
            UPSTREAM_ACTION_PARAMETERS,
            "upstream MobileManipulationCore per-request action setting, "
            "sent with every request when set (read at start)",
        )
        fields = upstream_action_fields(given)
        if fields:
            self.get_logger().info(f"sending upstream action settings with each request: {fields}")
        return fields

    def create_action_source(self) -> RemoteActionSource:
        """The client of a server that answered /health and /info (configure); raises
        ServerCheckFailed (unreachable, unhealthy, our key refused) otherwise."""
        if not hasattr(self, "_extra_fields"):  # read once: they are start parameters
            self._extra_fields = self._upstream_action_fields()
            self._status_lock = threading.Lock()
            self._last_status: Optional[ServerLinkState] = None
            self._diagnostics_publisher = self.create_publisher(
                DiagnosticArray, DIAGNOSTICS_TOPIC, 10
            )
            self.create_timer(DIAGNOSTICS_PERIOD_SEC, self._republish_status)
        extra_fields = self._extra_fields
        # A raw action vector in the answer is converted with the same settings.
        raw_options = ActionConversionOptions().with_overrides(
            request_action_overrides(parse_request(extra_fields))
        )
        settings = replace(
            remote_settings(self.parameter_values()), raw_action_options=raw_options
        )
        try:
            info = check_server_info(settings)
        except ServerCheckFailed as exc:
            raise ConfigureFailed(str(exc)) from None
        self.get_logger().info(f"policy server {settings.url} is up: {info.served}")
        if info.inputs_unreadable is not None:
            self.get_logger().warning(
                f"policy server {settings.url}: /info's inputs unreadable "
                f"({info.inputs_unreadable}); the cameras and state are not checked now"
            )
        self.check_policy_inputs(info.inputs)
        self.get_logger().info(
            f"policy server {settings.url} (deadline {settings.timeout_sec:g} s per attempt, "
            f"{settings.retry_attempts} retries: an answer comes within "
            f"{settings.worst_case_sec:.2f} s or not at all; API key "
            f"{'set' if settings.api_key else 'unset'})"
        )
        source = RemoteActionSource(
            RemoteClient(settings),
            self.parameter_values,
            self._report_failure,
            self._report_recovery,
            self._report_breaker,
            extra_fields,
        )
        self._publish_status(source, "")
        return source

    def max_in_flight(self) -> int:
        return self.parameter_values()["remote_max_in_flight"]

    def parameters_changed(self, changed: dict[str, Any]) -> None:
        if "remote_max_in_flight" in changed:
            self._max_in_flight_changed()  # running requests go on; fewer start after
        if not SETTINGS_PARAMETERS.intersection(changed) or self.action_source is None:
            return  # not configured: configure reads the values then in effect
        try:
            settings = remote_settings(self.parameter_values())
        except ApiKeyUnusable as exc:  # the file changed since it was checked
            self.get_logger().error(f"{exc}; keeping the previous API key")
            settings = replace(remote_settings({**self.parameter_values(),
                                                "remote_api_key_file": ""}),
                               api_key=self.action_source.client.settings.api_key)
        self.action_source.client.update(
            url=settings.url,
            timeout_sec=settings.timeout_sec,
            retry_attempts=settings.retry_attempts,
            api_key=settings.api_key,
            max_response_bytes=settings.max_response_bytes,
            retry_after_max_sec=settings.retry_after_max_sec,
            max_in_flight=settings.max_in_flight,
        )
        self._publish_status(self.action_source, "")

    def new_request_id(self) -> str:
        return self.action_source.client.new_request_id()

    def call_action_source(self, observation: Observation, request_id: str) -> Any:
        # robot_id (this node's fully qualified name) is on the observation already.
        return self.action_source(observation, request_id=request_id)

    def action_on_failure(self, observation: Observation) -> Optional[PolicyAction]:
        if self.parameter_values()["remote_fallback_on_failure"]:
            return PolicyAction.hold(observation.reference_frame)
        return None

    # ------------------------------------------------------------ reports

    def _report_failure(self, message: str) -> None:
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_SEC)
        self._publish_status(self.action_source, message)

    def _report_recovery(self, message: str) -> None:
        self.get_logger().info(message)
        self._publish_status(self.action_source, "")

    def _report_breaker(self, old: BreakerState, new: BreakerState, failure: str) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            wait = self.action_source.client.breaker.seconds_until_probe()
            self.get_logger().warning(
                f"circuit breaker open: {failure or 'server failing'}; calls fail at once "
                f"until a probe in {wait:.1f} s"
            )
        elif new is BreakerState.CLOSED:
            self.get_logger().info(f"circuit breaker closed (was {old.value})")

    def _publish_status(self, source: RemoteActionSource, failure: str) -> None:
        """Report the link to the server on /diagnostics when its state changed."""
        client = source.client
        state = ServerLinkState(
            server=client.settings.url,
            breaker=client.breaker.state,
            failing=source.failing,
            next_probe_sec=round(client.breaker.seconds_until_probe(), 3),
            last_failure=failure,
        )
        with self._status_lock:
            last = self._last_status
            if last is not None and (last.breaker, last.failing, last.server) == (
                state.breaker, state.failing, state.server
            ):
                return
            self._last_status = state
        self._send_diagnostics(state)

    def _republish_status(self) -> None:
        with self._status_lock:
            state = self._last_status
        if state is not None:
            self._send_diagnostics(state)

    def _send_diagnostics(self, state: ServerLinkState) -> None:
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [server_link_status(self.get_fully_qualified_name(), state)]
        if not self._closing:
            self._diagnostics_publisher.publish(msg)

def main(args: Optional[list[str]] = None) -> int:
    return run_node(RemotePolicyNode, args)


if __name__ == "__main__":
    sys.exit(main())
