"""Reading ROS messages into the plain types of ``policy_types``, no ROS needed.

Every function here reads fields by name only, so it takes rclpy's message
classes (the nodes, through ``nodes/ros_conversion``) and the messages a pure-Python
bag reader deserializes (``manipulation_policy.replay``) alike: both carry the
fields of the .msg definitions under the same names. The other direction, building
ROS messages, needs the message classes and stays in ``nodes/ros_conversion``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import RAW_ENCODINGS, decode_image_bytes, raw_image_to_rgb
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    PolicyAction,
    Pose,
    Quaternion,
    Twist,
    Vector3,
    geometry_from,
)
from manipulation_policy.robot.observation_inputs import eef_pose_from_transform
from manipulation_policy.robot.scheduling import StampedPose

NANOSECONDS = 1_000_000_000

# PolicyOutput.msg's EEF_TARGET_ABSOLUTE and EEF_TARGET_DELTA.
EEF_MODE_VALUES = {EefTargetMode.ABSOLUTE: 0, EefTargetMode.DELTA: 1}
EEF_MODE_FROM_VALUE = {value: mode for mode, value in EEF_MODE_VALUES.items()}


# ---------------------------------------------------------------- time


def stamp_to_nanoseconds(stamp: Any) -> int:
    """builtin_interfaces/Time in nanoseconds."""
    return int(stamp.sec) * NANOSECONDS + int(stamp.nanosec)


def step_due_nanoseconds(stamp_ns: int, step_index: int, action_period_sec: float) -> int:
    """When step ``step_index`` of a chunk is due: the observation's stamp + i * period."""
    return int(stamp_ns) + round(step_index * action_period_sec * NANOSECONDS)


# ---------------------------------------------------------------- images


def unsupported_encoding(msg: Any) -> Optional[str]:
    """The encoding of a raw image if it is one we cannot convert, else None."""
    return None if msg.encoding in RAW_ENCODINGS else msg.encoding


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8; row padding allowed) to HxWx3 RGB."""
    return raw_image_to_rgb(msg.data, msg.width, msg.height, msg.encoding, msg.step)


def compressed_format(format_field: str) -> str:
    """The Pillow format named by a CompressedImage ``format``.

    image_transport writes e.g. "jpeg", "png" or "bgr8; jpeg compressed bgr8".
    The channel order named there is that of the uncompressed image; the
    JPEG/PNG itself decodes to RGB either way.
    """
    lowered = format_field.lower()
    if "png" in lowered:
        return "PNG"
    if "jpeg" in lowered or "jpg" in lowered:
        return "JPEG"
    raise InputError("format", f"unsupported compressed image format {format_field!r}")


def compressed_image_to_rgb(msg: Any) -> np.ndarray:
    return decode_image_bytes(bytes(msg.data), compressed_format(msg.format))


def is_compressed_image(msg: Any) -> bool:
    """sensor_msgs/CompressedImage (a ``format`` field) rather than sensor_msgs/Image."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def frame_to_rgb(msg: Any) -> np.ndarray:
    """A camera frame, raw or compressed, as HxWx3 RGB (raises InputError when unusable)."""
    return compressed_image_to_rgb(msg) if is_compressed_image(msg) else image_to_rgb(msg)


# ---------------------------------------------------------------- state


def joint_state_to_data(msg: Any) -> JointStateData:
    return JointStateData(
        name=tuple(msg.name),
        position=tuple(float(v) for v in msg.position),
        velocity=tuple(float(v) for v in msg.velocity),
        effort=tuple(float(v) for v in msg.effort),
    )


def pose_from_msg(msg: Any) -> Pose:
    return geometry_from(Pose, msg)


def twist_from_msg(msg: Any) -> Twist:
    return geometry_from(Twist, msg)


def pose_stamped_to_pose(msg: Any) -> Pose:
    return pose_from_msg(msg.pose)


def pose_stamped_to_stamped_pose(msg: Any) -> StampedPose:
    """A geometry_msgs/PoseStamped on eef_pose_topic, as the scheduler judges it."""
    return StampedPose(
        pose_stamped_to_pose(msg), stamp_to_nanoseconds(msg.header.stamp), msg.header.frame_id
    )


# ---------------------------------------------------------------- the aggregated observation


def transform_to_eef_pose(msg: Any, base_frame: str = "") -> Optional[StampedPose]:
    """A base-to-end-effector transform as the current end-effector pose (see
    ``observation_inputs.eef_pose_from_transform``); None when it cannot be one."""
    return eef_pose_from_transform(
        geometry_from(Vector3, msg.transform.translation),
        geometry_from(Quaternion, msg.transform.rotation),
        msg.header.frame_id,
        base_frame,
        stamp_to_nanoseconds(msg.header.stamp),
    )


def observation_image_stamp(msg: Any) -> Any:
    """The stamp of the observation's colour image: its own, else the observation's."""
    stamp = msg.rgb_image.header.stamp
    return stamp if stamp_to_nanoseconds(stamp) != 0 else msg.header.stamp


def observation_joint_state(msg: Any) -> Optional[JointStateData]:
    return joint_state_to_data(msg.joint_states) if msg.has_joint_states else None


def observation_eef_pose(msg: Any) -> Optional[StampedPose]:
    return transform_to_eef_pose(msg.base_to_ee, msg.base_frame) if msg.has_base_to_ee else None


# ---------------------------------------------------------------- decisions


def policy_output_to_action(msg: Any) -> PolicyAction:
    """A manipulation_msgs/PolicyOutput as the decision it carries."""
    return PolicyAction(
        reference_frame=msg.reference_frame,
        eef_target=pose_from_msg(msg.eef_target_pose) if msg.has_eef_target else None,
        eef_target_mode=EEF_MODE_FROM_VALUE[int(msg.eef_target_mode)],
        joint_deltas=tuple(float(v) for v in msg.joint_deltas) if msg.has_joint_deltas else None,
        gripper_command=float(msg.gripper_command) if msg.gripper_active else None,
        base_velocity_hint=twist_from_msg(msg.base_velocity_hint) if msg.has_base_hint else None,
        confidence=float(msg.confidence),
        # Absent from messages recorded before these fields existed.
        joint_positions=(
            tuple(float(v) for v in msg.joint_positions)
            if getattr(msg, "has_joint_positions", False)
            else None
        ),
        joint_names=tuple(str(n) for n in getattr(msg, "joint_names", ())) or None,
    )
