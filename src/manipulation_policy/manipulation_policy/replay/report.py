"""The comparison as a table (for the terminal) and as JSON (for CI), and files written
whole or not at all."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from manipulation_policy.replay.comparison import StepDifference, Summary


def _number(value: Optional[float], unit: str = "", digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "differs"
    return f"{value:.{digits}g}{unit}"


def table(summary: Summary, counts: dict[str, int]) -> str:
    """A few lines a person reads: the verdict first."""
    t = summary.tolerances
    base, cand = "baseline", "candidate"
    verdict = "PASS" if summary.passed else "FAIL"
    rows = [
        (f"{verdict}: {summary.within}/{summary.steps} steps within tolerance "
         f"({100 * summary.share_within:.1f} %, required {100 * t.min_share:.1f} %)"),
        f"  baseline  {summary.baseline}",
        f"  candidate {summary.candidate}",
        f"  paired steps {summary.paired}; only in baseline {summary.only_baseline}; "
        f"only in candidate {summary.only_candidate}",
        f"  {'difference':<14}{'max':>12}{'tolerance':>12}",
        f"  {'position':<14}{_number(summary.max_position_m, ' m'):>12}"
        f"{_number(t.position_m, ' m'):>12}",
        f"  {'rotation':<14}{_number(summary.max_rotation_rad, ' rad'):>12}"
        f"{_number(t.rotation_rad, ' rad'):>12}",
        f"  {'joint':<14}{_number(summary.max_joint):>12}{_number(t.joint):>12}",
        f"  {'gripper':<14}{_number(summary.max_gripper):>12}{_number(t.gripper):>12}",
        f"  {'':<14}{'baseline':>12}{'candidate':>12}",
        f"  {'holds':<14}{summary.holds[base]:>12}{summary.holds[cand]:>12}",
        f"  {'failed steps':<14}{_number(summary.failures[base], digits=9):>12}"
        f"{_number(summary.failures[cand], digits=9):>12}",
        f"  {'latency p50':<14}{_number(summary.latency_p50_ms[base], ' ms'):>12}"
        f"{_number(summary.latency_p50_ms[cand], ' ms'):>12}",
        f"  {'latency p99':<14}{_number(summary.latency_p99_ms[base], ' ms'):>12}"
        f"{_number(summary.latency_p99_ms[cand], ' ms'):>12}",
        "  replay: " + ", ".join(f"{name} {value}" for name, value in counts.items() if value),
    ]
    return "\n".join(rows)


def _finite(value: Any) -> Any:
    """JSON has no infinity: a difference that cannot be measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report_json(
    summary: Optional[Summary], diffs: Sequence[StepDifference], counts: dict[str, int],
    skipped: Optional[dict[str, int]] = None,
) -> str:
    """``summary`` None: nothing was compared. ``skipped``: why camera sets were not
    sent (a camera missing or off, the state), how often."""
    document = {
        "summary": None if summary is None else summary.as_dict(),
        "replay_counts": counts,
        "skipped_sets": dict(skipped or {}),
        "steps": [asdict(d) for d in diffs],
    }
    return json.dumps(_finite(document), indent=2, allow_nan=False)


def write_whole(path: str, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then move it there."""
    target = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    os.close(handle)
    try:
        write(Path(staging))
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
