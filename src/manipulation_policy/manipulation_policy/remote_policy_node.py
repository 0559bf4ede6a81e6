"""`remote_policy_node`: the policy runs on a remote GPU host behind the HTTP policy server.

Each observation is resized to image_width x image_height, JPEG-encoded
into a contract request and posted by ``RemoteClient`` (bounded retries,
circuit breaker) from the base class's worker thread, never from the
executor thread. When the server cannot answer, the node publishes a safe
hold (``remote_fallback_on_failure``) or nothing.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Optional

from rcl_interfaces.msg import ParameterDescriptor

from .contract import observation_to_request, parse_request, request_action_overrides
from .imaging import resize_rgb
from .node_parameters import (
    REMOTE_NODE_PARAMETERS,
    UPSTREAM_ACTION_PARAMETERS,
    upstream_action_fields,
)
from .openvla_actions import ActionConversionOptions
from .policy_node_base import LOG_THROTTLE_SEC, PolicyNodeBase, run_node
from .policy_types import JointStateData, Observation, PolicyAction
from .remote_client import RemoteClient, RemoteSettings

API_KEY_ENV = "MANIPULATION_POLICY_API_KEY"


def remote_settings(values: dict[str, Any]) -> RemoteSettings:
    return RemoteSettings(
        url=values["remote_url"],
        timeout_sec=float(values["remote_timeout_sec"]),
        retry_attempts=int(values["remote_retry_attempts"]),
        api_key=values["remote_api_key"] or os.environ.get(API_KEY_ENV, ""),
    )


def without_non_finite_extras(joint_state: JointStateData) -> JointStateData:
    """Drop velocity/effort arrays holding NaN/inf (drivers publish NaN for "unknown").

    The wire carries finite numbers only, and both arrays are optional, so the
    request stays valid instead of being refused on every frame.
    """
    def finite(values: tuple[float, ...]) -> tuple[float, ...]:
        return values if all(math.isfinite(v) for v in values) else ()

    return JointStateData(
        name=joint_state.name,
        position=joint_state.position,
        velocity=finite(joint_state.velocity),
        effort=finite(joint_state.effort),
    )


class RemoteActionSource:
    """Observation -> request -> server -> PolicyAction; a hold or None when that fails."""

    def __init__(
        self,
        client: RemoteClient,
        parameter_values: Callable[[], dict[str, Any]],
        report_failure: Callable[[str], None],
        report_recovery: Callable[[str], None] = lambda message: None,
        extra_fields: Optional[dict[str, Any]] = None,
    ):
        self.client = client
        self._extra_fields = dict(extra_fields or {})
        self._parameter_values = parameter_values
        self._report_failure = report_failure
        self._report_recovery = report_recovery
        self._failing = False  # only the worker thread reads and writes it

    def __call__(self, observation: Observation) -> Optional[PolicyAction]:
        values = self._parameter_values()
        observation = replace(
            observation, joint_state=without_non_finite_extras(observation.joint_state)
        )
        if observation.image is not None:
            sized = resize_rgb(observation.image, values["image_width"], values["image_height"])
            observation = replace(observation, image=sized)
        body = observation_to_request(observation, jpeg_quality=values["jpeg_quality"])
        body.update(self._extra_fields)
        result = self.client.infer(body)
        if result.ok:
            if self._failing:
                self._failing = False
                self._report_recovery("policy server answers again")
            return result.action
        self._failing = True
        fallback = values["remote_fallback_on_failure"]
        self._report_failure(
            f"policy server failed: {result.failure}; "
            + ("publishing a hold" if fallback else "publishing nothing")
        )
        return PolicyAction.hold(observation.reference_frame) if fallback else None

    def close(self) -> None:
        self.client.close()


class RemotePolicyNode(PolicyNodeBase):
    remote = True

    def __init__(self, **node_kwargs: Any):
        super().__init__("remote_policy_node", REMOTE_NODE_PARAMETERS, **node_kwargs)

    def _upstream_action_fields(self) -> dict[str, Any]:
        """Upstream's openvla_* parameters, when given: request fields (read at start)."""
        given = {}
        for name in UPSTREAM_ACTION_PARAMETERS:
            value = self.declare_parameter(
                name,
                None,
                ParameterDescriptor(
                    description="upstream MobileManipulationCore per-request action setting, "
                    "sent with every request when set (read at start)",
                    dynamic_typing=True,
                    read_only=True,
                ),
            ).value
            if value is not None:
                given[name] = value
        fields = upstream_action_fields(given)
        if fields:
            self.get_logger().info(f"sending upstream action settings with each request: {fields}")
        return fields

    def create_action_source(self) -> RemoteActionSource:
        extra_fields = self._upstream_action_fields()
        # A raw action vector in the answer is converted with the same settings.
        raw_options = ActionConversionOptions().with_overrides(
            request_action_overrides(parse_request(extra_fields))
        )
        settings = replace(
            remote_settings(self.parameter_values()), raw_action_options=raw_options
        )
        self.get_logger().info(
            f"policy server {settings.url} (timeout {settings.timeout_sec:g} s, "
            f"{settings.retry_attempts} retries, API key {'set' if settings.api_key else 'unset'})"
        )
        return RemoteActionSource(
            RemoteClient(settings),
            self.parameter_values,
            self._report_failure,
            lambda message: self.get_logger().info(message),
            extra_fields,
        )

    def parameters_changed(self, changed: dict[str, Any]) -> None:
        settings = remote_settings(self.parameter_values())
        self.action_source.client.update(
            url=settings.url,
            timeout_sec=settings.timeout_sec,
            retry_attempts=settings.retry_attempts,
            api_key=settings.api_key,
        )

    def _report_failure(self, message: str) -> None:
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_SEC)


def main(args: Optional[list[str]] = None) -> int:
    return run_node(RemotePolicyNode, args)


if __name__ == "__main__":
    sys.exit(main())
