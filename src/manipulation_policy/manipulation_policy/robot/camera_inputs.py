"""Several cameras and the robot's state vector: pure decisions, no ROS.

A robot for a LeRobot-style policy names its cameras (``camera_topics`` with
``camera_names``: the policy's image feature names) and says how its state vector is
laid out (``state_joints``, then the end-effector pose with ``state_eef_pose``).

- Cameras: each keeps its newest frame. A *set* is the newest frame of each camera,
  ready when every camera has one and every stamp is within
  ``camera_sync_tolerance_sec`` of the first camera's. The first camera's new frame
  triggers a set (the node's scheduler takes it as "the" frame: its rate, freshness and
  "each frame used once" apply to it), so no set is sent twice; another camera's frame
  arriving late completes a set that waited for it.
- State: the positions of ``state_joints`` in that order from the joint states, then
  x, y, z, qx, qy, qz, qw of the current end-effector pose. A joint missing from the
  joint states, or unknown (NaN), or no usable pose: no state, and nothing is sent.
- Configuration: the cameras' names and the state's length are checked against what
  the policy declares it reads (``core/policy_inputs``), once, at configure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

# The wire's bounds on named cameras and the state: a robot configured past them could
# never be answered.
from manipulation_policy.core.contract import (
    CAMERA_NAME_PATTERN,
    MAX_CAMERAS,
    MAX_STATE_LENGTH,
)
from manipulation_policy.core.policy_inputs import inputs_problem
from manipulation_policy.core.policy_types import JointStateData, PolicyInputs, Pose

EEF_POSE_VALUES = 7  # x, y, z, qx, qy, qz, qw
COMPRESSED_SUFFIX = "/compressed"

F = TypeVar("F")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class CameraSpec:
    name: str  # the policy's image feature name ("wrist" for observation.images.wrist)
    topic: str  # subscribed topic
    compressed: bool  # sensor_msgs/CompressedImage (else sensor_msgs/Image)


def camera_specs(
    topics: Sequence[str], names: Sequence[str], image_transport: str
) -> tuple[CameraSpec, ...]:
    """The cameras to subscribe to, first camera first; empty for today's one camera.

    A topic ending in ``/compressed`` is a CompressedImage topic as it is; any other
    follows ``image_transport`` (compressed: ``<topic>/compressed``), so one robot may
    mix raw and compressed cameras. Call ``camera_parameters_problem`` first."""
    compressed_transport = image_transport.strip().lower() == "compressed"
    specs = []
    for name, topic in zip(names, topics, strict=True):
        if topic.rstrip("/").endswith(COMPRESSED_SUFFIX):
            specs.append(CameraSpec(name, topic.rstrip("/"), True))
        elif compressed_transport:
            specs.append(CameraSpec(name, topic.rstrip("/") + COMPRESSED_SUFFIX, True))
        else:
            specs.append(CameraSpec(name, topic, False))
    return tuple(specs)


def camera_name_problem(names: Sequence[str]) -> Optional[str]:
    """Why ``camera_names`` alone is refused (pattern, count, repeats); None if fine."""
    if len(names) > MAX_CAMERAS:
        return f"must hold at most {MAX_CAMERAS} names, got {len(names)}"
    for index, name in enumerate(names):
        if not CAMERA_NAME_PATTERN.fullmatch(name):
            return (f"[{index}] {name!r} is not a camera name (letters, digits, _ . -, "
                    "at most 64, not starting with . or -)")
    if len(set(names)) != len(names):
        return "must not name a camera twice"
    return None


def camera_topics_problem(topics: Sequence[str]) -> Optional[str]:
    """Why ``camera_topics`` alone is refused (empty names, spaces, count, repeats)."""
    if len(topics) > MAX_CAMERAS:
        return f"must hold at most {MAX_CAMERAS} topics, got {len(topics)}"
    for index, topic in enumerate(topics):
        if not topic or any(ch.isspace() for ch in topic):
            return f"[{index}] must be a non-empty topic name without spaces, got {topic!r}"
    if len(set(topics)) != len(topics):
        return "must not name a topic twice"
    return None


def camera_parameters_problem(values: Mapping[str, Any]) -> Optional[str]:
    """What makes ``camera_topics`` and ``camera_names`` disagree ("camera_names ..."),
    each alone assumed checked; None when they agree."""
    topics, names = tuple(values["camera_topics"]), tuple(values["camera_names"])
    if len(topics) != len(names):
        return (f"camera_names must name each of camera_topics (the policy's image "
                f"feature names, same order): {len(names)} names for {len(topics)} topics")
    return None


@dataclass(frozen=True)
class StateLayout:
    joints: tuple[str, ...] = ()  # joint_states names, in the state's order
    eef_pose: bool = False  # then x, y, z, qx, qy, qz, qw of the end-effector pose

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> StateLayout:
        return cls(tuple(values["state_joints"]), bool(values["state_eef_pose"]))

    @property
    def length(self) -> Optional[int]:
        """The state vector's length; None: the robot sends no state."""
        if not self.joints and not self.eef_pose:
            return None
        return len(self.joints) + (EEF_POSE_VALUES if self.eef_pose else 0)


