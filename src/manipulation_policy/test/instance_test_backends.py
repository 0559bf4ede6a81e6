"""Backends for the --model-instances tests, loaded by the server as
``instance_test_backends:Name`` (the tests put this directory on its PYTHONPATH).

InstanceBackend says which model instance answered, and when;
SecondInstanceFailsBackend loads once, then fails like a GPU with room for one copy;
PlacedBackend describes the device each instance was given (--instance-devices).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

from server_test_backends import ScriptedBackend

from manipulation_policy.backends.model_options import DEVICE
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import Observation, PolicyAction

HOLD_LIMIT_S = 60.0
SPAN_NAMES = ("instance", "start", "end", "batch_size", "echo")


def hold_until(path: str) -> None:
    """Wait until ``path`` exists (the test's release), at most HOLD_LIMIT_S."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


class InstanceBackend(ScriptedBackend):
    """Tells which model instance answered, and when. Each object the process creates
    gets the next instance id (0, 1, ...). ``hold <path>`` waits until the file
    ``path`` exists; every answer's joint_positions are SPAN_NAMES: its instance id,
    the start and end of its model call (the server's monotonic clock), the size of
    its batch and the request's first joint position (-1 without), so each request
    can find its own answer. ``predict_batch`` holds once for the whole batch, and
    answers every observation of it with the batch's span."""

    name = "instances"
    _ids = itertools.count()

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.instance_id = next(InstanceBackend._ids)

    def _answer(self, observation: Observation, start: float, size: int) -> PolicyAction:
        positions = observation.joint_state.position
        echo = float(positions[0]) if len(positions) else -1.0
        return PolicyAction(
            reference_frame=observation.reference_frame,
            joint_positions=(float(self.instance_id), start, time.monotonic(), float(size),
                             echo),
            joint_names=SPAN_NAMES,
            confidence=1.0,
        )  # fmt: skip

    @staticmethod
    def _hold(observations: Sequence[Observation]) -> None:
        for observation in observations:
            command, _, argument = observation.instruction.partition(" ")
            if command == "hold":
                hold_until(argument)

    def predict(self, observation: Observation) -> PolicyAction:
        start = time.monotonic()
        if observation.instruction.startswith("hold "):
            self._hold([observation])
            return self._answer(observation, start, 1)
        super().predict(observation)  # raise, sleep ... as ScriptedBackend
        return self._answer(observation, start, 1)

    def predict_batch(self, observations: Sequence[Observation]) -> list[Any]:
        start = time.monotonic()
        self._hold(observations)
        return [self._answer(o, start, len(observations)) for o in observations]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "instances-test-model", "device": "cpu",
                "instance": self.instance_id}  # fmt: skip


class SecondInstanceFailsBackend(StubBackend):
    """Loads once; a second object fails like a GPU with room for one copy."""

    name = "second-fails"
    _made = itertools.count()

    def __init__(self, **options: Any):
        if next(SecondInstanceFailsBackend._made) >= 1:
            raise OSError("CUDA out of memory\n(a second line that must not be shown)")
        super().__init__(**options)


class PlacedBackend(StubBackend):
    """Declares the shared ``device`` option and describes the device it was given, as
    a model backend does once its weights are on that device (nothing is loaded)."""

    name = "placed"
    OPTIONS = (DEVICE,)

    def __init__(self, device: str = "auto", **options: Any):
        super().__init__(**options)
        self.device = device

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "placed-test-model", "device": self.device}
