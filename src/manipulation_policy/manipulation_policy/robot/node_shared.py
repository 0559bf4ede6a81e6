"""What the policy node's parts hand each other, no ROS: a received frame and a job
for the worker; and how often a repeated log line may show."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from manipulation_policy.core.policy_types import Observation
from manipulation_policy.robot.scheduling import FrameInfo

LOG_THROTTLE_SEC = 5.0


@dataclass(frozen=True)
class Frame:
    msg: Any  # sensor_msgs Image or CompressedImage, converted on the worker
    info: FrameInfo
    stamp: Any  # builtin_interfaces/Time of the image: the outputs' stamp


@dataclass(frozen=True)
class Job:
    frame: Frame
    observation: Observation  # image still None: decoded on the worker
    task_generation: int = 0
    # Several cameras: the set's frame of each by name (``frame`` is the first camera's,
    # the set's stamp); decoded on the worker into ``Observation.images``. Empty: one
    # camera, ``frame``, decoded into ``Observation.image``.
    camera_frames: Mapping[str, Frame] = field(default_factory=dict)
