"""Backends for benchmarks only, loaded as ``bench_backends:Name`` with bench/ on PYTHONPATH.

FixedCostBackend simulates a memory-bound model on a GPU: every call costs
BENCH_CALL_MS (reading the weights once) plus BENCH_ITEM_MS per observation
in it, spent sleeping, so the server's batching can be measured on any
machine. Its answers are the stub's. It is a simulation, not a model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.policy_types import Observation, PolicyAction


class FixedCostBackend(StubBackend):
    name = "fixed-cost"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.call_s = float(os.environ.get("BENCH_CALL_MS", "30")) / 1e3
        self.item_s = float(os.environ.get("BENCH_ITEM_MS", "1")) / 1e3

    def predict(self, observation: Observation) -> PolicyAction:
        time.sleep(self.call_s + self.item_s)
        return super().predict(observation)

    def predict_batch(self, observations: Sequence[Observation]) -> list[Any]:
        time.sleep(self.call_s + self.item_s * len(observations))
        return [StubBackend.predict(self, observation) for observation in observations]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": f"simulated: {self.call_s * 1e3:g} ms/call + {self.item_s * 1e3:g} ms/item",
            "device": "cpu",
        }
