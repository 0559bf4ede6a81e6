"""The executor's settings, and the checks the nodes reuse for their parameters.

``setting_problem(name, value)`` is the one spec: it names the setting and says
why a value is refused (or returns None), so a parameter callback can hand the
reason back as it is. ``ExecutorSettings`` raises the same message.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional


class ChunkMerge(str, enum.Enum):
    """How a new chunk meets the steps of older ones that are not yet due."""

    REPLACE = "replace"  # the new chunk wins from its first step
    TEMPORAL_ENSEMBLE = "temporal_ensemble"  # ACT's weighted average over every chunk
    CROSSFADE = "crossfade"  # old to new, linear over crossfade_steps


DEFAULT_ENSEMBLE_WEIGHT = 0.01  # ACT's m (the original work's and LeRobot's default)
DEFAULT_CROSSFADE_STEPS = 4


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_problem(value: Any) -> Optional[str]:
    names = [m.value for m in ChunkMerge]
    if isinstance(value, ChunkMerge) or value in names:
        return None
    return f"chunk_merge must be one of {', '.join(names)}, not {value!r}"


def _ensemble_weight_problem(value: Any) -> Optional[str]:
    if _is_number(value) and math.isfinite(value) and value >= 0:
        return None
    return f"ensemble_weight must be a finite number >= 0, not {value!r}"


def _crossfade_steps_problem(value: Any) -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return None
    return f"crossfade_steps must be an integer >= 1, not {value!r}"


def _refill_horizon_problem(value: Any) -> Optional[str]:
    if value is None or (_is_number(value) and math.isfinite(value) and value >= 0):
        return None
    return (
        "refill_horizon_sec must be a finite number >= 0 "
        f"(or unset: derived from the measured latency), not {value!r}"
    )


SETTING_CHECKS: dict[str, Callable[[Any], Optional[str]]] = {
    "chunk_merge": _merge_problem,
    "ensemble_weight": _ensemble_weight_problem,
    "crossfade_steps": _crossfade_steps_problem,
    "refill_horizon_sec": _refill_horizon_problem,
}


def setting_problem(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is refused for the executor setting ``name``; None when it is fine."""
    return SETTING_CHECKS[name](value)


@dataclass(frozen=True)
class ExecutorSettings:
    chunk_merge: ChunkMerge = ChunkMerge.REPLACE
    # temporal_ensemble: weight of the i-th oldest prediction is exp(-ensemble_weight * i)
    ensemble_weight: float = DEFAULT_ENSEMBLE_WEIGHT
    crossfade_steps: int = DEFAULT_CROSSFADE_STEPS
    # Ask for the next chunk when the timeline has this long left; None: derived
    # from the measured latency (ChunkExecutor.refill_horizon_sec).
    refill_horizon_sec: Optional[float] = None

    def __post_init__(self) -> None:
        for name in SETTING_CHECKS:
            problem = setting_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        object.__setattr__(self, "chunk_merge", ChunkMerge(self.chunk_merge))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ExecutorSettings:
        """From parameter values by name; missing names keep their defaults."""
        return cls(**{name: values[name] for name in SETTING_CHECKS if name in values})
