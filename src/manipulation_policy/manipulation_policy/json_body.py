"""Strict JSON parsing of request bodies: RFC 8259 JSON only, errors that name the field.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``-Infinity`` and turns
``1e999`` into ``inf``; none of these is a JSON number a client may send. They
are parsed to a marker and reported with the path of the field that held them.
One exception: inside ``joint_states.position``/``velocity``/``effort`` they
mean "unknown" (robots publish NaN for joints without velocity or effort
sensors, and the upstream MobileManipulationCore client sends them as the bare
tokens Python writes), and are read as NaN.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .contract import field_path
from .errors import InputError


class _NonFinite:
    """Stands in for a NaN/Infinity literal or an overflowing number while parsing."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body; raises InputError naming ``body`` or the offending field."""
    if not raw.strip():
        raise InputError("body", "empty body; expected a JSON object")
    seen_non_finite = False

    def non_finite_constant(text: str) -> _NonFinite:
        nonlocal seen_non_finite
        seen_non_finite = True
        return _NonFinite(text)

    def finite_float(text: str) -> Any:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            return non_finite_constant(text)
        return value

    try:
        payload = json.loads(raw, parse_constant=non_finite_constant, parse_float=finite_float)
    except json.JSONDecodeError as exc:
        raise InputError(
            "body", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise InputError("body", f"not valid UTF-8/16/32 text ({exc.reason})") from None
    except RecursionError:
        raise InputError("body", "JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal with too many digits
        raise InputError("body", f"not valid JSON: {exc}") from None
    if seen_non_finite:
        _unknown_joint_values_as_nan(payload)
        found = _find_non_finite(payload)
        if found is not None:
            location, marker = found
            raise InputError(
                field_path(location),
                f"{marker.text} is not a JSON number; values must be finite "
                "(only joint_states arrays may hold NaN/Infinity, read as unknown)",
            )
    return payload


JOINT_ARRAYS = ("position", "velocity", "effort")


def _unknown_joint_values_as_nan(payload: Any) -> None:
    joints = payload.get("joint_states") if isinstance(payload, dict) else None
    if not isinstance(joints, dict):
        return
    for name in JOINT_ARRAYS:
        values = joints.get(name)
        if isinstance(values, list):
            joints[name] = [float("nan") if isinstance(v, _NonFinite) else v for v in values]


def _find_non_finite(payload: Any) -> Optional[tuple[tuple, _NonFinite]]:
    # Iterative: a hostile body may nest far deeper than Python's recursion limit.
    pending: list[tuple[tuple, Any]] = [((), payload)]
    while pending:
        location, value = pending.pop()
        if isinstance(value, _NonFinite):
            return location, value
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            continue
        # Reversed so the first field in document order is reported first.
        pending.extend((location + (key,), item) for key, item in reversed(items))
    return None
