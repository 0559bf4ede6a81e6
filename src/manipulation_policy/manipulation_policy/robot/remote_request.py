"""The remote node's request for one observation: sized, JPEG-encoded, wire-ready.

No ROS here (the robot's floor lane runs it on Ubuntu 22.04's Pillow and numpy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

from manipulation_policy.core.contract import observation_to_request
from manipulation_policy.core.imaging import resize_rgb
from manipulation_policy.core.policy_types import JointStateData, Observation


def without_non_finite_extras(joint_state: JointStateData) -> JointStateData:
    """Drop velocity/effort arrays holding NaN/inf (drivers publish NaN for "unknown").

    The wire carries finite numbers only, and both arrays are optional, so the
    request stays valid instead of being refused on every frame.
    """
    def finite(values: tuple[float, ...]) -> tuple[float, ...]:
        return values if all(math.isfinite(v) for v in values) else ()

    return JointStateData(
        name=joint_state.name,
        position=joint_state.position,
        velocity=finite(joint_state.velocity),
        effort=finite(joint_state.effort),
    )


def remote_request_body(
    observation: Observation,
    image_width: int,
    image_height: int,
    jpeg_quality: int,
    extra_fields: Optional[Mapping[str, Any]] = None,
) -> dict:
    """The JSON body for ``observation``: its image (and each named camera's) resized to
    ``image_width`` x ``image_height`` and JPEG-encoded, non-finite joint extras dropped, then
    ``extra_fields`` (upstream's per-request action settings) added."""
    observation = replace(
        observation, joint_state=without_non_finite_extras(observation.joint_state)
    )
    if observation.image is not None:
        observation = replace(
            observation, image=resize_rgb(observation.image, image_width, image_height)
        )
    if observation.images:
        observation = replace(observation, images={
            name: resize_rgb(image, image_width, image_height)
            for name, image in observation.images.items()
        })
    body = observation_to_request(observation, jpeg_quality=jpeg_quality)
    body.update(extra_fields or {})
    return body
