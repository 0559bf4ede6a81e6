"""The OpenVLA model and action-conversion options, each defined once. Pure Python.

Every place that takes one of these options derives it from ``MODEL_OPTIONS``:
the policy server's flags and ``OPENVLA_*`` environment variables
(policy_server.py), the policy node's ROS parameters (node_parameters.py), the
launch arguments (manipulation_bringup.launch_logic), the shipped params YAML
(checked by a test) and the OpenVLA backend's constructor arguments
(backends/openvla.py). One check per option refuses a bad value in all of them
with the same words.

Rules that hold for every option:

- Text (a flag, an environment variable, a launch argument, a string
  parameter) goes through ``ModelOption.parse``. Empty or ``none`` (any case)
  means *unset* only for options declared ``unset_ok`` (``unnorm_key``,
  ``lora_adapter``, ``quantization``, the step caps); elsewhere it is refused
  like any bad value.
- An environment variable set to an empty string counts as not set.
- A backend argument of ``None`` means the option's default.
- ``max_position_step`` / ``max_rotation_step`` of 0 (or unset) mean "no
  cap" (a ROS parameter cannot be null); a scale of 0 is refused everywhere (it would
  silently stop the arm), as the wire contract refuses it per request.
- ``device`` is auto, cpu, cuda or cuda:N everywhere: ``mps`` is refused
  (the backend is not tested on Apple GPUs; bitsandbytes and flash-attention
  need CUDA).
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
QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half", "float")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
GRIPPER_CONVENTIONS = ("open_is_one", "close_is_one")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MAX_MODEL_NAME_CHARS = 1024
MAX_STEP_CAP = 1000.0  # m or rad; larger is no cap at all, say 0 instead


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

    Here, below node_parameters, so that a model option's range is the very object the
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
# A step cap: 0 is "no cap".
step_cap = NumberRange(0.0, MAX_STEP_CAP)


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
class ModelOption:
    """One option. ``kind``: str, float, bool or Bounds (a (lower, upper) pair, written
    "lower,upper" wherever it is text, a ROS parameter included)."""

    name: str  # backend keyword, node parameter and launch argument name
    kind: Any
    default: Any  # typed; "" for an unset_ok text option means unset
    help: str
    check: Optional[Check] = None
    env: tuple[str, ...] = ()  # OPENVLA_* variables, first wins; upstream's names included
    unset_ok: bool = False  # empty / "none" text means unset
    node_parameter: bool = True  # a policy_node parameter (read at start, read-only)
    launch_argument: bool = False  # a core_launch.py argument too
    live: bool = False  # the backend is built once: every option is read at start

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def refusal(self, value: Any) -> Optional[str]:
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
        reason = self.refusal(value)
        if reason is not None:
            raise ValueError(reason)
        return value

    def resolve(self, value: Any) -> Any:
        """A backend argument (typed, or text) -> the checked typed value (None: unset;
        a None argument means the default). ValueError "<name> <reason>"."""
        if value is None:
            value = self.default
        try:
            if isinstance(value, str):
                return self.parse(value)
            reason = self.refusal(value)
            if reason is not None:
                raise ValueError(reason)
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


MODEL_OPTIONS: tuple[ModelOption, ...] = (
    ModelOption("model", str, "openvla/openvla-7b",
            "Hugging Face model id or local checkpoint directory.",
            text_up_to(MAX_MODEL_NAME_CHARS), env=("OPENVLA_MODEL", "OPENVLA_MODEL_ID"),
            launch_argument=True),
    ModelOption("unnorm_key", str, "",
            "Dataset statistics used to un-normalize actions, e.g. bridge_orig "
            "(empty: the model's only key).",
            text_up_to(256), env=("OPENVLA_UNNORM_KEY",), unset_ok=True, launch_argument=True),
    ModelOption("device", str, "auto", "Torch device: auto, cpu, cuda or cuda:N.",
            device_name, env=("OPENVLA_DEVICE",), launch_argument=True),
    ModelOption("dtype", str, "auto", "Model weights dtype: " + ", ".join(DTYPES) + ".",
            choice(DTYPES), env=("OPENVLA_DTYPE",), launch_argument=True),
    ModelOption("quantization", str, "none",
            "Weight quantization: none, 8bit or 4bit (bitsandbytes, CUDA only).",
            choice(QUANTIZATIONS), env=("OPENVLA_QUANTIZATION",), unset_ok=True,
            launch_argument=True),
    ModelOption("lora_adapter", str, "", "Directory of a LoRA adapter to load (empty: none).",
            text_up_to(MAX_MODEL_NAME_CHARS), env=("OPENVLA_LORA_ADAPTER",), unset_ok=True,
            launch_argument=True),
    ModelOption("attn_implementation", str, "auto",
            "Attention kernel: " + ", ".join(ATTN_IMPLEMENTATIONS) + ".",
            choice(ATTN_IMPLEMENTATIONS),
            env=("OPENVLA_ATTN_IMPLEMENTATION", "OPENVLA_ATTENTION_IMPL")),
    ModelOption("gripper_convention", str, "open_is_one",
            "What the model's gripper value 1 means: open_is_one or close_is_one.",
            choice(GRIPPER_CONVENTIONS), env=("OPENVLA_GRIPPER_CONVENTION",)),
    ModelOption("position_scale", float, 1.0,
            f"Factor on predicted translations, > 0 and at most {MAX_REQUEST_SCALE:g}.",
            scale, env=("OPENVLA_POSITION_SCALE", "OPENVLA_XYZ_SCALING"), launch_argument=True),
    ModelOption("rotation_scale", float, 1.0,
            f"Factor on predicted rotations, > 0 and at most {MAX_REQUEST_SCALE:g}.",
            scale, env=("OPENVLA_ROTATION_SCALE", "OPENVLA_ROTATION_SCALING"),
            launch_argument=True),
    ModelOption("max_position_step", float, 0.0,
            "Safety cap on the length of each translation step, m (0: no cap); applies "
            "last, after any per-request scaling.",
            step_cap, env=("OPENVLA_MAX_POSITION_STEP",), unset_ok=True, launch_argument=True),
    ModelOption("max_rotation_step", float, 0.0,
            "Safety cap on the length of each rotation step (roll, pitch, yaw vector), rad "
            "(0: no cap); applies last.",
            step_cap, env=("OPENVLA_MAX_ROTATION_STEP",), unset_ok=True, launch_argument=True),
    ModelOption("clip_actions", bool, False,
            "Clamp each translation axis to position_bounds, each rotation axis to "
            "rotation_bounds and the raw gripper value to gripper_bounds.",
            switch, env=("OPENVLA_CLIP_ACTIONS",)),
    ModelOption("position_bounds", Bounds, (-1.0, 1.0),
            "lower,upper per translation axis, m (with clip_actions).",
            bounds, env=("OPENVLA_POSITION_BOUNDS",)),
    ModelOption("rotation_bounds", Bounds, (-math.pi, math.pi),
            "lower,upper per rotation axis, rad (with clip_actions).",
            bounds, env=("OPENVLA_ROTATION_BOUNDS",)),
    ModelOption("gripper_bounds", Bounds, (0.0, 1.0),
            "lower,upper of the raw gripper value (with clip_actions).",
            bounds, env=("OPENVLA_GRIPPER_BOUNDS",)),
)
OPTIONS_BY_NAME: dict[str, ModelOption] = {option.name: option for option in MODEL_OPTIONS}


def backend_arguments(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's checked typed value from backend arguments (absent or None: the
    default; None in the result: unset). ValueError "<name> <reason>" for a bad one."""
    unknown = sorted(set(given) - set(OPTIONS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown model option {unknown[0]!r}")
    return {option.name: option.resolve(given.get(option.name)) for option in MODEL_OPTIONS}


def from_environment(option: ModelOption, environ: Mapping[str, str]) -> tuple[str, str]:
    """(variable, text) of the first of ``option.env`` set non-empty, else ("", "")."""
    for name in option.env:
        text = environ.get(name, "")
        if text.strip():
            return name, text
    return "", ""
