"""The paths a replayed observation can take, each the node's own code:

- ``LocalSource``: a backend in this process, called as ``policy_node`` calls it
  (``backends.predictor``); a failed call publishes nothing, as in that node;
- ``ServerSource``: the policy server over HTTP through ``RemoteActionSource`` and
  ``RemoteClient``, as ``remote_policy_node`` sends it (resize, JPEG, deadlines,
  retries, the answer validated); a failed call gives a hold with
  ``remote_fallback_on_failure``, as in that node.

Each counts what failed, so the replay reports failed steps and goes on.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

from manipulation_policy.backends import (
    BackendStartupError,
    PolicyBackend,
    backend_inputs,
    predictor,
)
from manipulation_policy.core.api_key import ApiKeyUnusable
from manipulation_policy.core.policy_types import Observation, PolicyAction, PolicyInputs
from manipulation_policy.replay.errors import ReplayInputError
from manipulation_policy.robot.remote_action_source import RemoteActionSource, remote_settings
from manipulation_policy.robot.remote_client import RemoteClient
from manipulation_policy.robot.server_check import ServerCheckFailed, check_server_info


class LocalSource:
    """A backend in this process (``--backend``)."""

    def __init__(self, backend: PolicyBackend, node_name: str = "policy_node"):
        self.backend = backend
        self._predict = predictor(backend)
        self._numbers = itertools.count(1)
        self._node_name = node_name
        self._failure = ""

    def inputs(self) -> Optional[PolicyInputs]:
        """What the backend declares it reads (None: it does not say)."""
        try:
            return backend_inputs(self.backend)
        except BackendStartupError as exc:
            raise ReplayInputError(str(exc)) from None

    def describe(self) -> str:
        described = self.backend.describe()
        return f"backend {described.get('backend', '?')} (model {described.get('model', '?')})"

    def new_request_id(self) -> str:
        return f"{self._node_name}-{next(self._numbers)}"

    def __call__(self, observation: Observation, request_id: str) -> Any:
        return self._predict(observation)

    def fallback(self, observation: Observation) -> Optional[PolicyAction]:
        return None

    def take_failure(self) -> str:
        failure, self._failure = self._failure, ""
        return failure

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


class ServerSource:
    """The policy server at ``values['remote_url']`` (``--server``)."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)
        try:
            self._settings = remote_settings(self._values)
        except ApiKeyUnusable as exc:
            raise ReplayInputError(str(exc)) from None
        try:
            info = check_server_info(self._settings)
        except ServerCheckFailed as exc:
            raise ReplayInputError(str(exc)) from None
        self.served = info.served
        self._inputs = info.inputs
        if info.inputs_unreadable is not None:
            print(f"replay: policy server {self._settings.url}: /info's inputs unreadable "
                  f"({info.inputs_unreadable}); the cameras and state are not checked",
                  file=sys.stderr)
        self._failure = ""
        self.client = RemoteClient(replace(self._settings))
        self._source = RemoteActionSource(self.client, lambda: self._values, self._failed)

    def _failed(self, message: str) -> None:
        self._failure = message

    def inputs(self) -> Optional[PolicyInputs]:
        """What /info says the policy reads (None: it does not say)."""
        return self._inputs

    def describe(self) -> str:
        return f"policy server {self._settings.url} ({self.served})"

    def new_request_id(self) -> str:
        return self.client.new_request_id()

    def __call__(self, observation: Observation, request_id: str) -> Any:
        return self._source(observation, request_id=request_id)

    def fallback(self, observation: Observation) -> Optional[PolicyAction]:
        if self._values["remote_fallback_on_failure"]:
            return PolicyAction.hold(observation.reference_frame)
        return None

    def take_failure(self) -> str:
        failure, self._failure = self._failure, ""
        return failure

    def close(self) -> None:
        self._source.close()
