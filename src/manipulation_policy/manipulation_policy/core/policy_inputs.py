"""Does what a robot sends fit what a policy reads? Pure Python, no ROS, no torch.

One set of checks for every place that asks: the policy server on each request
(a 422 naming the field), the backend itself, and both nodes at configure time
against their configured cameras and state layout (one line naming the missing
camera or the state length, before anything is sent).

A policy that reads exactly one named camera also takes a robot's single
``image`` (upstream's one-camera request) as that camera.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Optional

import numpy as np

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import Observation, PolicyInputs


def _names(names: Collection[str]) -> str:
    return ", ".join(sorted(names)) if names else "none"


def inputs_problem(
    required: PolicyInputs,
    image_names: Collection[str],
    state_length: Optional[int],
    has_single_image: bool = False,
) -> Optional[InputError]:
    """Why cameras ``image_names`` and a state of ``state_length`` values (None: no
    state) do not fit ``required``; None when they do. Extra cameras are fine (a
    robot may publish more than a policy reads); a missing one, a missing state or a
    state of another length is not. ``has_single_image``: the robot sends the one
    unnamed ``image`` too."""
    needed = tuple(required.image_names)
    given = set(image_names)
    if needed and not (len(needed) == 1 and not given and has_single_image):
        missing = [name for name in needed if name not in given]
        if missing:
            return InputError(
                f"images.{missing[0]}",
                f"is missing: the policy reads cameras {_names(needed)}, "
                f"the robot sends {_names(given)}",
            )
    if required.state_length is not None:
        if state_length is None:
            return InputError(
                "state",
                f"is missing: the policy reads a state of {required.state_length} values",
            )
        if state_length != required.state_length:
            return InputError(
                "state",
                f"has {state_length} values, but the policy reads {required.state_length}",
            )
    return None


def check_observation(required: PolicyInputs, observation: Observation) -> None:
    """InputError naming the field when ``observation`` does not fit ``required``."""
    state = observation.state
    problem = inputs_problem(
        required,
        observation.images.keys(),
        None if state is None else len(state),
        has_single_image=observation.image is not None,
    )
    if problem is not None:
        raise problem


def named_images(required: PolicyInputs, observation: Observation) -> Mapping[str, np.ndarray]:
    """The policy's cameras by name: ``observation.images``, or its one ``image`` as
    the policy's only camera. Call ``check_observation`` first."""
    needed = tuple(required.image_names)
    if len(needed) == 1 and not observation.images and observation.image is not None:
        return {needed[0]: observation.image}
    return {name: observation.images[name] for name in needed}


def inputs_to_wire(required: PolicyInputs) -> dict[str, Any]:
    """The JSON of /info's ``inputs``."""
    return {
        "image_names": list(required.image_names),
        "state_length": required.state_length,
        "action_length": required.action_length,
    }


def inputs_from_wire(payload: Any) -> PolicyInputs:
    """/info's ``inputs`` read back; ValueError naming what is wrong."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"inputs must be an object, got {type(payload).__name__}")
    names = payload.get("image_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("inputs.image_names must be a list of text")
    lengths = {}
    for key in ("state_length", "action_length"):
        value = payload.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"inputs.{key} must be a count or null, got {value!r}")
        lengths[key] = value
    return PolicyInputs(tuple(names), lengths["state_length"], lengths["action_length"])
