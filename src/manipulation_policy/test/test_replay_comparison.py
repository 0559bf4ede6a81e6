"""The replay's per-step comparison: pairing, differences, the verdict. Pure, no bags."""

from __future__ import annotations

import math

from manipulation_policy.core.policy_types import EefTargetMode, PolicyAction, Pose, Vector3
from manipulation_policy.core.pose_math import quaternion_from_rpy
from manipulation_policy.replay.comparison import (
    Run,
    Step,
    Tolerances,
    compare_steps,
    percentile,
    summarize,
)


def action(x: float = 0.0, yaw: float = 0.0, gripper=0.5, joints=(0.1, 0.2)) -> PolicyAction:
    return PolicyAction(
        eef_target=Pose(Vector3(x, 0.0, 0.0), quaternion_from_rpy(0.0, 0.0, yaw)),
        eef_target_mode=EefTargetMode.DELTA, gripper_command=gripper,
        joint_deltas=joints, confidence=0.5,
    )


def test_pairs_by_stamp_and_step_and_measures_each_difference():
    base = [Step(1, 0, action()), Step(2, 0, action()), Step(3, 0, action())]
    cand = [Step(1, 0, action(x=0.003, yaw=0.01, gripper=0.52, joints=(0.1, 0.204))),
            Step(2, 0, action(x=0.02)), Step(4, 0, action())]
    diffs = compare_steps(base, cand, Tolerances())
    assert [(d.stamp_ns, d.within) for d in diffs] == [(1, True), (2, False), (3, False),
                                                        (4, False)]
    first = diffs[0]
    assert math.isclose(first.position_m, 0.003)
    assert math.isclose(first.rotation_rad, 0.01, rel_tol=1e-6)
    assert math.isclose(first.gripper, 0.02) and math.isclose(first.joint, 0.004)
    assert math.isclose(diffs[1].position_m, 0.02)
    assert (diffs[2].note, diffs[3].note) == ("not in the candidate", "not in the baseline")


def test_a_hold_against_a_command_is_never_within():
    [diff] = compare_steps([Step(1, 0, action())], [Step(1, 0, PolicyAction.hold())],
                           Tolerances(10, 10, 10, 10))
    assert not diff.within and "only one has an eef target" in diff.note


def test_absolute_joint_targets_are_compared_too():
    def targets(positions, names=("a", "b")) -> PolicyAction:
        return PolicyAction(joint_positions=positions, joint_names=names, confidence=0.5)

    base = [Step(1, 0, targets((0.5, 1.0))), Step(2, 0, targets((0.5, 1.0))),
            Step(3, 0, targets((0.5, 1.0))), Step(4, 0, targets((0.5, 1.0)))]
    cand = [Step(1, 0, targets((0.5, 1.003))), Step(2, 0, targets((0.5, 1.2))),
            Step(3, 0, targets((0.5, 1.0), ("b", "a"))),
            Step(4, 0, PolicyAction(joint_names=("a", "b")))]
    diffs = compare_steps(base, cand, Tolerances())
    assert [d.within for d in diffs] == [True, False, False, False]
    assert math.isclose(diffs[0].joint, 0.003) and math.isclose(diffs[1].joint, 0.2)
    assert "joint names differ" in diffs[2].note
    assert "only one has joint positions" in diffs[3].note


def test_the_verdict_counts_holds_failures_and_latency():
    base = Run("recorded", [Step(1, 0, action()), Step(2, 0, PolicyAction.hold())],
               [5.0, 7.0])
    cand = Run("replay", [Step(1, 0, action()), Step(2, 0, action())], [1.0, 2.0, 30.0], 1)
    diffs = compare_steps(base.steps, cand.steps, Tolerances(min_share=0.5))
    summary = summarize(base, cand, diffs, Tolerances(min_share=0.5))
    assert (summary.within, summary.steps, summary.share_within, summary.passed) == (
        1, 2, 0.5, True)
    assert (summary.baseline, summary.candidate) == ("recorded", "replay")
    assert summary.holds == {"baseline": 1, "candidate": 0}
    assert summary.failures == {"baseline": None, "candidate": 1}
    assert summary.latency_p50_ms == {"baseline": 5.0, "candidate": 2.0}
    assert summary.latency_p99_ms["candidate"] == 30.0
    strict = summarize(base, cand, diffs, Tolerances())
    assert not strict.passed


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
