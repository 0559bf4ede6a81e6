"""Reading a recorded episode: a rosbag2 folder (MCAP or sqlite3) or a single .mcap or
.db3 file, with rosbags (pure Python, no ROS).

``RecordedBag`` checks up front what a replay needs (the camera or the aggregated
observation, the joint states, known message types) and says what is wrong in one
line (``ReplayInputError``); a bag that turns out truncated or corrupt while it is
read raises the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rosbags.highlevel import AnyReader
from rosbags.typesys.store import Typestore

from manipulation_policy.replay.bag_types import OBSERVATION, POLICY_OUTPUT
from manipulation_policy.replay.errors import ReplayInputError
from manipulation_policy.replay.simulated_node import (
    CAMERA,
    EEF_POSE,
    INSTRUCTION,
    JOINT_STATES,
    camera_kind,
)
from manipulation_policy.replay.simulated_node import OBSERVATION as OBSERVATION_KIND
from manipulation_policy.robot.camera_inputs import CameraSpec, camera_specs

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
RECORDED_OUTPUT = "recorded_output"


@dataclass(frozen=True)
class InputTopics:
    """The topics the node listens to (and publishes on), from its parameters."""

    camera: str
    camera_type: str
    joint_states: str
    eef_pose: str
    instruction: str
    observation: Optional[str]  # None without use_observation
    output: str
    cameras: tuple[CameraSpec, ...] = ()  # camera_topics; empty: the one ``camera``

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> InputTopics:
        compressed = values["image_transport"].strip().lower() == "compressed"
        camera = values["camera_topic"]
        return cls(
            camera=camera.rstrip("/") + "/compressed" if compressed else camera,
            camera_type=COMPRESSED_IMAGE if compressed else IMAGE,
            joint_states=values["joint_states_topic"],
            eef_pose=values["eef_pose_topic"],
            instruction=values["instruction_topic"],
            observation=values["observation_topic"] if values["use_observation"] else None,
            output=values["output_topic"],
            cameras=camera_specs(
                values["camera_topics"], values["camera_names"], values["image_transport"]
            ),
        )

    def expected(self) -> dict[str, tuple[str, str]]:
        """topic -> (kind, message type)."""
        if self.cameras:
            topics = {c.topic: (camera_kind(c.name), COMPRESSED_IMAGE if c.compressed else IMAGE)
                      for c in self.cameras}
        else:
            topics = {self.camera: (CAMERA, self.camera_type)}
        topics.update({
            self.joint_states: (JOINT_STATES, "sensor_msgs/msg/JointState"),
            self.eef_pose: (EEF_POSE, "geometry_msgs/msg/PoseStamped"),
            self.instruction: (INSTRUCTION, "std_msgs/msg/String"),
            self.output: (RECORDED_OUTPUT, POLICY_OUTPUT),
        })
        if self.observation is not None:
            topics[self.observation] = (OBSERVATION_KIND, OBSERVATION)
        return topics


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _bag_paths(path: Path) -> list[Path]:
    """rosbags opens a rosbag2 folder; a lone .mcap/.db3 file is its own one-file bag."""
    if not path.exists():
        raise ReplayInputError(f"{path}: no such bag")
    return [path]


class RecordedBag:
    """One recording, opened for reading (a context manager)."""

    def __init__(self, path: str, store: Typestore):
        self.path = Path(path)
        try:
            self._reader = AnyReader(_bag_paths(self.path), default_typestore=store)
            self._reader.open()
        except ReplayInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - rosbags raises many kinds: one line
            raise ReplayInputError(
                f"{self.path}: not a readable rosbag2 recording ({_first_line(exc)})"
            ) from None

    def __enter__(self) -> RecordedBag:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._reader.close()
        except Exception:  # noqa: BLE001 - closing a broken bag must not hide why it broke
            pass

    def topics(self) -> dict[str, str]:
        """topic -> message type, of every connection in the bag."""
        return {c.topic: c.msgtype for c in self._reader.connections}

    def message_count(self, topics: Mapping[str, Any]) -> int:
        return sum(c.msgcount for c in self._reader.connections if c.topic in topics)

    def check_inputs(self, topics: InputTopics) -> dict[str, str]:
        """topic -> kind of each input this bag has; ReplayInputError if one it needs is
        missing or of another type."""
        present = self.topics()
        kinds = {}
        for topic, (kind, msgtype) in topics.expected().items():
            if topic not in present:
                continue
            if present[topic] != msgtype:
                raise ReplayInputError(
                    f"{self.path}: {topic} is {present[topic]}, not the {msgtype} the node reads"
                )
            kinds[topic] = kind
        images = sorted(t for t, kind in present.items() if kind in IMAGE_TYPES)
        has_observation = topics.observation is not None and topics.observation in present
        if not images and not has_observation:
            raise ReplayInputError(f"{self.path}: the bag holds no image topic")
        for camera in topics.cameras:
            # The aggregated observation's one image is no camera of a set (as in the node).
            if camera.topic not in present:
                raise ReplayInputError(
                    f"{self.path}: no topic {camera.topic} of camera {camera.name} in the bag "
                    f"(its image topics: {', '.join(images)}); check camera_topics"
                )
        if not topics.cameras and topics.camera not in present and not has_observation:
            raise ReplayInputError(
                f"{self.path}: no camera topic {topics.camera} in the bag (its image "
                f"topics: {', '.join(images)}); give --camera-topic or the params file"
            )
        if topics.joint_states not in present and not has_observation:
            raise ReplayInputError(
                f"{self.path}: no joint states topic {topics.joint_states} in the bag"
            )
        return kinds

    def messages(self, kinds: Mapping[str, str]) -> Iterator[tuple[str, int, Any]]:
        """(kind, log time in ns, deserialized message) in log time order."""
        connections = [c for c in self._reader.connections if c.topic in kinds]
        try:
            for connection, time_ns, raw in self._reader.messages(connections=connections):
                message = self._reader.deserialize(raw, connection.msgtype)
                yield kinds[connection.topic], time_ns, message
        except ReplayInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt: one line
            raise ReplayInputError(
                f"{self.path}: the bag is truncated or corrupt ({_first_line(exc)})"
            ) from None
