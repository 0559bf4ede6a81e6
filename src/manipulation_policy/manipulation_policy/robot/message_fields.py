"""The field values of the messages the nodes publish, as nested dicts: no ROS needed.

``policy_output_fields`` and ``policy_action_chunk_fields`` say once what a
decision looks like as a manipulation_msgs/PolicyOutput (and a chunk as a
PolicyActionChunk). The nodes fill rclpy messages with them
(``nodes/ros_conversion``); the replay builds a bag's messages from the same
dicts (``replay/bag_types``), so a replayed command is stamped and filled exactly
as the node's. Keys are the .msg field names; a nested message is a nested dict;
a field left out keeps its default.
"""

from __future__ import annotations

from typing import Any

from manipulation_policy.core.policy_types import (
    ActionChunk,
    EefTargetMode,
    PolicyAction,
    geometry_to_dict,
)
from manipulation_policy.robot.message_reading import (
    EEF_MODE_VALUES,
    NANOSECONDS,
    step_due_nanoseconds,
)


def time_fields(nanoseconds: int) -> dict[str, int]:
    """builtin_interfaces/Time of ``nanoseconds``."""
    sec, nanosec = divmod(int(nanoseconds), NANOSECONDS)
    return {"sec": sec, "nanosec": nanosec}


def action_fields(action: PolicyAction, stamp_ns: int) -> dict[str, Any]:
    """A decision as PolicyOutput fields, stamped with its observation's stamp."""
    fields: dict[str, Any] = {
        "header": {"stamp": time_fields(stamp_ns), "frame_id": action.reference_frame},
        "reference_frame": action.reference_frame,
        "has_eef_target": action.eef_target is not None,
        "eef_target_mode": EEF_MODE_VALUES[EefTargetMode(action.eef_target_mode)],
        "has_joint_deltas": action.joint_deltas is not None,
        "joint_deltas": [float(v) for v in action.joint_deltas or ()],
        "gripper_active": action.gripper_command is not None,
        "gripper_command": float(action.gripper_command or 0.0),
        "has_base_hint": action.base_velocity_hint is not None,
        "confidence": float(action.confidence),
        "has_joint_positions": action.joint_positions is not None,
        "joint_positions": [float(v) for v in action.joint_positions or ()],
        "joint_names": [str(name) for name in action.joint_names or ()],
    }
    if action.eef_target is not None:
        fields["eef_target_pose"] = geometry_to_dict(action.eef_target)
    if action.base_velocity_hint is not None:
        fields["base_velocity_hint"] = geometry_to_dict(action.base_velocity_hint)
    return fields


def policy_output_fields(
    action: PolicyAction,
    stamp_ns: int,
    due_ns: int,
    step_index: int,
    chunk_length: int,
    request_id: str,
) -> dict[str, Any]:
    """One command of a chunk: the observation's stamp, when it is due, where it comes from."""
    fields = action_fields(action, stamp_ns)
    fields.update(
        due=time_fields(due_ns),
        step_index=int(step_index),
        chunk_length=int(chunk_length),
        request_id=request_id,
    )
    return fields


def policy_action_chunk_fields(
    chunk: ActionChunk, stamp_ns: int, request_id: str
) -> dict[str, Any]:
    """A whole chunk, each action with its due time (header: the observation's)."""
    return {
        "header": {"stamp": time_fields(stamp_ns), "frame_id": chunk.reference_frame},
        "action_period_sec": float(chunk.action_period_sec),
        "actions": [
            policy_output_fields(
                action, stamp_ns, step_due_nanoseconds(stamp_ns, i, chunk.action_period_sec),
                i, len(chunk), request_id,
            )
            for i, action in enumerate(chunk.actions)
        ],
    }

