"""The safety guard: the last check of every action before it is published. No ROS.

Both nodes run every command through one ``SafetyGuard`` (``check``), an
immediate action and each due step of a chunk alike, on the node's parameters
(``GuardLimits``, one field per parameter of ``node_parameters.GUARD_PARAMETERS``).
A hold passes unchanged. An action is either *refused* (a hold is published
instead, the plan is dropped, the reason counted, logged and reported on
/diagnostics) or *clamped* limit by limit into what the robot allows:

Refused (nothing sensible can be made of it):

- any non-finite number (NaN, inf) anywhere in the action;
- ``joint_names`` that name a joint twice or do not hold one name per joint
  value (which joint a value is for would be a guess);
- an end-effector orientation that is not a unit quaternion (off by more than
  QUATERNION_NORM_TOLERANCE): no rotation can be trusted from it;
- a confidence outside [0, 1], or below ``min_confidence``;
- a gripper command outside [0, 1];
- an absolute joint target (``joint_positions``) for a joint whose position is
  unknown (not in the observation's joint states, or NaN there) and that has
  no earlier target to step from: its step cannot be limited;
- an absolute end-effector target when the step reference (below) lies outside
  the workspace box: no target is both inside the box and within
  ``max_eef_step_m`` of it, so neither limit could be kept by clamping.

Clamped (the direction the policy chose is kept, the size is cut):

- ``workspace_min`` / ``workspace_max``: an absolute end-effector target's
  position is clamped axis by axis into the box (reference frame). Delta
  targets are not boxed (the pose they lead from is the controller's).
- ``max_eef_step_m``: the translation of a step is scaled down to this length:
  a delta's own translation; for an absolute target the distance from the
  step reference. The step cap is applied before the box clamp (the box is
  convex, so the clamped point stays within the cap of a reference inside it).
- ``max_eef_step_rad``: the rotation of a step (a delta's rotation, or an
  absolute target's rotation from the reference orientation) is cut to this
  angle about the same axis (a slerp from the reference).
- The step reference of an absolute target is the last absolute target the
  guard let out, unless the observation's current end-effector pose was taken
  after that target was due (the arm's measured pose is then the newer word on
  where it is: after an idle time, a stop, a new task); with neither, none
  (then only the box applies). Within a chunk, and where a new chunk takes over
  a plan still running, the reference is the previous step's target. A pose
  with a non-finite position is no reference; one whose orientation is not a
  unit quaternion caps no rotation.
- Which joint a joint value is for: the action's ``joint_names`` entry of the
  same index where it has them, else the observation's joint state name at
  that index (upstream's meaning). Its current position is the joint state's
  position of that name.
- ``max_joint_delta`` (every joint), or the joint's own ``joint_max_deltas``
  entry where ``joint_limit_names`` names it: each joint delta is clamped to
  [-cap, cap].
- ``joint_position_min`` / ``joint_position_max`` (per named joint): the delta
  is clamped so that current position + delta stays within them (a joint
  already outside may only move back towards them). Where the current position
  is unknown (NaN or absent) the delta of a limited joint is clamped to 0.
- Absolute joint targets (``joint_positions``) are held to the same limits as
  the step they ask for: target - reference, clamped as a delta is (position
  limits, then the cap; the direction kept), reference + that step is the
  target let out. The reference is the joint's last target the guard let out,
  unless the observation was taken after it was due (then the observation's
  position of the joint), as for end-effector targets: within a chunk each step
  is limited from the step before, not from where the arm was when it was seen.
- ``max_gripper_rate`` (full range per second; 0: no limit): the gripper
  command moves at most rate x dt from the last one let out, dt being the time
  between their due times (0 or less: no change). The first command after a
  ``reset`` has nothing to be compared with and goes out as it is: the gripper's
  actual opening is not in the observation, and a guessed reference could only
  be wrong.
- ``max_base_linear_speed`` / ``max_base_angular_speed``: the base velocity
  hint's linear and angular vectors are scaled down to these speeds.

Holds and refused actions leave the references as they were; the node calls
``reset`` after a refusal (the plan is dropped with it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    PolicyAction,
    Pose,
    Quaternion,
    Twist,
    Vector3,
)
from manipulation_policy.core.pose_math import quaternion_multiply

QUATERNION_NORM_TOLERANCE = 1e-3

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class GuardLimits:
    """The guard's limits; field names are the node parameters' names. The defaults are
    the parameters' defaults: they let the stub's, OpenVLA's and upstream's answers
    through untouched while keeping a wild answer to a short, slow move."""

    workspace_min: Vector = (-1.5, -1.5, -1.5)  # m, reference frame
    workspace_max: Vector = (1.5, 1.5, 1.5)
    max_eef_step_m: float = 0.1
    max_eef_step_rad: float = 0.5
    max_joint_delta: float = 0.25  # rad (or m for prismatic joints), per step
    joint_limit_names: tuple[str, ...] = ()
    joint_max_deltas: tuple[float, ...] = ()  # empty, or one per joint_limit_names
    joint_position_min: tuple[float, ...] = ()
    joint_position_max: tuple[float, ...] = ()
    max_gripper_rate: float = 10.0  # full range per second; 0: no limit
    max_base_linear_speed: float = 0.5  # m/s
    max_base_angular_speed: float = 1.0  # rad/s
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        problem = limits_problem(self)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> GuardLimits:
        """The limits from node parameter values (ValueError naming the field at fault)."""
        given = {}
        for f in fields(cls):
            value = values[f.name]
            if isinstance(value, (str, int, float)):
                given[f.name] = value if isinstance(value, str) else float(value)
            elif f.name == "joint_limit_names":
                given[f.name] = tuple(str(v) for v in value)
            else:
                given[f.name] = tuple(float(v) for v in value)
        return cls(**given)


def limits_problem(limits: Any) -> Optional[str]:
    """What makes limits (a GuardLimits or anything with its attributes) inconsistent,
    naming the field ("workspace_min[2] ..."), or None."""
    low, high = limits.workspace_min, limits.workspace_max
    for name, box in (("workspace_min", low), ("workspace_max", high)):
        if len(box) != 3:
            return f"{name} must hold 3 numbers (x, y, z), got {len(box)}"
    for axis in range(3):
        if not low[axis] < high[axis]:
            return (f"workspace_min[{axis}]={low[axis]:g} must be below "
                    f"workspace_max[{axis}]={high[axis]:g}")
    names = limits.joint_limit_names
    if len(set(names)) != len(names):
        return "joint_limit_names must not name a joint twice"
    for name in ("joint_max_deltas", "joint_position_min", "joint_position_max"):
        values = getattr(limits, name)
        if values and len(values) != len(names):
            return (f"{name} must be empty or hold one value per joint_limit_names entry "
                    f"({len(names)}), got {len(values)}")
    if any(not (0.0 < v < math.inf) for v in limits.joint_max_deltas):
        return "joint_max_deltas must all be finite numbers > 0"
    low, high = limits.joint_position_min, limits.joint_position_max
    if bool(low) != bool(high):
        return "joint_position_min and joint_position_max must be given together"
    for index, (a, b) in enumerate(zip(low, high, strict=True)):
        if not (math.isfinite(a) and math.isfinite(b) and a <= b):
            return (f"joint_position_min[{index}]={a:g} must be finite and at most "
                    f"joint_position_max[{index}]={b:g} ({names[index]})")
    return None


@dataclass(frozen=True)
class GuardContext:
    """What the guard needs to know of the moment and the observation an action answers."""

    now_sec: float  # when the command is due (node clock)
    joint_state: JointStateData = field(default_factory=JointStateData)
    eef_pose: Optional[Pose] = None  # the observation's current end-effector pose
    # When the observation (its eef_pose) was taken; None: unknown, not newer than anything.
    observation_sec: Optional[float] = None


@dataclass(frozen=True)
class GuardResult:
    action: PolicyAction  # what to publish: the clamped action, or a hold when refused
    refusal: Optional[str] = None  # why it was refused, naming the limit and the value
    refusal_code: Optional[str] = None  # the counter key of the refusal
    clamped: tuple[str, ...] = ()  # the limits that clamped it

    @property
    def refused(self) -> bool:
        return self.refusal is not None


REFUSAL_CODES = ("non_finite", "non_unit_quaternion", "confidence", "gripper_range",
                 "reference_outside_workspace", "unknown_joint_position", "joint_names")
CLAMP_NAMES = ("workspace", "eef_step_m", "eef_step_rad", "joint_delta", "joint_position",
               "gripper_rate", "base_linear_speed", "base_angular_speed")


class _Refused(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SafetyGuard:
    """Checks and clamps actions against ``GuardLimits`` (see the module docstring).
    Thread-safe: the worker thread and the executor's timer call it."""

    def __init__(self, limits: GuardLimits):
        self._lock = threading.Lock()
        self._limits = limits
        # The last absolute EEF target let out, and its due time.
        self._last_target: Optional[tuple[Pose, float]] = None
        self._last_gripper: Optional[tuple[float, float]] = None  # (command, due time)
        # The last absolute target of each joint let out: name -> (target, due time).
        self._last_joints: dict[str, tuple[float, float]] = {}
        self._counts = {**{f"refused_{c}": 0 for c in REFUSAL_CODES},
                        **{f"clamped_{c}": 0 for c in CLAMP_NAMES}}
        self._newest_refusal: Optional[str] = None

    @property
    def limits(self) -> GuardLimits:
        with self._lock:
            return self._limits

    def update_limits(self, limits: GuardLimits) -> None:
        with self._lock:
            self._limits = limits

    def reset(self) -> None:
        """Forget the step references (last target, last gripper command, last joint
        targets)."""
        with self._lock:
            self._last_target = None
            self._last_gripper = None
            self._last_joints = {}

    def copy(self) -> SafetyGuard:
        """A guard with these limits and references and no counts: to preview what a
        chunk's steps would become without touching this one."""
        with self._lock:
            twin = SafetyGuard(self._limits)
            twin._last_target, twin._last_gripper = self._last_target, self._last_gripper
            twin._last_joints = dict(self._last_joints)
        return twin

    def counts(self) -> dict[str, int]:
        """Refusals per reason code (``refused_<code>``), clamps per limit (``clamped_<limit>``)."""
        with self._lock:
            return dict(self._counts)

    def newest_refusal(self) -> Optional[str]:
        with self._lock:
            return self._newest_refusal

    def check(self, action: PolicyAction, context: GuardContext) -> GuardResult:
        """The action to publish for ``action`` (see the module docstring)."""
        if action.is_hold:
            return GuardResult(action)
        with self._lock:
            limits = self._limits
            clamped: list[str] = []
            try:
                _refuse_malformed(action, limits)
                checked = _Clamping(limits, context, clamped, self._last_target,
                                    self._last_gripper, self._last_joints).apply(action)
            except _Refused as refused:
                self._counts[f"refused_{refused.code}"] += 1
                self._newest_refusal = refused.reason
                return GuardResult(PolicyAction.hold(action.reference_frame), refused.reason,
                                   refused.code)
            for name in clamped:
                self._counts[f"clamped_{name}"] += 1
            if checked.eef_target is not None and checked.eef_target_mode is EefTargetMode.ABSOLUTE:
                self._last_target = (checked.eef_target, context.now_sec)
            if checked.gripper_command is not None:
                self._last_gripper = (checked.gripper_command, context.now_sec)
            if checked.joint_positions is not None:
                for index, target in enumerate(checked.joint_positions):
                    name = _joint_name(checked, context.joint_state, index)
                    self._last_joints[name] = (target, context.now_sec)
            return GuardResult(checked, clamped=tuple(clamped))


