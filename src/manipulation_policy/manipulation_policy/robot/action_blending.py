"""What several overlapping chunks say for one due time, made into one action.

The weights: ACT's temporal ensembling (Zhao et al. 2023, "Learning Fine-Grained
Bimanual Manipulation with Low-Cost Hardware", Algorithm 2; LeRobot's
``ACTTemporalEnsembler`` in lerobot/common/policies/act/modeling_act.py follows
it): the i-th prediction for a time step, i = 0 the oldest, weighs exp(-m * i),
normalized to sum to 1. m = 0 weighs all alike; m > 0 favours older predictions,
which is what ACT runs with (m = 0.01). Crossfade: linear from old to new.

The mean: ``blend`` keeps the newest action's gripper, confidence, target mode,
and which parts are present (its has_* flags); a part is averaged only where
every action has it in the same shape (same target mode, same joint count),
otherwise the newest's value stands. Joint values (deltas, absolute position
targets) are averaged only where every action names the same joints (the same
``joint_names``, or none at all, with the same count). Poses:
pose_math.weighted_mean_pose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Optional

from manipulation_policy.core.policy_types import PolicyAction, Twist
from manipulation_policy.core.pose_math import weighted_mean_pose, weighted_mean_vector


def ensemble_weights(count: int, m: float) -> list[float]:
    """ACT's weights for ``count`` predictions of one time step, oldest first."""
    weights = [math.exp(-m * i) for i in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


def crossfade_weight(faded_steps: int, crossfade_steps: int) -> float:
    """The new chunk's weight at its ``faded_steps``-th published step (1 = its first):
    1/n, 2/n, ... 1 over n = crossfade_steps; n = 1 is replace."""
    return min(1.0, faded_steps / crossfade_steps)


def blend(actions: Sequence[PolicyAction], weights: Sequence[float]) -> PolicyAction:
    """The weighted mean of ``actions`` (the last one the newest), see the module docstring."""
    newest = actions[-1]
    if len(actions) == 1:
        return newest
    # The heaviest orientation anchors the hemisphere: it can never weigh 0.
    reference = max(range(len(weights)), key=weights.__getitem__)
    targets = [a.eef_target for a in actions]
    same_joints = all(a.joint_names == newest.joint_names for a in actions)
    twists = [a.base_velocity_hint for a in actions]
    return replace(
        newest,
        eef_target=(
            weighted_mean_pose(targets, weights, reference)
            if _all_present(targets)
            and all(a.eef_target_mode == newest.eef_target_mode for a in actions)
            else newest.eef_target
        ),
        joint_deltas=_mean_joints([a.joint_deltas for a in actions], weights, same_joints),
        joint_positions=_mean_joints(
            [a.joint_positions for a in actions], weights, same_joints
        ),
        base_velocity_hint=(
            Twist(
                linear=weighted_mean_vector([t.linear for t in twists], weights),
                angular=weighted_mean_vector([t.angular for t in twists], weights),
            )
            if _all_present(twists)
            else newest.base_velocity_hint
        ),
    )


def _mean_joints(
    values: Sequence[Optional[tuple[float, ...]]], weights: Sequence[float], same_joints: bool
) -> Optional[tuple[float, ...]]:
    """The weighted mean of one kind of joint values, or the newest's where they differ
    in which joints they name."""
    if same_joints and _all_present(values) and len({len(v) for v in values}) == 1:
        return _mean_tuple(values, weights)
    return values[-1]


def _all_present(parts: Sequence[Optional[object]]) -> bool:
    return all(part is not None for part in parts)


def _mean_tuple(values: Sequence[tuple[float, ...]], weights: Sequence[float]) -> tuple[float, ...]:
    total = sum(weights)
    return tuple(
        sum(w * v[k] for v, w in zip(values, weights, strict=True)) / total
        for k in range(len(values[0]))
    )
