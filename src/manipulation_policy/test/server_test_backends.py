"""Backends for policy server tests, loaded by the server as ``server_test_backends:Name``
(the tests put this directory on the server's PYTHONPATH).

ScriptedBackend behaves like the stub unless the instruction asks otherwise:
``sleep <seconds>`` (then answer), ``raise`` (an internal failure),
``need image`` (refuses an observation without image, as OpenVLA does),
``nan`` (a broken model output), ``answer <kind>`` (an answer that breaks the
response contract, see BAD_ANSWERS), ``raise huge`` (a 2 MB exception message),
``raise base`` (a BaseException that is not an Exception).

ChunkedBackend answers action chunks (see its docstring); FixedDeltaBackend a
fixed delta whatever it sees; CamerasBackend declares the cameras and state it reads
and echoes what it got.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_inputs import named_images
from manipulation_policy.core.policy_types import (
    MAX_CHUNK_LENGTH,
    ActionChunk,
    EefTargetMode,
    Observation,
    PolicyAction,
    PolicyInputs,
    Pose,
    Twist,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_from_rpy
from manipulation_policy.server.process import ServerProcess

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
    "positions-str": (PolicyAction(joint_positions="abc"), "joint_positions"),
    "positions-nan": (PolicyAction(joint_positions=(0.0, math.nan)), "joint_positions[1]"),
    "names-int": (PolicyAction(joint_positions=(0.0,), joint_names=(3,)), "joint_names[0]"),
    "names-mismatch": (PolicyAction(joint_positions=(0.0,), joint_names=("a", "b")), "body"),
    "names-surrogate": (PolicyAction(joint_positions=(0.0,), joint_names=("\udc00",)),
                        "joint_names"),
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


class CamerasBackend(StubBackend):
    """A two-camera policy with a state of 3 (``INPUTS``) that echoes what it got: its
    answer's joint_positions are the state, then each camera's mean pixel value, then
    0.0 for the robot id; joint_names say which (``state[i]``, ``<camera>:<W>x<H>`` in
    the policy's camera order, ``robot_id=<id>``)."""

    name = "cameras"
    INPUTS = PolicyInputs(("wrist", "front"), state_length=3, action_length=5)

    def inputs(self) -> PolicyInputs:
        return self.INPUTS

    def predict(self, observation: Observation) -> PolicyAction:
        images = named_images(self.INPUTS, observation)
        state = tuple(observation.state or ())
        names = [f"state[{index}]" for index in range(len(state))]
        names += [f"{name}:{rgb.shape[1]}x{rgb.shape[0]}" for name, rgb in images.items()]
        names.append(f"robot_id={observation.robot_id}")
        values = state + tuple(float(rgb.mean()) for rgb in images.values()) + (0.0,)
        return PolicyAction(
            reference_frame=observation.reference_frame,
            joint_positions=values,
            joint_names=tuple(names),
            confidence=1.0,
        )

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "cameras-test-model", "device": "cpu"}


class BadInputsBackend(StubBackend):
    """Declares its inputs as something that is not a PolicyInputs."""

    name = "bad-inputs"

    def inputs(self) -> Any:
        return {"image_names": ["wrist"]}


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


# ------------------------------------------------------------------ chunks

CHUNK_PERIOD_SEC = 0.1
DEFAULT_CHUNK_LENGTH = 5
STEP_YAW = 0.05


def chunk_step(index: int, frame: str, joint_count: int) -> PolicyAction:
    """Step ``index`` of ChunkedBackend's chunks: a delta of 1 cm along x and a turn of
    STEP_YAW about z, different from the other steps in y, z, joints and gripper."""
    return PolicyAction(
        reference_frame=frame,
        eef_target=Pose(
            Vector3(0.01, 0.002 * (index % 5), -0.001 * (index % 7)),
            quaternion_from_rpy(0.0, 0.0, STEP_YAW),
        ),
        eef_target_mode=EefTargetMode.DELTA,
        joint_deltas=(0.01 * (1 + index % 9),) * joint_count if joint_count else None,
        gripper_command=(index % 11) / 10.0,
        confidence=0.5,
    )