# ---------------------------------------------------------------- refusals


def _numbers(action: PolicyAction) -> list[tuple[str, float]]:
    found = [("confidence", action.confidence)]
    if action.gripper_command is not None:
        found.append(("gripper_command", action.gripper_command))
    for index, value in enumerate(action.joint_deltas or ()):
        found.append((f"joint_deltas[{index}]", value))
    for index, value in enumerate(action.joint_positions or ()):
        found.append((f"joint_positions[{index}]", value))
    if action.eef_target is not None:
        p, q = action.eef_target.position, action.eef_target.orientation
        found += [(f"eef_target.position.{a}", getattr(p, a)) for a in "xyz"]
        found += [(f"eef_target.orientation.{a}", getattr(q, a)) for a in "xyzw"]
    if action.base_velocity_hint is not None:
        for part in ("linear", "angular"):
            vector = getattr(action.base_velocity_hint, part)
            found += [(f"base_velocity_hint.{part}.{a}", getattr(vector, a)) for a in "xyz"]
    return found


def _refuse_malformed(action: PolicyAction, limits: GuardLimits) -> None:
    for name, value in _numbers(action):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Refused("non_finite", f"{name} is not a number ({value!r})")
        if not math.isfinite(value):
            raise _Refused("non_finite", f"{name} is {value!r}")
    if action.eef_target is not None:
        if not _is_unit(action.eef_target.orientation):
            norm = _norm4(action.eef_target.orientation)
            raise _Refused("non_unit_quaternion",
                           f"eef_target orientation is not a unit quaternion (length {norm:.6g})")
    if not 0.0 <= action.confidence <= 1.0:
        raise _Refused("confidence", f"confidence {action.confidence:.6g} outside [0, 1]")
    if action.confidence < limits.min_confidence:
        raise _Refused("confidence", f"confidence {action.confidence:.6g} below "
                                     f"min_confidence={limits.min_confidence:g}")
    gripper = action.gripper_command
    if gripper is not None and not 0.0 <= gripper <= 1.0:
        raise _Refused("gripper_range", f"gripper_command {gripper:.6g} outside [0, 1]")
    names = action.joint_names
    if names:
        if len(set(names)) != len(names):
            raise _Refused("joint_names", f"joint_names {list(names)!r:.200} name a joint twice")
        for label in ("joint_positions", "joint_deltas"):
            values = getattr(action, label)
            if values is not None and len(values) != len(names):
                raise _Refused("joint_names", f"{label} has {len(values)} values for "
                                              f"{len(names)} joint_names")


