"""Plain data types that travel between the ROS side, the wire and the backends.

No ROS, no torch: everything between the two ROS conversions is testable
without either. Optional fields stand for the message's has_* flags: a
PolicyAction with ``eef_target=None`` publishes ``has_eef_target=False``.

Vector3 / Quaternion / Pose / Twist are the one pose and twist type of the
package. The wire models (contract) and geometry_msgs share their field names;
``geometry_parts`` describes them once and drives every conversion
(contract's ``pose_to_wire`` ..., ros_conversion's ``pose_to_msg`` ...).
"""

from __future__ import annotations

import enum
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, TypeVar, Union

import numpy as np


@dataclass(frozen=True)
class Vector3:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


@dataclass(frozen=True)
class Quaternion:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0
    w: float = 1.0


@dataclass(frozen=True)
class Pose:
    position: Vector3 = field(default_factory=Vector3)
    orientation: Quaternion = field(default_factory=Quaternion)


@dataclass(frozen=True)
class Twist:
    linear: Vector3 = field(default_factory=Vector3)
    angular: Vector3 = field(default_factory=Vector3)


Geometry = Union[Vector3, Quaternion, Pose, Twist]
GEOMETRY_TYPES = (Vector3, Quaternion, Pose, Twist)
G = TypeVar("G", Vector3, Quaternion, Pose, Twist)


@functools.cache
def geometry_parts(kind: type) -> tuple[tuple[str, Optional[type]], ...]:
    """(field name, geometry type of the field or None for a number), in field order.

    Vector3 / Quaternion / Pose / Twist share their field names with the wire
    models (contract.PointModel ...) and geometry_msgs, so this one description
    drives every conversion to and from them."""
    hints = typing.get_type_hints(kind)
    return tuple(
        (f.name, hints[f.name] if hints[f.name] in GEOMETRY_TYPES else None) for f in fields(kind)
    )


def geometry_from(kind: type[G], source: Any) -> G:
    """A ``kind`` read from any object with the same attribute names (a wire model,
    a geometry_msgs message, another plain value)."""
    return kind(
        *(
            geometry_from(part, getattr(source, name)) if part else getattr(source, name)
            for name, part in geometry_parts(kind)
        )
    )


def geometry_to_dict(value: Geometry, kind: Optional[type] = None) -> dict[str, Any]:
    """The nested JSON object of a pose, twist, vector or quaternion (the wire's shape)."""
    return {
        name: geometry_to_dict(getattr(value, name), part) if part else getattr(value, name)
        for name, part in geometry_parts(kind or type(value))
    }


@dataclass(frozen=True)
class JointStateData:
    """sensor_msgs/JointState without the header; velocity/effort may be empty."""

    name: tuple[str, ...] = ()
    position: tuple[float, ...] = ()
    velocity: tuple[float, ...] = ()
    effort: tuple[float, ...] = ()


DEFAULT_REFERENCE_FRAME = "base_link"

Bounds = tuple[float, float]


@dataclass(frozen=True)
class ActionOverrides:
    """Per-request action post-processing a client asked for (upstream's ``openvla_*``
    request fields); ``None`` keeps the server's own setting. Checked by the contract."""

    position_scale: Optional[float] = None
    rotation_scale: Optional[float] = None
    clip_actions: Optional[bool] = None
    position_bounds: Optional[Bounds] = None
    rotation_bounds: Optional[Bounds] = None
    gripper_bounds: Optional[Bounds] = None


