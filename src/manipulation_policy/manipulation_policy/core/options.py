"""Backend options: the declaration type every backend uses, model-neutral. Pure Python.

A backend class declares its options once, as ``OPTIONS`` (a tuple of ``Option``);
``backends.declared_options`` reads it. Everything that takes one of them is
derived from that declaration: the policy server's flags and environment variables
(policy_server.py), the policy node's ROS parameters (node_parameters.py), the
launch arguments and the params-file check (manipulation_bringup.launch_logic) and
the backend's own constructor (``resolve``). One check per option refuses a bad
value in all of them with the same words. This module knows no model: OpenVLA's
options are declared in ``backends/openvla_options.py``.

Rules that hold for every option:

- Text (a flag, an environment variable, a launch argument, a string
  parameter) goes through ``Option.parse``. Empty or ``none`` (any case)
  means *unset* only for options declared ``unset_ok``; elsewhere it is
  refused like any bad value.
- An environment variable set to an empty string counts as not set.
- A backend argument of ``None`` means the option's default.
- ``device`` (``device_name``) is auto, cpu, cuda or cuda:N everywhere: ``mps`` is
  refused (no backend here is tested on Apple GPUs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from manipulation_policy.core.contract import MAX_REQUEST_SCALE

Check = Callable[[Any], Optional[str]]
Bounds = tuple[float, float]

UNSET_WORDS = ("", "none")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def is_unset(value: Any) -> bool:
    """None, or text that is empty or ``none`` (any case, spaces around ignored)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in UNSET_WORDS)


# ---------------------------------------------------------------- checks (typed values)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def choice(choices: Sequence[str]) -> Check:
    """Case-insensitive, spaces around ignored, as the backend reads these."""

    def check(value: Any) -> Optional[str]:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            return f"must be one of {', '.join(choices)}; got {value!r}"
        return None

    return check


def device_name(value: Any) -> Optional[str]:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value.strip().lower()):
        return f"must be auto, cpu, cuda or cuda:<index>; got {value!r}"
    return None


def text_up_to(max_chars: int) -> Check:
    def check(value: Any) -> Optional[str]:
        if not isinstance(value, str):
            return f"must be text, got {value!r}"
        if not value.strip():
            return "must not be empty"
        if len(value) > max_chars:
            return f"must be at most {max_chars} characters, got {len(value)}"
        return None

    return check


@dataclass(frozen=True)
class NumberRange:
    """A check for a number in [low, high] (low excluded when ``low_open``), finite.

    Here, below node_parameters, so that an option's range is the very object the
    node shows in its parameter descriptor (``ros2 param describe``)."""

    low: float
    high: float
    low_open: bool = False
    integer: bool = False

    def __call__(self, value: float) -> Optional[str]:
        if self.integer:
            if not self.low <= value <= self.high:
                if math.isinf(self.high):
                    return f"must be at least {self.low}, got {value!r}"
                return f"must be between {self.low} and {self.high}, got {value!r}"
            return None
        if not math.isfinite(value) or (value <= self.low if self.low_open else value < self.low):
            relation = ">" if self.low_open else ">="
            return f"must be a finite number {relation} {self.low:g}, got {value!r}"
        if value > self.high:
            return f"must be at most {self.high:g}, got {value!r}"
        return None

    def describe(self) -> str:
        if self.integer:
            return f">= {self.low}" if math.isinf(self.high) else f"{self.low} to {self.high}"
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        return low if math.isinf(self.high) else f"{low}, <= {self.high:g}"


# A scale: > 0 (0 would silently freeze that motion), up to what a request may ask for.
scale = NumberRange(0.0, MAX_REQUEST_SCALE, low_open=True)