def chunk_steps(length: int, frame: str = "base_link", joint_count: int = 0) -> ActionChunk:
    """The chunk ChunkedBackend answers to ``chunk <length>`` (before any composition)."""
    return ActionChunk(
        tuple(chunk_step(i, frame, joint_count) for i in range(length)), CHUNK_PERIOD_SEC
    )


def forged_chunk(actions: Sequence[Any], period: Any) -> ActionChunk:
    """An ActionChunk built around its own checks, as a careless plugin could."""
    chunk = object.__new__(ActionChunk)
    object.__setattr__(chunk, "actions", tuple(actions))
    object.__setattr__(chunk, "action_period_sec", period)
    return chunk


def _with_step(chunk: ActionChunk, index: int, **changes: Any) -> ActionChunk:
    actions = list(chunk.actions)
    actions[index] = replace(actions[index], **changes)
    return forged_chunk(actions, chunk.action_period_sec)


def _with_item(chunk: ActionChunk, index: int, item: Any) -> ActionChunk:
    actions = list(chunk.actions)
    actions[index] = item
    return forged_chunk(actions, chunk.action_period_sec)


# bad <kind> -> (the broken chunk made of a good one of 6 steps, the field the server names)
BAD_CHUNKS: dict[str, tuple[Callable[[ActionChunk], Any], str]] = {
    "later-confidence-5": (lambda c: _with_step(c, 3, confidence=5.0), "actions[3].confidence"),
    "first-confidence-5": (lambda c: _with_step(c, 0, confidence=5.0), "confidence"),
    "later-gripper-neg": (
        lambda c: _with_step(c, 5, gripper_command=-0.5), "actions[5].gripper_command"
    ),
    "later-deltas-str": (lambda c: _with_step(c, 2, joint_deltas="abc"), "actions[2].joint_deltas"),
    "later-nan-position": (
        lambda c: _with_step(
            c, 4, eef_target=Pose(Vector3(math.nan, 0.0, 0.0)), eef_target_mode="absolute"
        ),
        "actions[4].eef_target_pose.position.x",
    ),
    "later-mode": (lambda c: _with_step(c, 1, eef_target_mode="up"), "actions[1].eef_target_mode"),
    "later-not-an-action": (lambda c: _with_item(c, 1, {"confidence": 1.0}), "actions[1]"),
    "later-other-frame": (
        lambda c: _with_step(c, 2, reference_frame="odom"), "actions[2].reference_frame"
    ),
    "too-long": (
        lambda c: forged_chunk(c.actions * 43, CHUNK_PERIOD_SEC), "actions"  # 258 actions
    ),
    "empty": (lambda c: forged_chunk((), CHUNK_PERIOD_SEC), "actions"),
    "period-20": (lambda c: ActionChunk(c.actions, 20.0), "action_period_sec"),
    "period-zero": (lambda c: forged_chunk(c.actions, 0.0), "action_period_sec"),
    "period-nan": (lambda c: forged_chunk(c.actions, math.nan), "action_period_sec"),
    "period-str": (lambda c: forged_chunk(c.actions, "0.1"), "action_period_sec"),
}
assert len(chunk_steps(6).actions * 43) > MAX_CHUNK_LENGTH