@dataclass(frozen=True, eq=False)
class Observation:
    """What a policy sees at one instant.

    image: HxWx3 uint8 RGB array, or None when no camera frame is available.
    images: the named cameras of a several-camera policy (name -> HxWx3 uint8 RGB),
    one set of frames taken together; empty for a one-camera robot, whose frame is
    ``image``.
    state: the robot's state vector in the layout the robot is configured with
    (joint positions in a configured order, then the end-effector pose where
    configured), for a policy that reads one; None when the robot sends none.
    robot_id: who sends the observation (the remote node's name), for a policy that
    keeps a history per robot; empty when not said.
    eef_pose: current end-effector pose in reference_frame, when known; lets a
    delta-predicting model answer with an absolute target.
    action_overrides: the client's per-request scaling/clipping, if any.
    pending_actions: the not-yet-executed rest of the chunk the robot is executing
    (oldest first, in reference_frame), for a model that conditions on it (real-time
    chunking); empty when the robot executes nothing or does not say.
    pending_delay_sec: how long the robot expects the pending actions to keep running
    before this observation's answer takes over (the inference delay), when known.
    A backend that cannot use the last two ignores them.
    """

    joint_state: JointStateData = field(default_factory=JointStateData)
    image: Optional[np.ndarray] = None
    reference_frame: str = DEFAULT_REFERENCE_FRAME
    instruction: str = ""
    eef_pose: Optional[Pose] = None
    action_overrides: Optional[ActionOverrides] = None
    pending_actions: tuple[PolicyAction, ...] = ()
    pending_delay_sec: Optional[float] = None
    images: Mapping[str, np.ndarray] = field(default_factory=dict)
    state: Optional[tuple[float, ...]] = None
    robot_id: str = ""


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy reads and answers, as its checkpoint declares it; the robot's
    configuration is checked against it before anything is sent.

    image_names: the named cameras it needs (``Observation.images``); empty for a
    policy that reads the one ``image`` or none.
    state_length: the length of the state vector it needs; None when it reads none.
    action_length: the length of its raw action vector, before the action layout
    turns it into a PolicyAction; None for a model that answers PolicyActions itself.
    """

    image_names: tuple[str, ...] = ()
    state_length: Optional[int] = None
    action_length: Optional[int] = None


class EefTargetMode(str, enum.Enum):
    ABSOLUTE = "absolute"
    DELTA = "delta"


@dataclass(frozen=True)
class PolicyAction:
    """One decision of a policy. ``None`` means "this part says nothing"."""

    reference_frame: str = DEFAULT_REFERENCE_FRAME
    eef_target: Optional[Pose] = None
    eef_target_mode: EefTargetMode = EefTargetMode.DELTA
    joint_deltas: Optional[tuple[float, ...]] = None
    gripper_command: Optional[float] = None  # 0.0 closed .. 1.0 open (upstream's, OpenVLA's)
    base_velocity_hint: Optional[Twist] = None
    confidence: float = 0.0
    # Absolute joint position targets (rad, or m for prismatic joints): what a policy
    # trained on joint positions (most LeRobot ones) answers. Never deltas.
    joint_positions: Optional[tuple[float, ...]] = None
    # The joints joint_positions and joint_deltas name, in their order (each then has
    # this length); None: the observation's joint_states order (upstream's meaning).
    joint_names: Optional[tuple[str, ...]] = None

    @classmethod
    def hold(cls, reference_frame: str = DEFAULT_REFERENCE_FRAME) -> PolicyAction:
        """The safe output: nothing to move, confidence 0."""
        return cls(reference_frame=reference_frame)

    @property
    def is_hold(self) -> bool:
        return (
            self.eef_target is None
            and self.joint_deltas is None
            and self.joint_positions is None
            and self.gripper_command is None
            and self.base_velocity_hint is None
            and self.confidence == 0.0
        )


# A policy answers at most this many actions at once (the wire and the executor's bound).
MAX_CHUNK_LENGTH = 256
# A chunk of one is published on arrival and opens no timeline, so its period only
# says how long its one action lasts where nothing else says so.
SINGLE_ACTION_PERIOD_SEC = 1.0


@dataclass(frozen=True)
class ActionChunk:
    """An ordered list of actions and the time between consecutive ones.

    Action i is due at the observation's stamp + i * action_period_sec. A
    single-step model answers a chunk of one (``ActionChunk.of``). All actions
    share one reference frame: the executor blends and composes them as one
    trajectory.
    """

    actions: tuple[PolicyAction, ...]
    action_period_sec: float

    def __post_init__(self) -> None:
        if not isinstance(self.actions, tuple):
            object.__setattr__(self, "actions", tuple(self.actions))
        if not self.actions:
            raise ValueError("an action chunk needs at least one action")
        if len(self.actions) > MAX_CHUNK_LENGTH:
            raise ValueError(
                f"an action chunk holds at most {MAX_CHUNK_LENGTH} actions, "
                f"not {len(self.actions)}"
            )
        for index, action in enumerate(self.actions):
            if not isinstance(action, PolicyAction):
                kind = type(action).__name__
                raise TypeError(f"actions[{index}] is a {kind}, not a PolicyAction")
        period = self.action_period_sec
        if isinstance(period, bool) or not isinstance(period, (int, float)):
            raise TypeError(f"action_period_sec must be a number, not {type(period).__name__}")
        if not (math.isfinite(period) and period > 0):
            raise ValueError(f"action_period_sec must be finite and > 0, not {period}")
        frames = {action.reference_frame for action in self.actions}
        if len(frames) > 1:
            raise ValueError(f"an action chunk has one reference frame, not {sorted(frames)}")

    @classmethod
    def of(cls, action: PolicyAction, action_period_sec: Optional[float] = None) -> ActionChunk:
        """A chunk of one: what a single-step model (or upstream's server) answers."""
        period = SINGLE_ACTION_PERIOD_SEC if action_period_sec is None else action_period_sec
        return cls((action,), period)

    @property
    def reference_frame(self) -> str:
        return self.actions[0].reference_frame

    def __len__(self) -> int:
        return len(self.actions)


def as_chunk(answer: Union[PolicyAction, ActionChunk]) -> ActionChunk:
    """A backend's answer as a chunk: a PolicyAction becomes a chunk of one."""
    if isinstance(answer, ActionChunk):
        return answer
    if isinstance(answer, PolicyAction):
        return ActionChunk.of(answer)
    kind = type(answer).__name__
    raise TypeError(f"a policy answers a PolicyAction or an ActionChunk, not {kind}")
