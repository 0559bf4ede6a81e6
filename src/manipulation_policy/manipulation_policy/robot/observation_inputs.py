"""Which inputs a decision is made from: the aggregated observation or the raw topics.

Pure decisions, no ROS. A perception node (upstream MobileManipulationCore's
``manipulation_perception``) may publish a ``manipulation_msgs/Observation``:
the camera image, the joint states and the base-to-end-effector transform of
one instant. With ``use_observation`` the nodes read it as upstream's node
does:

- while the newest aggregated observation is fresh (its stamp within
  ``observation_timeout_sec`` of the node clock, and, as for every camera
  frame, within ``max_observation_age_sec``), its image and joint states are
  the inputs; a part it does not carry (``has_rgb_image`` false, ...) comes
  from the raw topic instead;
- its ``base_to_ee`` transform is the current end-effector pose (the pose of
  the end-effector frame in the base frame), preferred to the pose on
  ``eef_pose_topic``;
- when it is stale, or none came, or ``use_observation`` is off, the raw
  topics (camera, joint states, end-effector pose) are the inputs.

Unlike upstream's node, an observation stamped zero (time unknown) is stale,
as a zero-stamped camera frame is: no command from data of unknown age.
The frame type is the caller's (the node keeps ROS messages in it).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

from manipulation_policy.core.policy_types import JointStateData, Pose, Quaternion, Vector3
from manipulation_policy.robot.scheduling import StampedPose

Frame = TypeVar("Frame")


@dataclass(frozen=True)
class ObservationSettings:
    use_observation: bool
    timeout_sec: float  # observation_timeout_sec, > 0
    max_image_age_sec: float = float("inf")  # max_observation_age_sec, > 0

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ObservationSettings:
        return cls(
            use_observation=bool(values["use_observation"]),
            timeout_sec=float(values["observation_timeout_sec"]),
            max_image_age_sec=float(values["max_observation_age_sec"]),
        )

    @property
    def fresh_within_sec(self) -> float:
        """An observation older than this is stale: its image would not be used anyway
        (no command from a stale image), so the raw topics take over."""
        return min(self.timeout_sec, self.max_image_age_sec)


@dataclass(frozen=True)
class Inputs(Generic[Frame]):
    """A set of inputs; None: this source has none of that part."""

    frame: Optional[Frame] = None
    joint_state: Optional[JointStateData] = None
    eef: Optional[StampedPose] = None


@dataclass(frozen=True)
class AggregatedObservation(Generic[Frame]):
    """The newest aggregated observation, its parts already converted."""

    stamp_ns: int  # header stamp, node-clock nanoseconds; 0: unknown
    inputs: Inputs[Frame]


class Source(enum.Enum):
    AGGREGATED = "the aggregated observation"
    RAW_OFF = "the raw topics (use_observation is false)"
    RAW_NONE = "the raw topics (no aggregated observation received)"
    RAW_STALE = "the raw topics (the aggregated observation is stale)"


@dataclass(frozen=True)
class Selection(Generic[Frame]):
    source: Source
    frame: Optional[Frame]
    joint_state: JointStateData
    # End-effector poses to try, preferred first (the scheduler takes the first usable).
    eef_candidates: tuple[StampedPose, ...]
    observation_age_ns: Optional[int] = None  # now - stamp of the aggregated observation


def observation_age_ns(stamp_ns: int, now_ns: int) -> Optional[int]:
    """How old an observation stamped ``stamp_ns`` is; None for a zero (unknown) stamp."""
    return None if stamp_ns == 0 else now_ns - stamp_ns


def is_fresh(stamp_ns: int, now_ns: int, timeout_sec: float) -> bool:
    """Within ``timeout_sec`` of the node clock, either way (a stamp from the future is
    a clock problem, not a fresh observation); a zero stamp is never fresh."""
    age = observation_age_ns(stamp_ns, now_ns)
    return age is not None and abs(age) <= timeout_sec * 1e9


def select_inputs(
    aggregated: Optional[AggregatedObservation[Frame]],
    raw: Inputs[Frame],
    now_ns: int,
    settings: ObservationSettings,
) -> Selection[Frame]:
    """The inputs of the next decision (see the module docstring)."""
    raw_joints = raw.joint_state if raw.joint_state is not None else JointStateData()
    raw_eef = (raw.eef,) if raw.eef is not None else ()
    if not settings.use_observation:
        return Selection(Source.RAW_OFF, raw.frame, raw_joints, raw_eef)
    if aggregated is None:
        return Selection(Source.RAW_NONE, raw.frame, raw_joints, raw_eef)
    age = observation_age_ns(aggregated.stamp_ns, now_ns)
    if not is_fresh(aggregated.stamp_ns, now_ns, settings.fresh_within_sec):
        return Selection(Source.RAW_STALE, raw.frame, raw_joints, raw_eef, age)
    parts = aggregated.inputs
    return Selection(
        Source.AGGREGATED,
        parts.frame if parts.frame is not None else raw.frame,
        parts.joint_state if parts.joint_state is not None else raw_joints,
        ((parts.eef,) if parts.eef is not None else ()) + raw_eef,
        age,
    )


def eef_pose_from_transform(
    translation: Vector3,
    rotation: Quaternion,
    parent_frame: str,
    base_frame: str,
    stamp_ns: int,
) -> Optional[StampedPose]:
    """``base_to_ee`` as the current end-effector pose.

    The transform from the base frame (its ``header.frame_id``, the parent) to
    the end-effector frame is the end effector's pose in the base frame: its
    translation is the position, its rotation the orientation. The pose's frame
    is the transform's parent, else the observation's ``base_frame``. None when
    it cannot be a pose: a number that is not finite, or a rotation of length
    zero. Like a pose on ``eef_pose_topic``, it is then judged by the scheduler
    (its stamp's age, its frame against ``reference_frame``).
    """
    numbers = (translation.x, translation.y, translation.z,
               rotation.x, rotation.y, rotation.z, rotation.w)  # fmt: skip
    if not all(math.isfinite(v) for v in numbers):
        return None
    r = rotation
    norm_squared = r.x * r.x + r.y * r.y + r.z * r.z + r.w * r.w  # inf, not OverflowError
    if not (math.isfinite(norm_squared) and norm_squared > 1e-12):
        return None
    position = Vector3(translation.x, translation.y, translation.z)
    orientation = Quaternion(rotation.x, rotation.y, rotation.z, rotation.w)
    return StampedPose(Pose(position, orientation), stamp_ns, parent_frame or base_frame)
