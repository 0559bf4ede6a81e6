"""A simulated chunk-predicting policy for bench_chunks.py (a server plugin backend).

    --backend bench_chunk_backend:SimChunkBackend   (bench/ on PYTHONPATH)

Set by environment variables: BENCH_LATENCY_MS (time per answer, slept),
BENCH_CHUNK_H (actions per chunk), BENCH_PERIOD_SEC (time between them).
Each chunk follows one smooth trajectory, x(t) = 0.05 sin(pi t / 2) m (at
most 4 mm per 50 ms step) at the time each step is due, plus an offset that
alternates +-1 cm from one answer to the next: successive chunks disagree, as
a real model's do, so the merges differ.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import (
    ActionChunk,
    EefTargetMode,
    Observation,
    PolicyAction,
    Pose,
    Vector3,
)

DISAGREEMENT_M = 0.01


def target_x(t: float) -> float:
    return 0.05 * math.sin(math.pi * t / 2.0)


class SimChunkBackend(StubBackend):
    name = "sim-chunk"

    def __init__(self, **_ignored: Any):
        self.latency_sec = float(os.environ.get("BENCH_LATENCY_MS", "200")) / 1000.0
        self.length = int(os.environ.get("BENCH_CHUNK_H", "8"))
        self.period = float(os.environ.get("BENCH_PERIOD_SEC", "0.05"))
        self._answers = 0

    def predict(self, observation: Observation) -> ActionChunk:
        start = time.time()  # the node clock is the system clock: ~ the observation's stamp
        time.sleep(self.latency_sec)
        self._answers += 1
        offset = DISAGREEMENT_M if self._answers % 2 else -DISAGREEMENT_M
        actions = tuple(
            PolicyAction(
                reference_frame=observation.reference_frame,
                eef_target=Pose(Vector3(target_x(start + i * self.period) + offset, 0.0, 0.3)),
                eef_target_mode=EefTargetMode.ABSOLUTE,
                gripper_command=1.0,
                confidence=0.9,
            )
            for i in range(self.length)
        )
        return ActionChunk(actions, self.period)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "simulated chunks", "device": "cpu",
                "synthetic": True}