def state_joints_problem(joints: Sequence[str]) -> Optional[str]:
    if len(joints) > MAX_STATE_LENGTH - EEF_POSE_VALUES:
        return f"must hold at most {MAX_STATE_LENGTH - EEF_POSE_VALUES} joints, got {len(joints)}"
    if any(not name.strip() for name in joints):
        return "must not hold an empty name"
    if len(set(joints)) != len(joints):
        return "must not name a joint twice"
    return None


def configuration_problem(
    required: PolicyInputs, camera_names: Sequence[str], layout: StateLayout
) -> Optional[str]:
    """One line saying why the node's cameras and state do not fit what the policy
    reads, naming the camera or the state length; None when they fit. A node without
    ``camera_names`` sends its one camera as ``image``, which a one-camera policy takes."""
    problem = inputs_problem(
        required, camera_names, layout.length, has_single_image=not camera_names
    )
    if problem is None:
        return None
    if problem.field == "state":
        where = (f"state_joints has {len(layout.joints)}"
                 + (f" + {EEF_POSE_VALUES} with state_eef_pose" if layout.eef_pose else ""))
        return f"the policy does not fit this robot: state {problem.message} ({where})"
    return (f"the policy does not fit this robot: {problem.field} {problem.message} "
            "(camera_names)")


# ---------------------------------------------------------------- camera sets


@dataclass(frozen=True)
class CameraSet(Generic[F]):
    """The frames of one set by camera name, or why there is none (``problem``)."""

    frames: Optional[Mapping[str, F]]
    problem: Optional[str] = None

    @property
    def ready(self) -> bool:
        return self.frames is not None


def pair_cameras(
    names: Sequence[str],
    newest: Mapping[str, Optional[F]],
    stamp_ns: Callable[[F], int],
    tolerance_sec: float,
) -> CameraSet[F]:
    """The set of the newest frames of ``names`` (the first camera's stamp is the set's):
    ready when every camera has a frame within ``tolerance_sec`` of the first's; else
    which camera is missing or how far off its newest frame is."""
    frames = {}
    reference: Optional[int] = None
    for name in names:
        frame = newest.get(name)
        if frame is None:
            return CameraSet(None, f"camera {name}: no frame yet")
        stamp = stamp_ns(frame)
        if reference is None:
            reference = stamp
        elif abs(stamp - reference) > tolerance_sec * 1e9:
            offset = (stamp - reference) / 1e9
            return CameraSet(
                None,
                f"camera {name}: newest frame is {abs(offset):.3f} s "
                f"{'after' if offset > 0 else 'before'} {names[0]}'s "
                f"(camera_sync_tolerance_sec={tolerance_sec:g})",
            )
        frames[name] = frame
    return CameraSet(frames)


# ---------------------------------------------------------------- the state vector


@dataclass(frozen=True)
class StateVector:
    """The state to send (None: none configured, or none can be made: ``problem``)."""

    values: Optional[tuple[float, ...]]
    problem: Optional[str] = None


def state_vector(
    layout: StateLayout, joint_state: JointStateData, eef_pose: Optional[Pose]
) -> StateVector:
    """The state vector of ``layout`` (see the module docstring)."""
    if layout.length is None:
        return StateVector(None)
    positions = dict(zip(joint_state.name, joint_state.position, strict=False))
    values: list[float] = []
    for name in layout.joints:
        if name not in positions:
            shown = ", ".join(joint_state.name) if joint_state.name else "none received"
            return StateVector(
                None, f"state: joint {name!r} is not in the joint states ({shown})"
            )
        value = float(positions[name])
        if not math.isfinite(value):
            return StateVector(None, f"state: joint {name!r} position is unknown ({value})")
        values.append(value)
    if layout.eef_pose:
        if eef_pose is None:
            return StateVector(
                None, "state: no usable end-effector pose (state_eef_pose is true)"
            )
        p, q = eef_pose.position, eef_pose.orientation
        pose = (p.x, p.y, p.z, q.x, q.y, q.z, q.w)
        if not all(math.isfinite(v) for v in pose):
            return StateVector(None, "state: the end-effector pose is not finite")
        values.extend(float(v) for v in pose)
    return StateVector(tuple(values))
