"""The default backend: deterministic, no GPU, answers derived from the observation.

It exists so that the whole stack (nodes, server, launch, demo) runs and can
be tested anywhere. Its answers are synthetic (no model looks at anything),
which it says in the log when it starts and in ``describe()`` (so on the
server's /info). They are small and depend on every part of the observation,
so tests can tell answers to different observations apart:

- eef target: a delta of at most 1 cm per axis, from the mean colour of the
  image (red -> x, green -> y, blue -> z, mid-grey -> 0); the caller
  (``backends.predictor``) makes it absolute when the observation carries
  the current pose;
- joint deltas: each joint 10 % of the way back to zero, at most 0.05 rad
  (0 for a joint whose position is unknown, NaN);
- gripper: the image brightness in [0, 1], PolicyOutput's 0 = closed .. 1 = open,
  so a bright image opens it (no image: inactive);
- confidence: 0.5 (a hold is 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from manipulation_policy.core.policy_types import (
    EefTargetMode,
    Observation,
    PolicyAction,
    Pose,
    Vector3,
)

MAX_STEP_M = 0.01
MAX_JOINT_STEP = 0.05
JOINT_GAIN = 0.1
CONFIDENCE = 0.5
SYNTHETIC_NOTE = (
    "the stub backend's answers are synthetic (derived from image colour and joint "
    "positions, no model): do not drive a robot with them; use --backend openvla"
)

logger = logging.getLogger(__name__)


def joint_steps(positions: Sequence[float]) -> tuple[float, ...]:
    """Each joint JOINT_GAIN of the way back to zero, at most MAX_JOINT_STEP; 0 where
    the position is unknown (NaN). Plain floats: a robot's handful of joints is
    cheaper in Python than in numpy."""
    return tuple(
        max(-MAX_JOINT_STEP, min(MAX_JOINT_STEP, -JOINT_GAIN * float(p)))
        if math.isfinite(p) else 0.0
        for p in positions
    )


class StubBackend:
    name = "stub"
    OPTIONS = ()  # none; other backends' options given to it are ignored

    def __init__(self, **_ignored: Any):
        logger.warning(SYNTHETIC_NOTE)

    def predict(self, observation: Observation) -> PolicyAction:
        if observation.image is not None:
            mean_rgb = observation.image.reshape(-1, 3).mean(axis=0) / 255.0
            dx, dy, dz = (float(c) for c in (mean_rgb - 0.5) * 2 * MAX_STEP_M)
            gripper = float(mean_rgb.mean())
        else:
            dx = dy = dz = 0.0
            gripper = None

        positions = observation.joint_state.position
        joint_deltas = joint_steps(positions) if len(positions) else None

        return PolicyAction(
            reference_frame=observation.reference_frame,
            eef_target=Pose(position=Vector3(dx, dy, dz)),
            eef_target_mode=EefTargetMode.DELTA,
            joint_deltas=joint_deltas,
            gripper_command=gripper,
            base_velocity_hint=None,
            confidence=CONFIDENCE,
        )

    def predict_batch(self, observations: Sequence[Observation]) -> list[Any]:
        """One answer per observation, each what ``predict`` gives it alone; an
        observation that fails has its exception as its answer."""
        outcomes: list[Any] = []
        for observation in observations:
            try:
                outcomes.append(self.predict(observation))
            except Exception as exc:  # noqa: BLE001 - that observation's own answer
                outcomes.append(exc)
        return outcomes

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": "stub",
            "device": "cpu",
            "synthetic": True,
            "warning": SYNTHETIC_NOTE,
        }
