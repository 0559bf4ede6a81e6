"""Per-step comparison of two runs over the same recorded observations. Pure, no ROS.

Pairing: a command is identified by the observation it was decided from and its place
in that observation's chunk, ``(header.stamp, step_index)``; request ids differ
between runs and are not used. A step only one run published (the other skipped that
frame, or its plan ended earlier) is unpaired and counts as outside the tolerances.

For each pair: the distance between the end-effector target positions (m), the angle
between their orientations (rad), the largest joint difference (joint deltas and
absolute joint position targets alike) and the gripper difference. A pair is within
tolerance when every difference is within its tolerance and both agree on what is
commanded at all (a target, joint deltas, joint positions, the joints they name, a
gripper command, the target's mode); one side's hold against the other's command is a
difference too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

from manipulation_policy.core.policy_types import PolicyAction

StepKey = tuple[int, int]  # (observation stamp ns, step index)
INF = math.inf


@dataclass(frozen=True)
class Step:
    """One published command of a run."""

    stamp_ns: int
    step_index: int
    action: PolicyAction
    due_ns: int = 0  # when it is due (PolicyOutput.due)

    @property
    def key(self) -> StepKey:
        return (self.stamp_ns, self.step_index)


@dataclass
class Run:
    """What one run published, and how its requests went."""

    name: str
    steps: list[Step] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    failures: Optional[int] = None  # None: not known (a recording of a live node)

    @property
    def holds(self) -> int:
        return sum(1 for step in self.steps if step.action.is_hold)


@dataclass(frozen=True)
class Tolerances:
    position_m: float = 0.005
    rotation_rad: float = 0.02
    joint: float = 0.005
    gripper: float = 0.05
    min_share: float = 1.0  # of the steps that must be within all tolerances


@dataclass(frozen=True)
class StepDifference:
    stamp_ns: int
    step_index: int
    position_m: float
    rotation_rad: float
    joint: float
    gripper: float
    within: bool
    note: str = ""  # why a pair that cannot be measured differs, or which side lacks it


def _quaternion_angle(a, b) -> float:
    """The angle of the rotation from orientation ``a`` to ``b`` (radians, 0..pi)."""
    na = math.sqrt(a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w)
    nb = math.sqrt(b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w)
    if na == 0.0 or nb == 0.0:
        return INF
    dot = abs(a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w) / (na * nb)
    return 2.0 * math.acos(min(1.0, dot))


def differences(a: PolicyAction, b: PolicyAction) -> tuple[float, float, float, float, str]:
    """(position, rotation, joint, gripper, note) between two commands."""
    notes = []
    position = rotation = joint = gripper = 0.0
    if (a.eef_target is None) != (b.eef_target is None):
        position = rotation = INF
        notes.append("only one has an eef target")
    elif a.eef_target is not None and b.eef_target is not None:
        if a.eef_target_mode != b.eef_target_mode:
            notes.append("eef target modes differ")
            position = rotation = INF
        else:
            pa, pb = a.eef_target.position, b.eef_target.position
            position = math.dist((pa.x, pa.y, pa.z), (pb.x, pb.y, pb.z))
            rotation = _quaternion_angle(a.eef_target.orientation, b.eef_target.orientation)
    if a.joint_names != b.joint_names:
        joint = INF
        notes.append("joint names differ")
    else:
        joint = max(
            _joint_difference(a.joint_deltas, b.joint_deltas, "joint deltas", notes),
            _joint_difference(a.joint_positions, b.joint_positions, "joint positions", notes),
        )
    if (a.gripper_command is None) != (b.gripper_command is None):
        gripper = INF
        notes.append("only one commands the gripper")
    elif a.gripper_command is not None and b.gripper_command is not None:
        gripper = abs(a.gripper_command - b.gripper_command)
    return position, rotation, joint, gripper, "; ".join(notes)


def _joint_difference(
    a: Optional[Sequence[float]], b: Optional[Sequence[float]], what: str, notes: list
) -> float:
    """The largest difference between two commands' joint values of one kind."""
    if (a is None) != (b is None):
        notes.append(f"only one has {what}")
        return INF
    if a is None or b is None:
        return 0.0
    if len(a) != len(b):
        notes.append(f"{what}: joint counts differ")
        return INF
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def compare_steps(
    baseline: Sequence[Step], candidate: Sequence[Step], tolerances: Tolerances
) -> list[StepDifference]:
    """One entry per step of either run, in (stamp, step) order (see the module docstring)."""
    first = {}
    for step in baseline:
        first.setdefault(step.key, step)
    second = {}
    for step in candidate:
        second.setdefault(step.key, step)
    result = []
    for key in sorted(set(first) | set(second)):
        if key not in second or key not in first:
            side = "candidate" if key not in second else "baseline"
            result.append(StepDifference(*key, INF, INF, INF, INF, False, f"not in the {side}"))
            continue
        position, rotation, joint, gripper, note = differences(first[key].action,
                                                               second[key].action)
        within = (
            not note
            and position <= tolerances.position_m
            and rotation <= tolerances.rotation_rad
            and joint <= tolerances.joint
            and gripper <= tolerances.gripper
        )
        result.append(StepDifference(*key, position, rotation, joint, gripper, within, note))
    return result


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q`` (0..100) percentile, nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    baseline: str
    candidate: str
    tolerances: Tolerances
    steps: int
    paired: int
    only_baseline: int
    only_candidate: int
    within: int
    share_within: float
    passed: bool
    max_position_m: float
    max_rotation_rad: float
    max_joint: float
    max_gripper: float
    # Each by run: {"baseline": ..., "candidate": ...}.
    holds: dict[str, int]
    failures: dict[str, Optional[int]]
    latency_p50_ms: dict[str, Optional[float]]
    latency_p99_ms: dict[str, Optional[float]]

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(
    baseline: Run, candidate: Run, diffs: Sequence[StepDifference], tolerances: Tolerances
) -> Summary:
    paired = [d for d in diffs if not d.note.startswith("not in the")]
    within = sum(1 for d in diffs if d.within)
    share = within / len(diffs) if diffs else 1.0

    def largest(values) -> float:
        return max(values, default=0.0)

    runs = {"baseline": baseline, "candidate": candidate}
    return Summary(
        baseline=baseline.name,
        candidate=candidate.name,
        tolerances=tolerances,
        steps=len(diffs),
        paired=len(paired),
        only_baseline=sum(1 for d in diffs if d.note == "not in the candidate"),
        only_candidate=sum(1 for d in diffs if d.note == "not in the baseline"),
        within=within,
        share_within=share,
        passed=share >= tolerances.min_share,
        max_position_m=largest(d.position_m for d in paired),
        max_rotation_rad=largest(d.rotation_rad for d in paired),
        max_joint=largest(d.joint for d in paired),
        max_gripper=largest(d.gripper for d in paired),
        holds={role: run.holds for role, run in runs.items()},
        failures={role: run.failures for role, run in runs.items()},
        latency_p50_ms={role: percentile(run.latencies_ms, 50) for role, run in runs.items()},
        latency_p99_ms={role: percentile(run.latencies_ms, 99) for role, run in runs.items()},
    )