# ---------------------------------------------------------------- clamps


@dataclass
class _Clamping:
    limits: GuardLimits
    context: GuardContext
    clamped: list[str]
    last_target: Optional[tuple[Pose, float]]
    last_gripper: Optional[tuple[float, float]]
    last_joints: Mapping[str, tuple[float, float]]

    def apply(self, action: PolicyAction) -> PolicyAction:
        changes: dict[str, Any] = {}
        if action.eef_target is not None:
            if action.eef_target_mode is EefTargetMode.ABSOLUTE:
                changes["eef_target"] = self._absolute_target(action.eef_target)
            else:
                changes["eef_target"] = self._delta_target(action.eef_target)
        if action.joint_deltas is not None:
            changes["joint_deltas"] = self._joint_deltas(action)
        if action.joint_positions is not None:
            changes["joint_positions"] = self._joint_positions(action)
        if action.gripper_command is not None:
            changes["gripper_command"] = self._gripper(float(action.gripper_command))
        if action.base_velocity_hint is not None:
            changes["base_velocity_hint"] = self._base(action.base_velocity_hint)
        return replace(action, **changes)

    def _note(self, name: str) -> None:
        if name not in self.clamped:
            self.clamped.append(name)

    def _delta_target(self, delta: Pose) -> Pose:
        position = _capped_vector(_vec(delta.position), self.limits.max_eef_step_m)
        if position != _vec(delta.position):
            self._note("eef_step_m")
        orientation = delta.orientation  # kept as it is unless it is cut
        capped = _capped_rotation(_unit(orientation), self.limits.max_eef_step_rad)
        if capped is not None:
            self._note("eef_step_rad")
            orientation = capped
        return Pose(Vector3(*position), orientation)

    def _absolute_target(self, target: Pose) -> Pose:
        limits = self.limits
        reference = self._step_reference()
        position, orientation = _vec(target.position), target.orientation
        if reference is not None:
            start = _vec(reference.position)
            if not _inside(start, limits.workspace_min, limits.workspace_max):
                raise _Refused(
                    "reference_outside_workspace",
                    f"the end-effector reference {_fmt(start)} is outside the workspace "
                    f"{_fmt(limits.workspace_min)}..{_fmt(limits.workspace_max)}: no absolute "
                    f"target within max_eef_step_m={limits.max_eef_step_m:g} of it is inside",
                )
            step = _capped_vector(_sub(position, start), limits.max_eef_step_m)
            if step != _sub(position, start):
                self._note("eef_step_m")
                position = _add(start, step)
            if _is_unit(reference.orientation):
                start_q = _unit(reference.orientation)
                relative = _capped_rotation(
                    quaternion_multiply(_unit(orientation), _conjugate(start_q)),
                    limits.max_eef_step_rad,
                )
                if relative is not None:
                    self._note("eef_step_rad")
                    orientation = _unit(quaternion_multiply(relative, start_q))
        boxed = tuple(min(max(v, lo), hi) for v, lo, hi in
                      zip(position, limits.workspace_min, limits.workspace_max, strict=True))
        if boxed != position:
            self._note("workspace")
        return Pose(Vector3(*boxed), orientation)

    def _step_reference(self) -> Optional[Pose]:
        pose, taken = self.context.eef_pose, self.context.observation_sec
        if pose is not None and not all(map(math.isfinite, _vec(pose.position))):
            pose = None  # an unknown pose is no reference
        if self.last_target is None:
            return pose
        target, due = self.last_target
        if pose is not None and taken is not None and taken > due:
            return pose
        return target

    def _joint_deltas(self, action: PolicyAction) -> tuple[float, ...]:
        state = self.context.joint_state
        result = []
        for i, delta in enumerate(action.joint_deltas):
            name = _joint_name(action, state, i)
            result.append(self._joint_step(name, _joint_position(state, name), float(delta)))
        return tuple(result)

    def _joint_positions(self, action: PolicyAction) -> tuple[float, ...]:
        state = self.context.joint_state
        result = []
        for i, target in enumerate(action.joint_positions):
            target = float(target)
            name = _joint_name(action, state, i)
            reference = self._joint_reference(name, _joint_position(state, name))
            if not math.isfinite(reference):
                raise _Refused(
                    "unknown_joint_position",
                    f"joint_positions[{i}] targets joint {name!r}, whose current position "
                    "is unknown (not in the joint states, or NaN): its step cannot be limited",
                )
            step = target - reference
            allowed = self._joint_step(name, reference, step)
            result.append(target if allowed == step else reference + allowed)
        return tuple(result)

    def _joint_reference(self, name: str, position: float) -> float:
        """Where an absolute target of ``name`` steps from: its last target let out,
        unless the observation (its ``position``) is newer."""
        last = self.last_joints.get(name)
        if last is None:
            return position
        target, due = last
        taken = self.context.observation_sec
        if math.isfinite(position) and taken is not None and taken > due:
            return position
        return target

    def _joint_step(self, name: str, position: float, delta: float) -> float:
        """``delta`` from ``position`` for joint ``name``, within its limits."""
        limits = self.limits
        k = _limit_index(limits, name)
        cap = limits.joint_max_deltas[k] if k is not None and limits.joint_max_deltas \
            else limits.max_joint_delta
        if k is not None and limits.joint_position_min:
            low, high = limits.joint_position_min[k], limits.joint_position_max[k]
            if not math.isfinite(position):
                allowed = 0.0
            else:
                # Towards the range from outside it, within it inside.
                allowed = min(max(position + delta, min(low, position)),
                              max(high, position)) - position
            if allowed != delta:
                self._note("joint_position")
                delta = allowed
        if abs(delta) > cap:
            self._note("joint_delta")
            delta = math.copysign(cap, delta)
        return delta

    def _gripper(self, command: float) -> float:
        rate = self.limits.max_gripper_rate
        if rate <= 0.0 or self.last_gripper is None:
            return command
        last, at = self.last_gripper
        allowed = rate * max(0.0, self.context.now_sec - at)
        limited = min(max(command, last - allowed), last + allowed)
        if limited != command:
            self._note("gripper_rate")
        return limited

    def _base(self, hint: Twist) -> Twist:
        linear = _capped_vector(_vec(hint.linear), self.limits.max_base_linear_speed)
        angular = _capped_vector(_vec(hint.angular), self.limits.max_base_angular_speed)
        if linear != _vec(hint.linear):
            self._note("base_linear_speed")
        if angular != _vec(hint.angular):
            self._note("base_angular_speed")
        return Twist(Vector3(*linear), Vector3(*angular))


