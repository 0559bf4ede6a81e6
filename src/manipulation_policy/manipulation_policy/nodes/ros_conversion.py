"""ROS messages <-> the plain types of ``policy_types``.

The only module that builds rclpy messages; everything past it works on
Observation / PolicyAction and is testable without ROS. Reading a message only
needs its field names: those readers live in ``robot/message_reading`` (shared with
the ROS-free replay) and are re-exported here; what a published message holds is
said once in ``robot/message_fields``.
"""

from __future__ import annotations

import array
import importlib
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose as PoseMsg
from geometry_msgs.msg import Twist as TwistMsg
from sensor_msgs.msg import Image

from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput
from manipulation_policy.core.policy_types import (
    ActionChunk,
    EefTargetMode,
    PolicyAction,
    Pose,
    Twist,
    geometry_to_dict,
)
from manipulation_policy.robot import message_fields
from manipulation_policy.robot.message_reading import (  # noqa: F401 - re-exported
    EEF_MODE_FROM_VALUE,
    NANOSECONDS,
    compressed_format,
    compressed_image_to_rgb,
    image_to_rgb,
    joint_state_to_data,
    observation_eef_pose,
    observation_image_stamp,
    observation_joint_state,
    policy_output_to_action,
    pose_from_msg,
    pose_stamped_to_pose,
    stamp_to_nanoseconds,
    step_due_nanoseconds,
    transform_to_eef_pose,
    twist_from_msg,
    unsupported_encoding,
)

EEF_MODE_TO_MSG = {
    EefTargetMode.ABSOLUTE: PolicyOutput.EEF_TARGET_ABSOLUTE,
    EefTargetMode.DELTA: PolicyOutput.EEF_TARGET_DELTA,
}
EEF_MODE_FROM_MSG = EEF_MODE_FROM_VALUE


def fill_message(msg: Any, fields: dict[str, Any]) -> Any:
    """Set ``fields`` (``robot/message_fields``' nested dicts) on an rclpy message; a list
    of dicts fills a sequence of the ``item_type`` given by the message's own slot type."""
    for name, value in fields.items():
        if isinstance(value, dict):
            fill_message(getattr(msg, name), value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            item_type = _sequence_item_class(msg, name)
            setattr(msg, name, [fill_message(item_type(), item) for item in value])
        elif isinstance(getattr(msg, name), float):
            setattr(msg, name, float(value))
        else:
            setattr(msg, name, value)
    return msg


def _sequence_item_class(msg: Any, name: str) -> type:
    """The message class of the items of the sequence field ``name`` of ``msg``."""
    # e.g. "sequence<manipulation_msgs/PolicyOutput>"
    slot_type = msg.get_fields_and_field_types()[name]
    package, item = slot_type.split("<", 1)[1].rstrip(">").split("/")
    return getattr(importlib.import_module(f"{package}.msg"), item)


# ---------------------------------------------------------------- time


def nanoseconds_to_stamp(nanoseconds: int) -> Time:
    sec, nanosec = divmod(int(nanoseconds), NANOSECONDS)
    return Time(sec=sec, nanosec=nanosec)


# ---------------------------------------------------------------- images


def rgb_to_image(rgb: np.ndarray, stamp: Time, frame_id: str = "camera") -> Image:
    """An HxWx3 uint8 RGB array as an rgb8 sensor_msgs/Image (for publishers and tests)."""
    height, width = rgb.shape[:2]
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(height), int(width)
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = int(width) * 3
    msg.data = array.array("B", np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return msg


# ---------------------------------------------------------------- geometry


def pose_to_msg(pose: Pose) -> PoseMsg:
    return fill_message(PoseMsg(), geometry_to_dict(pose, Pose))


def twist_to_msg(twist: Twist) -> TwistMsg:
    return fill_message(TwistMsg(), geometry_to_dict(twist, Twist))


# ---------------------------------------------------------------- decisions


def action_to_policy_output(action: PolicyAction, stamp: Time) -> PolicyOutput:
    """A decision as a PolicyOutput stamped with its observation's stamp."""
    return fill_message(
        PolicyOutput(), message_fields.action_fields(action, stamp_to_nanoseconds(stamp))
    )


def command_to_policy_output(
    action: PolicyAction,
    stamp: Time,
    due_ns: int,
    step_index: int,
    chunk_length: int,
    request_id: str,
) -> PolicyOutput:
    """One command of a chunk: the observation's stamp, when it is due, where it comes from."""
    fields = message_fields.policy_output_fields(
        action, stamp_to_nanoseconds(stamp), due_ns, step_index, chunk_length, request_id
    )
    return fill_message(PolicyOutput(), fields)


def chunk_to_msg(chunk: ActionChunk, stamp: Time, request_id: str) -> PolicyActionChunk:
    """A whole chunk, each action with its due time (header: the observation's)."""
    fields = message_fields.policy_action_chunk_fields(
        chunk, stamp_to_nanoseconds(stamp), request_id
    )
    return fill_message(PolicyActionChunk(), fields)