def switch(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def bounds(value: Any) -> Optional[str]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return f"must be lower,upper (two numbers), got {value!r}"
    numbers = [_number(v) for v in value]
    if any(n is None or not math.isfinite(n) for n in numbers):
        return f"must be two finite numbers, got {value!r}"
    if numbers[0] > numbers[1]:
        return f"must have lower <= upper, got {value!r}"
    return None


# ---------------------------------------------------------------- text forms

_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """Upstream's spellings of a boolean environment variable."""
    lowered = text.strip().lower()
    if lowered in _TRUE_WORDS:
        return True
    if lowered in _FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_bounds(text: str) -> Bounds:
    """"lower,upper" (upstream's OPENVLA_*_BOUNDS format) -> two finite numbers, ordered."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"expected 'lower,upper', got {text!r}")
    try:
        lower, upper = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"expected two numbers 'lower,upper', got {text!r}") from None
    if not (math.isfinite(lower) and math.isfinite(upper)) or lower > upper:
        raise ValueError(f"expected finite lower <= upper, got {text!r}")
    return (lower, upper)


def format_bounds(value: Sequence[float]) -> str:
    return f"{float(value[0])!r},{float(value[1])!r}"


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


# ---------------------------------------------------------------- the definition


@dataclass(frozen=True)
class Option:
    """One option. ``kind``: str, float, bool or Bounds (a (lower, upper) pair, written
    "lower,upper" wherever it is text, a ROS parameter included)."""

    name: str  # backend keyword, node parameter, launch argument name; flag --name-with-dashes
    kind: Any
    default: Any  # typed; "" for an unset_ok text option means unset
    help: str
    check: Optional[Check] = None
    env: tuple[str, ...] = ()  # environment variables of the server, first set wins
    unset_ok: bool = False  # empty / "none" text means unset
    node_parameter: bool = True  # a policy_node parameter (read at start unless live)
    launch_argument: bool = False  # a core_launch.py argument too
    live: bool = False  # the backend is built once: every option is read at start

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> Optional[str]:
        """Why a typed value (or text, for a str or Bounds option) is refused; None if fine."""
        if isinstance(value, str) and self.kind is not str:
            try:
                self.parse(value)
            except ValueError as exc:
                return str(exc)
            return None
        if self.unset_ok and is_unset(value):
            return None
        if self.kind is float and _number(value) is None:
            return f"must be a number, got {value!r}"
        if self.check is None:
            return None if isinstance(value, str) else f"must be text, got {value!r}"
        return self.check(value)

    def parse(self, text: str) -> Any:
        """The typed value of ``text``; None when unset. ValueError saying why not."""
        if self.unset_ok and is_unset(text):
            return None
        if self.kind is str:
            value: Any = text.strip()
        elif self.kind is float:
            value = _parse_float(text)
        elif self.kind is bool:
            value = parse_bool(text)
        else:
            value = parse_bounds(text)
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def resolve(self, value: Any) -> Any:
        """A backend argument (typed, or text) -> the checked typed value (None: unset;
        a None argument means the default). ValueError "<name> <reason>"."""
        if value is None:
            value = self.default
        try:
            if isinstance(value, str):
                return self.parse(value)
            problem = self.problem(value)
            if problem is not None:
                raise ValueError(problem)
        except ValueError as exc:
            raise ValueError(f"{self.name} {exc}") from None
        if self.kind is float:
            return float(value)
        if self.kind is Bounds:
            return (float(value[0]), float(value[1]))
        return value

    # ------------------------------------------------ the ROS parameter form

    @property
    def parameter_default(self) -> Any:
        """The default as a ROS parameter value (Bounds as "lower,upper" text)."""
        return format_bounds(self.default) if self.kind is Bounds else self.default

    def from_parameter(self, value: Any) -> Any:
        """A checked parameter value -> the backend argument (None: unset)."""
        return self.resolve(value)


def resolve(options: Sequence[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option's checked typed value from a backend's keyword arguments
    (absent or None: the default; None in the result: unset). ValueError
    "<name> <reason>" for a bad one, or for a name ``options`` does not declare."""
    names = {option.name for option in options}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; known: {', '.join(sorted(names))}")
    return {option.name: option.resolve(given.get(option.name)) for option in options}


def from_environment(option: Option, environ: Mapping[str, str]) -> tuple[str, str]:
    """(variable, text) of the first of ``option.env`` set non-empty, else ("", "")."""
    for name in option.env:
        text = environ.get(name, "")
        if text.strip():
            return name, text
    return "", ""
