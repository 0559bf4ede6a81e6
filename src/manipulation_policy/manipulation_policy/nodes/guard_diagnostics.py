"""The safety guard as a diagnostic_msgs/DiagnosticStatus on /diagnostics.

OK while the guard refuses nothing new; WARN, with the newest refusal's reason,
when refusals were counted since the last report. The values are the guard's
counts: refusals per reason (``refused_<code>``), clamps per limit
(``clamped_<limit>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

REFUSED_PREFIX = "refused_"


def refusal_total(counts: Mapping[str, int]) -> int:
    return sum(n for key, n in counts.items() if key.startswith(REFUSED_PREFIX))


def guard_status(
    node_fqn: str,
    counts: Mapping[str, int],
    newest_refusal: Optional[str],
    reported_refusals: int,
) -> DiagnosticStatus:
    """The guard's status; ``reported_refusals``: the refusal total of the last report."""
    status = DiagnosticStatus()
    status.name = f"{node_fqn}: safety guard"
    status.hardware_id = node_fqn
    new = refusal_total(counts) - reported_refusals
    if new > 0:
        status.level = DiagnosticStatus.WARN
        status.message = f"{new} action(s) refused, holds published: {newest_refusal or '?'}"
    else:
        status.level = DiagnosticStatus.OK
        status.message = "ok"
    status.values = [KeyValue(key=key, value=str(value)) for key, value in counts.items()]
    return status
