"""A backend that reads named cameras and a state vector, for the several-camera tests.

Loaded in-process (``PolicyNode(backend=...)``) or by the policy server as
``camera_test_backends:CamerasAndStateBackend`` (the tests put this directory on the
server's PYTHONPATH). It declares what it reads (``inputs()``: cameras ``wrist`` and
``front``, a state of 3 values), refuses an observation that does not fit, and answers
with what it received, so an output proves which frame reached which name and in
which order the state came: ``joint_deltas`` = the mean red value (0..255) of each
camera in the declared order, then the state as received, then the length of
``robot_id`` (who sent it: the remote node names itself).
"""

from __future__ import annotations

import threading
from typing import Any

from manipulation_policy.core.policy_inputs import check_observation, named_images
from manipulation_policy.core.policy_types import Observation, PolicyAction, PolicyInputs

IMAGE_NAMES = ("wrist", "front")
STATE_LENGTH = 3


class CamerasAndStateBackend:
    name = "cameras-and-state"

    def __init__(self, **_options: Any):
        self.observations: list[Observation] = []
        self._lock = threading.Lock()

    def inputs(self) -> PolicyInputs:
        return PolicyInputs(IMAGE_NAMES, STATE_LENGTH, None)

    def predict(self, observation: Observation) -> PolicyAction:
        check_observation(self.inputs(), observation)
        with self._lock:
            self.observations.append(observation)
        images = named_images(self.inputs(), observation)
        reds = tuple(float(images[name][..., 0].mean()) for name in IMAGE_NAMES)
        state = tuple(observation.state or ())
        values = reds + state + (len(observation.robot_id),)
        return PolicyAction(
            reference_frame=observation.reference_frame,
            joint_deltas=values,
            # Named, so they need not be one per joint the robot sent.
            joint_names=tuple(f"red_{name}" for name in IMAGE_NAMES)
            + tuple(f"state_{i}" for i in range(len(state))) + ("robot_id_length",),
            confidence=1.0,
        )

    def received(self) -> list[Observation]:
        with self._lock:
            return list(self.observations)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "cameras-and-state-test", "device": "cpu"}
