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
import typing
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
    eef_pose: current end-effector pose in reference_frame, when known; lets a
    delta-predicting model answer with an absolute target.
    action_overrides: the client's per-request scaling/clipping, if any.
    """

    joint_state: JointStateData = field(default_factory=JointStateData)
    image: Optional[np.ndarray] = None
    reference_frame: str = DEFAULT_REFERENCE_FRAME
    instruction: str = ""
    eef_pose: Optional[Pose] = None
    action_overrides: Optional[ActionOverrides] = None


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

    @classmethod
    def hold(cls, reference_frame: str = DEFAULT_REFERENCE_FRAME) -> PolicyAction:
        """The safe output: nothing to move, confidence 0."""
        return cls(reference_frame=reference_frame)

    @property
    def is_hold(self) -> bool:
        return (
            self.eef_target is None
            and self.joint_deltas is None
            and self.gripper_command is None
            and self.base_velocity_hint is None
            and self.confidence == 0.0
        )