# ---------------------------------------------------------------- joint helpers


def _joint_name(action: PolicyAction, state: JointStateData, index: int) -> str:
    """The joint an action's ``index``-th joint value is for: its joint_names entry, else
    the joint state's name at that index (``#<index>`` when the state names none)."""
    if action.joint_names:
        return action.joint_names[index]
    return state.name[index] if index < len(state.name) else f"#{index}"


def _joint_position(state: JointStateData, name: str) -> float:
    """The joint state's position of ``name``; NaN when unknown."""
    try:
        index = state.name.index(name)
    except ValueError:
        return math.nan
    return float(state.position[index]) if index < len(state.position) else math.nan


def _limit_index(limits: GuardLimits, name: str) -> Optional[int]:
    try:
        return limits.joint_limit_names.index(name)
    except ValueError:
        return None


# ---------------------------------------------------------------- vector helpers


def _vec(v: Vector3) -> Vector:
    return (float(v.x), float(v.y), float(v.z))


def _add(a: Vector, b: Vector) -> Vector:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _sub(a: Vector, b: Vector) -> Vector:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


def _inside(point: Vector, low: Sequence[float], high: Sequence[float]) -> bool:
    return all(lo <= p <= hi for p, lo, hi in zip(point, low, high, strict=True))


def vector_length(v: Sequence[float]) -> float:
    """Euclidean length without overflow for finite components (1e308 stays finite)."""
    largest = max((abs(x) for x in v), default=0.0)
    if largest == 0.0 or not math.isfinite(largest):
        return largest
    return largest * math.sqrt(sum((x / largest) ** 2 for x in v))