def reckless_chunk(frame: str = "base_link", joint_count: int = 3) -> ActionChunk:
    """A misbehaving model's chunk, every value well formed (the wire takes it), several
    over the limits of RECKLESS_LIMITS: step 1 leaps (joints, end effector, gripper),
    step 2 boxes and speeds, step 3 is unsure (refused: a hold, the plan dropped), so
    step 4 is never published."""

    def step(**parts: Any) -> PolicyAction:
        return PolicyAction(reference_frame=frame, **{"confidence": 0.5, **parts})

    joints = (0.01,) * joint_count
    return ActionChunk((
        step(eef_target=Pose(Vector3(0.01, 0.0, 0.0)), joint_deltas=joints,
             gripper_command=0.0),
        step(eef_target=Pose(Vector3(0.3, 0.0, 0.4)),
             joint_deltas=tuple((1.0, -1.0, 0.0)[i % 3] for i in range(joint_count)),
             gripper_command=1.0),
        step(eef_target=Pose(Vector3(5.0, 0.0, 0.2)), eef_target_mode=EefTargetMode.ABSOLUTE,
             base_velocity_hint=Twist(Vector3(3.0, 4.0, 0.0), Vector3(0.0, 0.0, 0.5))),
        step(joint_deltas=joints, confidence=0.1),
        step(joint_deltas=joints),
    ), RECKLESS_PERIOD_SEC)


def joint_leap_chunk(frame: str = "base_link") -> ActionChunk:
    """Absolute joint targets leaping 0.5 rad a step, for the wrist and the elbow named in
    that order (not the joint states' order): what JOINT_LEAP_LIMITS make of it depends
    on matching them by name and stepping from the previous target."""
    return ActionChunk(tuple(
        PolicyAction(reference_frame=frame, joint_positions=(0.9 + 0.5 * k, -0.2 - 0.5 * k),
                     joint_names=("wrist", "elbow"), confidence=0.5)
        for k in range(1, 5)
    ), RECKLESS_PERIOD_SEC)


# The node parameters joint_leap_chunk breaks.
JOINT_LEAP_LIMITS = {"max_joint_delta": 0.1, "joint_limit_names": ["elbow"],
                     "joint_position_min": [-0.35], "joint_position_max": [1.0]}

# Long enough that the first step is not late yet when a loaded machine answers.
RECKLESS_PERIOD_SEC = 0.3
# The node parameters reckless_chunk breaks (the others at their defaults).
RECKLESS_LIMITS = {"min_confidence": 0.3, "max_gripper_rate": 2.0}


class ChunkedBackend(ScriptedBackend):
    """A chunk-predicting model. By its instruction:

    - ``chunk <n>``: ``chunk_steps(n)`` in the request's frame, one joint delta per joint;
    - ``bad <kind>``: a broken chunk (BAD_CHUNKS);
    - ``echo pending``: the request's pending actions as the chunk, its period the
      request's pending_delay_sec (what the backend was given, sent back);
    - ``reckless``: ``reckless_chunk``, well formed but over the robot's limits;
    - ``leap``: ``joint_leap_chunk``, absolute joint targets over JOINT_LEAP_LIMITS;
    - anything else: as ScriptedBackend (``sleep``, ``raise`` ..., else the stub's one
      action), so a single-step answer comes from the same server.
    """

    name = "chunked"

    def predict(self, observation: Observation) -> Any:
        command, _, argument = observation.instruction.partition(" ")
        frame = observation.reference_frame
        joints = len(observation.joint_state.name)
        if command == "chunk":
            return chunk_steps(int(argument), frame, joints)
        if command == "bad":
            return BAD_CHUNKS[argument][0](chunk_steps(6, frame, joints))
        if command == "echo":
            return ActionChunk(observation.pending_actions, observation.pending_delay_sec)
        if command == "reckless":
            return reckless_chunk(frame, joints)
        if command == "leap":
            return joint_leap_chunk(frame)
        return super().predict(observation)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "chunked-test-model", "device": "cpu"}


def chunked_server(*flags: str) -> ServerProcess:
    """A policy server process of ChunkedBackend (start it with ``with``), no API key."""
    return ServerProcess(
        "--backend", "server_test_backends:ChunkedBackend", "--no-access-log", *flags,
        env={API_KEY_ENV: ""}, extra_pythonpath=[str(Path(__file__).resolve().parent)],
    )  # fmt: skip
