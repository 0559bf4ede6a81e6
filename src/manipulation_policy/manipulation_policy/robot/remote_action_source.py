"""The remote node's action source, no ROS: observation -> request -> policy server -> chunk.

``RemoteActionSource`` is what ``remote_policy_node`` calls on its worker thread(s), and
what ``manipulation_policy.replay --server`` calls on each recorded observation, so
both send the same request (``remote_request_body``) through the same ``RemoteClient``
and take a failure the same way (a hold with ``remote_fallback_on_failure``, else
nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional, Union

from manipulation_policy.core.api_key import read_api_key
from manipulation_policy.core.policy_types import ActionChunk, Observation, PolicyAction
from manipulation_policy.robot.remote_client import (
    BreakerState,
    RemoteClient,
    RemoteSettings,
    printable,
)
from manipulation_policy.robot.remote_request import remote_request_body


def remote_settings(values: dict[str, Any]) -> RemoteSettings:
    """Settings from parameter values; raises ApiKeyUnusable (a ValueError) for a bad key."""
    return RemoteSettings(
        url=values["remote_url"],
        timeout_sec=float(values["remote_timeout_sec"]),
        retry_attempts=int(values["remote_retry_attempts"]),
        api_key=read_api_key(values["remote_api_key_file"]),
        max_response_bytes=int(values["remote_max_response_bytes"]),
        retry_after_max_sec=float(values["remote_retry_after_max_sec"]),
        max_in_flight=int(values["remote_max_in_flight"]),
    )


class RemoteActionSource:
    """Observation -> request -> server -> ActionChunk; a hold or None when that fails.

    Never raises: whatever goes wrong in a cycle (building the request, the
    exchange, the answer) is a failed cycle, reported, and the next frame comes.
    Safe to call from several threads at once (``remote_max_in_flight``): the
    recovery from failing is reported once, by the call that ended it.
    """

    def __init__(
        self,
        client: RemoteClient,
        parameter_values: Callable[[], dict[str, Any]],
        report_failure: Callable[[str], None],
        report_recovery: Callable[[str], None] = lambda message: None,
        report_breaker: Callable[[BreakerState, BreakerState, str], None] = (
            lambda old, new, failure: None
        ),
        extra_fields: Optional[dict[str, Any]] = None,
    ):
        self.client = client
        self._extra_fields = dict(extra_fields or {})
        self._parameter_values = parameter_values
        self._report_failure = report_failure
        self._report_recovery = report_recovery
        self._report_breaker = report_breaker
        self._failing = False
        self._failing_lock = threading.Lock()
        self._transitions: list[tuple[BreakerState, BreakerState]] = []
        self._transitions_lock = threading.Lock()
        client.breaker.on_change = self._on_breaker_change

    @property
    def failing(self) -> bool:
        with self._failing_lock:
            return self._failing

    def _on_breaker_change(self, old: BreakerState, new: BreakerState) -> None:
        # Called inside infer() (or on a URL change): reported once the call's outcome is known.
        with self._transitions_lock:
            self._transitions.append((old, new))

    def __call__(
        self, observation: Observation, request_id: Optional[str] = None
    ) -> Union[ActionChunk, PolicyAction, None]:
        """The server's chunk for ``observation`` (sent as ``request_id`` when given)."""
        values = self._parameter_values()
        try:
            body = self._request(observation, values)
            if request_id is not None:
                body["request_id"] = request_id
            result = self.client.infer(body)
            failure = result.failure or ""
            action = result.chunk
        except Exception as exc:  # noqa: BLE001 - a failed cycle, never a dead worker
            failure, action = f"{type(exc).__name__}: {printable(exc)}", None
        self._drain_transitions(failure)
        if action is not None:
            with self._failing_lock:
                recovered, self._failing = self._failing, False
            if recovered:
                self._report_recovery("policy server answers again")
            return action
        with self._failing_lock:
            self._failing = True
        fallback = values["remote_fallback_on_failure"]
        self._report_failure(
            f"policy server failed: {failure}; "
            + ("publishing a hold" if fallback else "publishing nothing")
        )
        return PolicyAction.hold(observation.reference_frame) if fallback else None

    def _request(self, observation: Observation, values: dict[str, Any]) -> dict:
        return remote_request_body(
            observation,
            values["image_width"],
            values["image_height"],
            values["jpeg_quality"],
            self._extra_fields,
        )

    def _drain_transitions(self, failure: str) -> None:
        with self._transitions_lock:
            transitions, self._transitions = self._transitions, []
        for old, new in transitions:
            self._report_breaker(old, new, failure)

    def close(self) -> None:
        self.client.close()
