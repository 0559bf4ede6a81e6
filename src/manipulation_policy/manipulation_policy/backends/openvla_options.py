"""The OpenVLA backend's options, declared once (``OpenVLABackend.OPTIONS``). Pure Python.

Kept apart from backends/openvla.py, which imports torch and transformers, so that
the server's flags, the node's parameters and the launch arguments can be derived
from this declaration on a machine without them (``backends.declared_options``).
The ``OPENVLA_*`` variables are the upstream MobileManipulationCore server's,
upstream's spellings included.

- ``max_position_step`` / ``max_rotation_step`` of 0 (or unset) mean "no cap" (a
  ROS parameter cannot be null); a scale of 0 is refused everywhere (it would
  silently stop the arm), as the wire contract refuses it per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from manipulation_policy.backends.model_options import (
    DEVICE,
    DTYPE,
    DTYPES,  # noqa: F401 (openvla.py and the tests read it here)
    MAX_MODEL_NAME_CHARS,
    MODEL,
)
from manipulation_policy.core.contract import MAX_REQUEST_SCALE
from manipulation_policy.core.options import (
    Bounds,
    NumberRange,
    Option,
    bounds,
    choice,
    scale,
    switch,
    text_up_to,
)
from manipulation_policy.core.upstream_compat import GRIPPER_CONVENTIONS, ActionConversionOptions

QUANTIZATIONS = ("none", "8bit", "4bit")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
MAX_STEP_CAP = 1000.0  # m or rad; larger is no cap at all, say 0 instead
# A step cap: 0 is "no cap".
step_cap = NumberRange(0.0, MAX_STEP_CAP)

OPTIONS: tuple[Option, ...] = (
    MODEL,
    Option("unnorm_key", str, "",
           "Dataset statistics used to un-normalize actions, e.g. bridge_orig "
           "(empty: the model's only key).",
           text_up_to(256), env=("OPENVLA_UNNORM_KEY",), unset_ok=True, launch_argument=True),
    DEVICE,
    DTYPE,
    Option("quantization", str, "none",
           "Weight quantization: none, 8bit or 4bit (bitsandbytes, CUDA only).",
           choice(QUANTIZATIONS), env=("OPENVLA_QUANTIZATION",), unset_ok=True,
           launch_argument=True),
    Option("lora_adapter", str, "", "Directory of a LoRA adapter to load (empty: none).",
           text_up_to(MAX_MODEL_NAME_CHARS), env=("OPENVLA_LORA_ADAPTER",), unset_ok=True,
           launch_argument=True),
    Option("attn_implementation", str, "auto",
           "Attention kernel: " + ", ".join(ATTN_IMPLEMENTATIONS) + ".",
           choice(ATTN_IMPLEMENTATIONS),
           env=("OPENVLA_ATTN_IMPLEMENTATION", "OPENVLA_ATTENTION_IMPL")),
    Option("gripper_convention", str, "open_is_one",
           "What the model's gripper value 1 means: open_is_one or close_is_one.",
           choice(GRIPPER_CONVENTIONS), env=("OPENVLA_GRIPPER_CONVENTION",)),
    Option("position_scale", float, 1.0,
           f"Factor on predicted translations, > 0 and at most {MAX_REQUEST_SCALE:g}.",
           scale, env=("OPENVLA_POSITION_SCALE", "OPENVLA_XYZ_SCALING"), launch_argument=True),
    Option("rotation_scale", float, 1.0,
           f"Factor on predicted rotations, > 0 and at most {MAX_REQUEST_SCALE:g}.",
           scale, env=("OPENVLA_ROTATION_SCALE", "OPENVLA_ROTATION_SCALING"),
           launch_argument=True),
    Option("max_position_step", float, 0.0,
           "Safety cap on the length of each translation step, m (0: no cap); applies "
           "last, after any per-request scaling.",
           step_cap, env=("OPENVLA_MAX_POSITION_STEP",), unset_ok=True, launch_argument=True),
    Option("max_rotation_step", float, 0.0,
           "Safety cap on the length of each rotation step (roll, pitch, yaw vector), rad "
           "(0: no cap); applies last.",
           step_cap, env=("OPENVLA_MAX_ROTATION_STEP",), unset_ok=True, launch_argument=True),
    Option("clip_actions", bool, False,
           "Clamp each translation axis to position_bounds, each rotation axis to "
           "rotation_bounds and the raw gripper value to gripper_bounds.",
           switch, env=("OPENVLA_CLIP_ACTIONS",)),
    Option("position_bounds", Bounds, (-1.0, 1.0),
           "lower,upper per translation axis, m (with clip_actions).",
           bounds, env=("OPENVLA_POSITION_BOUNDS",)),
    Option("rotation_bounds", Bounds, (-math.pi, math.pi),
           "lower,upper per rotation axis, rad (with clip_actions).",
           bounds, env=("OPENVLA_ROTATION_BOUNDS",)),
    Option("gripper_bounds", Bounds, (0.0, 1.0),
           "lower,upper of the raw gripper value (with clip_actions).",
           bounds, env=("OPENVLA_GRIPPER_BOUNDS",)),
)
OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}

# The options that set the conversion of OpenVLA's action, which is in the layout of
# upstream's action vector (core.upstream_compat): ActionConversionOptions' fields.
CONVERSION_OPTIONS = (
    "gripper_convention", "position_scale", "rotation_scale", "max_position_step",
    "max_rotation_step", "clip_actions", "position_bounds", "rotation_bounds",
    "gripper_bounds",
)


def conversion_from_options(chosen: Mapping[str, Any]) -> ActionConversionOptions:
    """The conversion settings from the resolved options (``options.resolve(OPTIONS, ..)``):
    a step cap of 0 or unset is no cap; the gripper convention as its check reads it."""
    values = {name: chosen[name] for name in CONVERSION_OPTIONS}
    values["gripper_convention"] = values["gripper_convention"].strip().lower()
    for cap in ("max_position_step", "max_rotation_step"):
        values[cap] = values[cap] or None  # 0: no cap
    return ActionConversionOptions(**values)
