"""The LeRobot backend's options, declared once (``LeRobotBackend.OPTIONS``). Pure Python.

Kept apart from backends/lerobot.py, which imports torch and lerobot, so that the
server's flags, the node's parameters and the launch arguments can be derived on a
machine without them. ``model``, ``device`` and ``dtype`` are the very Option
objects OpenVLA declares (``model_options``).

- ``action_layout`` is required (no default can know what a vector means); its
  syntax is ``core.action_layout``'s.
- ``gripper_closed`` / ``gripper_open``: the policy's raw gripper values that mean
  closed and open; mapped linearly to upstream's 0 (closed) .. 1 (open), clipped.
- ``fps`` of 0 (or unset) means "the checkpoint's": its training run's environment
  fps (train_config.json). A checkpoint trained on a real robot's dataset says
  none; then fps is required (the period of the chunk's actions is 1 / fps).
- ``seed`` (unset by default: torch's global generator, as LeRobot) makes a sampling
  policy (Diffusion) repeatable: each prediction draws its noise from a generator
  seeded with it, so one observation (and history) gives one chunk, in-process or
  served, whatever other robots ask. Text, a whole number: a ROS double or a float
  flag would round seeds above 2**53.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from manipulation_policy.backends.model_options import DEVICE, DTYPE, MODEL
from manipulation_policy.core.action_layout import layout_problem
from manipulation_policy.core.options import NumberRange, Option

MAX_FPS = 1000.0
MAX_GRIPPER_VALUE = 1e6
gripper_value = NumberRange(-MAX_GRIPPER_VALUE, MAX_GRIPPER_VALUE)
MAX_SEED = 2**32 - 1
_DIGITS = re.compile(r"^\d+$")


def seed_problem(value: Any) -> Optional[str]:
    """A whole number 0..MAX_SEED, as an int or its decimal text."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.match(value.strip()):
        number = int(value.strip())
    if number is None or not 0 <= number <= MAX_SEED:
        return f"must be a whole number from 0 to {MAX_SEED}, got {value!r}"
    return None


OPTIONS: tuple[Option, ...] = (
    MODEL,
    DEVICE,
    DTYPE,
    Option("action_layout", str, "",
           "What each action dimension means, comma-separated, one entry per dimension: "
           "joint_position:NAME, joint_delta:NAME, eef_delta:x|y|z|roll|pitch|yaw, "
           "eef_pose:x|y|z|roll|pitch|yaw, gripper, base:vx|vy|wz, ignore (LeRobot).",
           layout_problem, env=("LEROBOT_ACTION_LAYOUT",), unset_ok=True,
           launch_argument=True),
    Option("gripper_closed", float, 0.0,
           "The policy's raw gripper value for closed (published as 0.0) (LeRobot).",
           gripper_value, env=("LEROBOT_GRIPPER_CLOSED",)),
    Option("gripper_open", float, 1.0,
           "The policy's raw gripper value for open (published as 1.0) (LeRobot).",
           gripper_value, env=("LEROBOT_GRIPPER_OPEN",)),
    Option("fps", float, 0.0,
           "Actions per second of the policy's chunk (0: the checkpoint's own) (LeRobot).",
           NumberRange(0.0, MAX_FPS), env=("LEROBOT_FPS",), unset_ok=True,
           launch_argument=True),
    Option("seed", str, "",
           "Seed of each prediction's noise: the same observation gives the same chunk "
           "(Diffusion); unset: torch's global generator (LeRobot).",
           seed_problem, env=("LEROBOT_SEED",), unset_ok=True, launch_argument=True),
)
OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