def _capped_vector(v: Vector, cap: float) -> Vector:
    """``v`` scaled down to length ``cap`` when longer (the direction kept)."""
    length = vector_length(v)
    if length <= cap:
        return v
    largest = max(abs(x) for x in v)
    # Scaled in two stages so that components near the float limit do not overflow,
    # and shrunk by a hair so that rounding cannot leave it a hair over the cap.
    unit = tuple((x / largest) / (length / largest) for x in v)
    scale = cap * (1.0 - 1e-12)
    return (unit[0] * scale, unit[1] * scale, unit[2] * scale)


def _norm4(q: Quaternion) -> float:
    return vector_length((q.x, q.y, q.z, q.w))


def _is_unit(q: Quaternion) -> bool:
    return abs(_norm4(q) - 1.0) <= QUATERNION_NORM_TOLERANCE  # False for NaN too


def _unit(q: Quaternion) -> Quaternion:
    norm = _norm4(q)
    return Quaternion(q.x / norm, q.y / norm, q.z / norm, q.w / norm)


def _conjugate(q: Quaternion) -> Quaternion:
    return Quaternion(-q.x, -q.y, -q.z, q.w)


def rotation_angle(q: Quaternion) -> float:
    """The angle (0..pi) of the rotation a unit quaternion stands for."""
    return 2.0 * math.atan2(vector_length((q.x, q.y, q.z)), abs(q.w))


def _capped_rotation(q: Quaternion, cap: float) -> Optional[Quaternion]:
    """The rotation ``q`` cut to angle ``cap`` about its axis; None when within it."""
    if rotation_angle(q) <= cap:
        return None
    sign = 1.0 if q.w >= 0 else -1.0
    axis = vector_length((q.x, q.y, q.z))
    half = cap * (1.0 - 1e-12) / 2.0
    k = sign * math.sin(half) / axis
    return Quaternion(q.x * k, q.y * k, q.z * k, math.cos(half))
