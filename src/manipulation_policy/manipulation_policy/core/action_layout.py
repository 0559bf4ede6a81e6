"""What each dimension of a policy's raw action vector means. Pure Python, no ROS, no torch.

A policy trained with LeRobot answers plain vectors; the robot's configuration says
what each entry is, as text with one entry per action dimension, comma-separated
(the ``action_layout`` option):

- ``joint_position:NAME``  absolute target of joint NAME (rad, or m if prismatic)
- ``joint_delta:NAME``     change of joint NAME's position
- ``eef_delta:AXIS``       end-effector delta, AXIS one of x y z roll pitch yaw
- ``eef_pose:AXIS``        absolute end-effector pose, same axes
- ``gripper``              the gripper, mapped linearly so ``gripper_closed`` is 0.0
                           (closed) and ``gripper_open`` is 1.0 (open), clipped to [0, 1]
- ``base:vx|vy|wz``        base velocity hint (m/s, rad/s)
- ``ignore``               a dimension the robot does not use

An end-effector axis the layout does not name is 0 (no motion for a delta). A layout
mixes neither joint positions with joint deltas nor eef deltas with eef poses (one
action has one meaning per part). A model's vector carries no probability: every
action gets ``VECTOR_CONFIDENCE`` (1.0, a model answer; a hold is 0), so the guard's
``min_confidence`` (at most 1) never drops it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from manipulation_policy.core.policy_types import (
    DEFAULT_REFERENCE_FRAME,
    EefTargetMode,
    PolicyAction,
    Pose,
    Twist,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_from_rpy
from manipulation_policy.core.upstream_compat import VECTOR_CONFIDENCE

EEF_AXES = ("x", "y", "z", "roll", "pitch", "yaw")
BASE_AXES = ("vx", "vy", "wz")
# kind -> the names it takes (None: any joint name; (): no name at all)
KINDS: dict[str, Optional[tuple[str, ...]]] = {
    "joint_position": None,
    "joint_delta": None,
    "eef_delta": EEF_AXES,
    "eef_pose": EEF_AXES,
    "gripper": (),
    "base": BASE_AXES,
    "ignore": (),
}
MAX_ENTRIES = 256  # the wire's bound on joint arrays
JOINT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,127}$")


@dataclass(frozen=True)
class LayoutEntry:
    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True)
class ActionLayout:
    entries: tuple[LayoutEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def names_of(self, kind: str) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries if e.kind == kind)

    def __str__(self) -> str:
        return ",".join(str(e) for e in self.entries)


def layout_problem(text: object) -> Optional[str]:
    """Why ``text`` is not an action layout (one line), None when it is."""
    try:
        parse_action_layout(text)
    except ValueError as exc:
        return str(exc)
    return None


def parse_action_layout(text: object) -> ActionLayout:
    """The layout of ``text``; ValueError with one line naming the bad entry."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "must list one entry per action dimension, e.g. "
            "joint_position:shoulder,joint_position:elbow,gripper"
        )
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_ENTRIES:
        raise ValueError(f"has {len(parts)} entries, at most {MAX_ENTRIES}")
    entries = []
    seen: dict[str, int] = {}
    for index, part in enumerate(parts, start=1):
        kind, _, name = (p.strip() for p in part.partition(":"))
        where = f"entry {index} {part!r}"
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
        allowed = KINDS[kind]
        if allowed is None:
            if not JOINT_NAME.match(name):
                raise ValueError(f"{where}: {kind} needs a joint name, as {kind}:NAME")
        elif not allowed:
            if name:
                raise ValueError(f"{where}: {kind} takes no name")
        elif name not in allowed:
            raise ValueError(f"{where}: {kind} needs one of {'|'.join(allowed)}")
        entry = LayoutEntry(kind, name)
        key = str(entry) if kind != "ignore" else f"ignore#{index}"
        if kind in ("joint_position", "joint_delta"):
            key = f"joint:{name}"  # one joint once, whichever of the two
        if key in seen:
            raise ValueError(f"{where}: repeats entry {seen[key]}")
        seen[key] = index
        entries.append(entry)
    kinds = {e.kind for e in entries}
    if {"joint_position", "joint_delta"} <= kinds:
        raise ValueError("mixes joint_position and joint_delta: one action has one joint mode")
    if {"eef_delta", "eef_pose"} <= kinds:
        raise ValueError("mixes eef_delta and eef_pose: one action has one end-effector mode")
    return ActionLayout(tuple(entries))


def gripper_command(raw: float, closed: float, open_: float) -> float:
    """``raw`` mapped linearly so ``closed`` -> 0.0 and ``open_`` -> 1.0, clipped to [0, 1]."""
    if closed == open_:
        raise ValueError("gripper_closed and gripper_open must differ")
    return min(1.0, max(0.0, (raw - closed) / (open_ - closed)))


def _twist(base: dict[str, float]) -> Twist:
    return Twist(
        Vector3(base.get("vx", 0.0), base.get("vy", 0.0), 0.0),
        Vector3(0.0, 0.0, base.get("wz", 0.0)),
    )


def to_action(
    layout: ActionLayout,
    vector: Sequence[float],
    gripper_closed: float = 0.0,
    gripper_open: float = 1.0,
    reference_frame: str = DEFAULT_REFERENCE_FRAME,
) -> PolicyAction:
    """One raw action vector as a PolicyAction. ValueError when its length is not the
    layout's or a value is not finite."""
    values = [float(v) for v in vector]
    if len(values) != len(layout):
        raise ValueError(
            f"the action has {len(values)} values, the action_layout {len(layout)} entries"
        )
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"action value {index} ({layout.entries[index]}) is {value}")
    joints: list[tuple[str, float]] = []
    eef: dict[str, float] = {}
    base: dict[str, float] = {}
    gripper: Optional[float] = None
    joint_mode = eef_mode = ""
    for entry, value in zip(layout.entries, values, strict=True):
        if entry.kind in ("joint_position", "joint_delta"):
            joints.append((entry.name, value))
            joint_mode = entry.kind
        elif entry.kind in ("eef_delta", "eef_pose"):
            eef[entry.name] = value
            eef_mode = entry.kind
        elif entry.kind == "base":
            base[entry.name] = value
        elif entry.kind == "gripper":
            gripper = gripper_command(value, gripper_closed, gripper_open)
    names = tuple(name for name, _ in joints) or None
    positions = tuple(value for _, value in joints) or None
    eef_target = None
    if eef:
        axis = {a: eef.get(a, 0.0) for a in EEF_AXES}
        eef_target = Pose(
            Vector3(axis["x"], axis["y"], axis["z"]),
            quaternion_from_rpy(axis["roll"], axis["pitch"], axis["yaw"]),
        )
    return PolicyAction(
        reference_frame=reference_frame,
        eef_target=eef_target,
        eef_target_mode=EefTargetMode.ABSOLUTE if eef_mode == "eef_pose" else EefTargetMode.DELTA,
        joint_deltas=positions if joint_mode == "joint_delta" else None,
        joint_positions=positions if joint_mode == "joint_position" else None,
        joint_names=names,
        gripper_command=gripper,
        base_velocity_hint=_twist(base) if base else None,
        confidence=VECTOR_CONFIDENCE,
    )
