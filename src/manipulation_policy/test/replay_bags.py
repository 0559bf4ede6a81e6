"""Small recorded episodes for the replay tests, written with rosbags (no ROS needed).

``write_episode`` records what a robot's ``ros2 bag record`` would: camera frames
(uniform colours that change, so the stub's answers differ frame by frame), joint
states, optionally a task, and optionally the outputs a node published.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image as PILImage
from rosbags.rosbag2 import StoragePlugin, Writer

from manipulation_policy.replay.bag_types import POLICY_OUTPUT, build_message, message_typestore
from manipulation_policy.robot.message_fields import time_fields

STORE = message_typestore()
START_NS = 1_700_000_000_000_000_000
CAMERA = "/camera/color/image_raw"
JOINTS = "/joint_states"
TASK = "/manipulation/instruction"
EEF_POSE = "/manipulation/eef_pose"
OBSERVATION = "/manipulation/observation"
OUTPUT = "/manipulation/policy_output"
JOINT_NAMES = ["shoulder", "elbow", "wrist"]


def frame_colour(index: int) -> tuple[int, int, int]:
    return (60 + 13 * index % 190, 200 - 7 * index % 150, 90 + 11 * index % 120)


@dataclass
class Episode:
    frames: int = 8
    frame_period_ns: int = 250_000_000  # 4 Hz: under the node's default rate of 5 Hz
    width: int = 32
    height: int = 24
    task: Optional[str] = None
    outputs: Sequence[tuple[int, dict[str, Any]]] = ()  # (log time, PolicyOutput fields)
    camera_topic: str = CAMERA
    camera_type: str = "sensor_msgs/msg/Image"
    extra: Sequence[tuple[str, str, int, dict[str, Any]]] = ()  # topic, type, time, fields
    joint_states: bool = True
    compressed: bool = False  # frames as sensor_msgs/CompressedImage (PNG) on camera/compressed
    eef_frame: Optional[str] = None  # end-effector poses on EEF_POSE in this frame
    as_observation: bool = False  # frames and joints in manipulation_msgs/Observation only
    storage: StoragePlugin = StoragePlugin.MCAP
    frame_times: list[int] = field(default_factory=list)

    def frame_time(self, index: int) -> int:
        return START_NS + 100_000_000 + index * self.frame_period_ns


def image_fields(stamp_ns: int, rgb: np.ndarray) -> dict[str, Any]:
    height, width = rgb.shape[:2]
    return {
        "header": {"stamp": time_fields(stamp_ns), "frame_id": "camera"},
        "height": height, "width": width, "encoding": "rgb8", "is_bigendian": 0,
        "step": width * 3, "data": np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1),
    }


def compressed_fields(stamp_ns: int, rgb: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return {
        "header": {"stamp": time_fields(stamp_ns), "frame_id": "camera"},
        "format": "rgb8; png compressed rgb8",
        "data": np.frombuffer(buffer.getvalue(), dtype=np.uint8),
    }


def eef_fields(stamp_ns: int, frame: str, index: int) -> dict[str, Any]:
    return {
        "header": {"stamp": time_fields(stamp_ns), "frame_id": frame},
        "pose": {"position": {"x": 0.4 + 0.01 * index, "y": 0.0, "z": 0.3},
                 "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}},
    }


def joint_fields(stamp_ns: int, index: int) -> dict[str, Any]:
    return {
        "header": {"stamp": time_fields(stamp_ns)},
        "name": JOINT_NAMES,
        "position": [0.3 + 0.01 * index, -0.2, 0.9 - 0.02 * index],
        "velocity": [], "effort": [],
    }


def episode_messages(episode: Episode) -> Iterable[tuple[str, str, int, dict[str, Any]]]:
    """(topic, type, log time, fields), in time order."""
    messages = []
    if episode.task is not None:
        messages.append((TASK, "std_msgs/msg/String", START_NS, {"data": episode.task}))
    end = episode.frame_time(episode.frames)
    joints = {}
    if episode.joint_states:
        for index, time_ns in enumerate(range(START_NS, end, 50_000_000)):
            joints[time_ns] = joint_fields(time_ns, index)
            if not episode.as_observation:
                messages.append((JOINTS, "sensor_msgs/msg/JointState", time_ns, joints[time_ns]))
            if episode.eef_frame is not None:
                messages.append((EEF_POSE, "geometry_msgs/msg/PoseStamped", time_ns,
                                 eef_fields(time_ns, episode.eef_frame, index)))
    for index in range(episode.frames):
        time_ns = episode.frame_time(index)
        rgb = np.empty((episode.height, episode.width, 3), dtype=np.uint8)
        rgb[...] = frame_colour(index)
        if episode.as_observation:
            latest = max((t for t in joints if t <= time_ns), default=None)
            messages.append((OBSERVATION, "manipulation_msgs/msg/Observation", time_ns, {
                "header": {"stamp": time_fields(time_ns), "frame_id": "base_link"},
                "rgb_image": image_fields(time_ns, rgb), "has_rgb_image": True,
                "joint_states": joints.get(latest, {}), "has_joint_states": latest is not None,
                "base_frame": "base_link",
            }))
        elif episode.compressed:
            messages.append((episode.camera_topic + "/compressed",
                             "sensor_msgs/msg/CompressedImage", time_ns,
                             compressed_fields(time_ns, rgb)))
        else:
            messages.append((episode.camera_topic, episode.camera_type, time_ns,
                             image_fields(time_ns, rgb)))
    messages += [(OUTPUT, POLICY_OUTPUT, t, fields) for t, fields in episode.outputs]
    messages += list(episode.extra)
    return sorted(messages, key=lambda m: m[2])


def write_episode(path: Path, episode: Episode) -> Path:
    connections = {}
    with Writer(path, version=8, storage_plugin=episode.storage) as writer:
        for topic, msgtype, time_ns, fields in episode_messages(episode):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=STORE)
            message = build_message(STORE, msgtype, fields)
            writer.write(connections[topic], time_ns, STORE.serialize_cdr(message, msgtype))
    return path
