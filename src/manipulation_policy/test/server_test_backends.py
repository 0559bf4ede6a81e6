"""Backends for policy server tests, loaded by the server as ``server_test_backends:Name``
(the tests put this directory on the server's PYTHONPATH).

ScriptedBackend behaves like the stub unless the instruction asks otherwise:
``sleep <seconds>`` (then answer), ``raise`` (an internal failure),
``need image`` (refuses an observation without image, as OpenVLA does),
``nan`` (a broken model output), ``answer <kind>`` (an answer that breaks the
response contract, see BAD_ANSWERS), ``raise huge`` (a 2 MB exception message),
``raise base`` (a BaseException that is not an Exception).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    Observation,
    PolicyAction,
    Pose,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_from_rpy

# answer <kind> -> (the action, the response field the server must name)
BAD_ANSWERS = {
    "deltas-str": (PolicyAction(joint_deltas="abc"), "joint_deltas"),
    "confidence-str": (PolicyAction(confidence="high"), "confidence"),
    "frame-none": (PolicyAction(reference_frame=None), "reference_frame"),
    "confidence-5": (PolicyAction(confidence=5.0), "confidence"),
    "confidence-neg": (PolicyAction(confidence=-3.0), "confidence"),
    "gripper-7": (PolicyAction(gripper_command=7.0), "gripper_command"),
    "frame-surrogate": (PolicyAction(reference_frame="\ud800"), "reference_frame"),
    "not-an-action": ({"confidence": 1.0}, "body"),
}


class CustomBaseError(BaseException):
    pass


class ScriptedBackend(StubBackend):
    name = "scripted"

    def predict(self, observation: Observation) -> PolicyAction:
        command, _, argument = observation.instruction.partition(" ")
        if command == "sleep":
            time.sleep(float(argument))
        elif command == "raise" and argument == "huge":
            raise RuntimeError("x" * 2_000_000)
        elif command == "raise" and argument == "base":
            raise CustomBaseError("a BaseException from the backend")
        elif command == "raise":
            raise RuntimeError("simulated CUDA error: device-side assert triggered")
        elif command == "answer":
            return BAD_ANSWERS[argument][0]
        elif command == "need" and observation.image is None:
            raise InputError("image", "this backend needs a camera image")
        elif command == "nan":
            return PolicyAction(confidence=math.nan)
        return super().predict(observation)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "scripted-test-model", "device": "cpu"}


class UnloadableBackend:
    """Fails like a model whose weights are missing."""

    name = "unloadable"

    def __init__(self, **_options: Any):
        raise OSError("no weights at /models/missing\n(a second line that must not be shown)")


FIXED_DELTA = PolicyAction(
    eef_target=Pose(Vector3(0.01, -0.02, 0.005), quaternion_from_rpy(0.0, 0.0, 0.1)),
    eef_target_mode=EefTargetMode.DELTA,
    gripper_command=0.25,
    confidence=0.5,
)
FIXED_ABSOLUTE = PolicyAction(
    eef_target=Pose(Vector3(0.3, 0.1, 0.4)),
    eef_target_mode=EefTargetMode.ABSOLUTE,
    confidence=0.5,
)


class FixedDeltaBackend:
    """Answers FIXED_DELTA whatever the observation (eef_pose included): a backend that
    never composes; the instruction ``absolute`` gets FIXED_ABSOLUTE instead."""

    name = "fixed-delta"

    def __init__(self, **_options: Any):
        pass

    def predict(self, observation: Observation) -> PolicyAction:
        answer = FIXED_ABSOLUTE if observation.instruction == "absolute" else FIXED_DELTA
        return replace(answer, reference_frame=observation.reference_frame)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "fixed", "device": "cpu"}
