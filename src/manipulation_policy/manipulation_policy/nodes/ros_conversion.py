"""ROS messages <-> the plain types of ``policy_types``.

The only module that reads or builds ROS messages; everything past it works
on Observation / PolicyAction and is testable without ROS.
"""

from __future__ import annotations

import array
from typing import Any, Optional

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose as PoseMsg
from geometry_msgs.msg import PoseStamped, TransformStamped
from geometry_msgs.msg import Twist as TwistMsg
from sensor_msgs.msg import CompressedImage, Image, JointState

from manipulation_msgs.msg import Observation as ObservationMsg
from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import RAW_ENCODINGS, decode_image_bytes, raw_image_to_rgb
from manipulation_policy.core.policy_types import (
    ActionChunk,
    EefTargetMode,
    JointStateData,
    PolicyAction,
    Pose,
    Quaternion,
    Twist,
    Vector3,
    geometry_from,
    geometry_parts,
)
from manipulation_policy.robot.observation_inputs import eef_pose_from_transform
from manipulation_policy.robot.scheduling import StampedPose

NANOSECONDS = 1_000_000_000

EEF_MODE_TO_MSG = {
    EefTargetMode.ABSOLUTE: PolicyOutput.EEF_TARGET_ABSOLUTE,
    EefTargetMode.DELTA: PolicyOutput.EEF_TARGET_DELTA,
}
EEF_MODE_FROM_MSG = {value: mode for mode, value in EEF_MODE_TO_MSG.items()}


# ---------------------------------------------------------------- time


def stamp_to_nanoseconds(stamp: Time) -> int:
    return int(stamp.sec) * NANOSECONDS + int(stamp.nanosec)


def nanoseconds_to_stamp(nanoseconds: int) -> Time:
    sec, nanosec = divmod(int(nanoseconds), NANOSECONDS)
    return Time(sec=sec, nanosec=nanosec)


# ---------------------------------------------------------------- images


def unsupported_encoding(msg: Image) -> Optional[str]:
    """The encoding of a raw image if it is one we cannot convert, else None."""
    return None if msg.encoding in RAW_ENCODINGS else msg.encoding


def image_to_rgb(msg: Image) -> np.ndarray:
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


def compressed_image_to_rgb(msg: CompressedImage) -> np.ndarray:
    return decode_image_bytes(bytes(msg.data), compressed_format(msg.format))


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


# ---------------------------------------------------------------- state


def joint_state_to_data(msg: JointState) -> JointStateData:
    return JointStateData(
        name=tuple(msg.name),
        position=tuple(float(v) for v in msg.position),
        velocity=tuple(float(v) for v in msg.velocity),
        effort=tuple(float(v) for v in msg.effort),
    )


# One set of converters for geometry_msgs Pose/Point/Quaternion/Twist/Vector3: the
# plain types share their field names, so policy_types' description drives both ways.


def _fill_msg(msg: Any, value: Any, kind: type) -> Any:
    for name, part in geometry_parts(kind):
        if part is None:
            setattr(msg, name, float(getattr(value, name)))
        else:
            _fill_msg(getattr(msg, name), getattr(value, name), part)
    return msg


def pose_from_msg(msg: PoseMsg) -> Pose:
    return geometry_from(Pose, msg)


def pose_to_msg(pose: Pose) -> PoseMsg:
    return _fill_msg(PoseMsg(), pose, Pose)


def twist_from_msg(msg: TwistMsg) -> Twist:
    return geometry_from(Twist, msg)


def twist_to_msg(twist: Twist) -> TwistMsg:
    return _fill_msg(TwistMsg(), twist, Twist)


def pose_stamped_to_pose(msg: PoseStamped) -> Pose:
    return pose_from_msg(msg.pose)


# ---------------------------------------------------------------- the aggregated observation


def transform_to_eef_pose(msg: TransformStamped, base_frame: str = "") -> Optional[StampedPose]:
    """A base-to-end-effector transform as the current end-effector pose (see
    ``observation_inputs.eef_pose_from_transform``); None when it cannot be one."""
    return eef_pose_from_transform(
        geometry_from(Vector3, msg.transform.translation),
        geometry_from(Quaternion, msg.transform.rotation),
        msg.header.frame_id,
        base_frame,
        stamp_to_nanoseconds(msg.header.stamp),
    )


