"""Strict JSON parsing of request bodies: RFC 8259 JSON only, errors that name the field.

The server's fast path (orjson into the pydantic model, server/request_decoding.py)
takes every valid request; this parser runs for the others, to tell the client
which field is wrong, and for bodies whose joint arrays hold NaN/Infinity (see below).

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
import re
from typing import Any, Optional

from manipulation_policy.core.contract import field_path
from manipulation_policy.core.errors import InputError


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
    if _may_hold_surrogates(raw):
        location = _find_lone_surrogate(payload)
        if location is not None:
            raise InputError(
                field_path(location), "text holds a lone UTF-16 surrogate, which is not Unicode"
            )
    return payload


# A \uD800-\uDFFF escape, or such a code point encoded as (invalid) UTF-8 bytes, which
# json.loads lets through. Either would break the UTF-8 answer that echoes the text.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _may_hold_surrogates(raw: bytes) -> bool:
    """A cheap scan of the bytes, so that the walk below runs only when needed."""
    if raw[:1] == b"\x00" or raw[1:2] == b"\x00" or raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True  # UTF-16/32: the byte scan does not apply
    return _SURROGATE_HINT.search(raw) is not None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_lone_surrogate(payload: Any) -> tuple | None:
    """The path of the first string (or key) holding a lone surrogate, else None."""
    pending: list[tuple[tuple, Any]] = [((), payload)]
    while pending:
        location, value = pending.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return location
        elif isinstance(value, dict):
            for key in value:
                if not _is_unicode(key):
                    return location + ("<key>",)
            pending.extend((location + (key,), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            indexed = reversed(list(enumerate(value)))
            pending.extend((location + (index,), item) for index, item in indexed)
    return None


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