def observation_image_stamp(msg: ObservationMsg) -> Time:
    """The stamp of the observation's colour image: its own, else the observation's."""
    stamp = msg.rgb_image.header.stamp
    return stamp if stamp_to_nanoseconds(stamp) != 0 else msg.header.stamp


def observation_joint_state(msg: ObservationMsg) -> Optional[JointStateData]:
    return joint_state_to_data(msg.joint_states) if msg.has_joint_states else None


def observation_eef_pose(msg: ObservationMsg) -> Optional[StampedPose]:
    return transform_to_eef_pose(msg.base_to_ee, msg.base_frame) if msg.has_base_to_ee else None


# ---------------------------------------------------------------- decisions


def action_to_policy_output(action: PolicyAction, stamp: Time) -> PolicyOutput:
    """A decision as a PolicyOutput stamped with its observation's stamp."""
    msg = PolicyOutput()
    msg.header.stamp = stamp
    msg.header.frame_id = action.reference_frame
    msg.reference_frame = action.reference_frame
    msg.has_eef_target = action.eef_target is not None
    if action.eef_target is not None:
        msg.eef_target_pose = pose_to_msg(action.eef_target)
    msg.eef_target_mode = EEF_MODE_TO_MSG[EefTargetMode(action.eef_target_mode)]
    msg.has_joint_deltas = action.joint_deltas is not None
    msg.joint_deltas = [float(v) for v in action.joint_deltas or ()]
    msg.gripper_active = action.gripper_command is not None
    msg.gripper_command = float(action.gripper_command or 0.0)
    msg.has_base_hint = action.base_velocity_hint is not None
    if action.base_velocity_hint is not None:
        msg.base_velocity_hint = twist_to_msg(action.base_velocity_hint)
    msg.confidence = float(action.confidence)
    return msg


def policy_output_to_action(msg: PolicyOutput) -> PolicyAction:
    """The inverse of action_to_policy_output (for consumers, tests and the demo)."""
    return PolicyAction(
        reference_frame=msg.reference_frame,
        eef_target=pose_from_msg(msg.eef_target_pose) if msg.has_eef_target else None,
        eef_target_mode=EEF_MODE_FROM_MSG[msg.eef_target_mode],
        joint_deltas=tuple(msg.joint_deltas) if msg.has_joint_deltas else None,
        gripper_command=msg.gripper_command if msg.gripper_active else None,
        base_velocity_hint=twist_from_msg(msg.base_velocity_hint) if msg.has_base_hint else None,
        confidence=msg.confidence,
    )


# ---------------------------------------------------------------- action chunks


def step_due_nanoseconds(stamp_ns: int, step_index: int, action_period_sec: float) -> int:
    """When step ``step_index`` of a chunk is due: the observation's stamp + i * period."""
    return int(stamp_ns) + round(step_index * action_period_sec * NANOSECONDS)


def command_to_policy_output(
    action: PolicyAction,
    stamp: Time,
    due_ns: int,
    step_index: int,
    chunk_length: int,
    request_id: str,
) -> PolicyOutput:
    """One command of a chunk: the observation's stamp, when it is due, where it comes from."""
    msg = action_to_policy_output(action, stamp)
    msg.due = nanoseconds_to_stamp(due_ns)
    msg.step_index = int(step_index)
    msg.chunk_length = int(chunk_length)
    msg.request_id = request_id
    return msg


def chunk_to_msg(chunk: ActionChunk, stamp: Time, request_id: str) -> PolicyActionChunk:
    """A whole chunk, each action with its due time (header: the observation's)."""
    stamp_ns = stamp_to_nanoseconds(stamp)
    msg = PolicyActionChunk()
    msg.header.stamp = stamp
    msg.header.frame_id = chunk.reference_frame
    msg.action_period_sec = float(chunk.action_period_sec)
    msg.actions = [
        command_to_policy_output(
            action, stamp, step_due_nanoseconds(stamp_ns, i, chunk.action_period_sec), i,
            len(chunk), request_id,
        )
        for i, action in enumerate(chunk.actions)
    ]
    return msg
