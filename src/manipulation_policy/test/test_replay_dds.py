"""A real policy node's run over DDS, recorded, replays to the commands it published.

The recorder subscribes as ``ros2 bag record`` does (serialized CDR, log time = its
clock at receipt) and writes the bag with rosbags' writer; the node's params file is
the replay's --params-file.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest
from node_harness import Rig, wait_until
from rclpy.qos import qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from replay_bags import STORE
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from sensor_msgs.msg import Image, JointState

from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.replay.cli import EXIT_PASSED, main
from manipulation_policy.server.process import ServerProcess

FRAMES = 6


class Recorder:
    """Serialized messages of ``topics`` as they arrive, with the time they arrived."""

    def __init__(self, rig: Rig, topics: dict[str, tuple[type, Any]]):
        self._node = rig.add(rig.node.__class__("replay_recorder", context=rig.context))
        self._lock = threading.Lock()
        self.messages: list[tuple[str, str, int, bytes]] = []
        for topic, (message_type, qos) in topics.items():
            name = message_type.__module__.split(".")[0] + "/msg/" + message_type.__name__
            self._node.create_subscription(
                message_type, topic, lambda data, t=topic, n=name: self._store(t, n, data), qos,
                raw=True,
            )

    def _store(self, topic: str, msgtype: str, data: bytes) -> None:
        with self._lock:
            self.messages.append((topic, msgtype, self._node.get_clock().now().nanoseconds,
                                  bytes(data)))

    def count(self, topic: str) -> int:
        with self._lock:
            return sum(1 for m in self.messages if m[0] == topic)

    def write(self, path) -> None:
        with self._lock:
            messages = sorted(self.messages, key=lambda m: m[2])
        connections = {}
        with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
            for topic, msgtype, time_ns, data in messages:
                if topic not in connections:
                    connections[topic] = writer.add_connection(topic, msgtype, typestore=STORE)
                writer.write(connections[topic], time_ns, data)


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


@pytest.fixture(scope="module")
def stub_server():
    with ServerProcess("--backend", "stub") as server:
        yield server


@pytest.mark.parametrize("path", ["in-process", "remote"])
def test_a_recorded_node_run_replays_to_the_commands_it_published(rig, tmp_path, path, request):
    """policy_node replayed with --backend, remote_policy_node with --server: exactly the
    commands each published (tolerances 0)."""
    topics = rig.topics
    values = {
        "inference_rate": 20.0, "use_observation": False,
        "input_timeout_sec": 60.0, "instruction": "stack the blocks",
    }
    if path == "remote":
        server = request.getfixturevalue("stub_server")
        values["remote_url"] = server.base_url
        make_node, replay_path = RemotePolicyNode, ["--server", server.base_url]
    else:
        values["backend"] = "stub"
        make_node, replay_path = PolicyNode, ["--backend", "stub"]
    recorder = Recorder(rig, {
        topics["camera_topic"]: (Image, qos_profile_sensor_data),
        topics["joint_states_topic"]: (JointState, 50),
        topics["output_topic"]: (PolicyOutput, 50),
    })
    node = rig.add(make_node(**rig.node_kwargs(**values)))
    rig.stream_joint_states()
    assert wait_until(lambda: recorder.count(topics["joint_states_topic"]) >= 2)
    assert wait_until(lambda: rig.image_pub.get_subscription_count() >= 2)
    for index in range(FRAMES):
        rgb = np.empty((24, 32, 3), dtype=np.uint8)
        rgb[...] = (40 + 30 * index, 200 - 20 * index, 90 + 10 * index)
        rig.publish_image(rgb)
        # One frame at a time, more than a period (at 20 Hz) after the last answer: the
        # node is never busy nor held back by the rate, so it answers every frame.
        assert wait_until(lambda n=index + 1: recorder.count(topics["output_topic"]) >= n)
        time.sleep(0.06)
    assert node.counters["inferences"] == FRAMES
    bag = tmp_path / "episode"
    recorder.write(bag)

    params = tmp_path / "params.yaml"
    params.write_text(
        "/**:\n  ros__parameters:\n"
        + "".join(f"    {name}: {json.dumps(value)}\n"
                  for name, value in {**topics, **values}.items())
    )
    report = tmp_path / "report.json"
    status = main([str(bag), *replay_path, "--params-file", str(params),
                   "--output", str(tmp_path / "replay"), "--report-json", str(report),
                   "--no-progress", "--position-tolerance", "0", "--rotation-tolerance", "0",
                   "--joint-tolerance", "0", "--gripper-tolerance", "0"])
    summary = json.loads(report.read_text())["summary"]
    assert status == EXIT_PASSED, summary
    assert summary["steps"] == summary["paired"] == summary["within"] == FRAMES

    # What `ros2 bag play` would publish: the replay's bytes are ROS's own messages.
    recorded = [deserialize_message(data, PolicyOutput)
                for topic, _, _, data in recorder.messages if topic == topics["output_topic"]]
    with AnyReader([tmp_path / "replay"], default_typestore=STORE) as reader:
        [connection] = [c for c in reader.connections if c.topic == topics["output_topic"]]
        replayed = [deserialize_message(bytes(raw), PolicyOutput)
                    for _, _, raw in reader.messages(connections=[connection])]
    assert [(m.header, m.due, m.step_index, m.gripper_command, m.joint_deltas.tolist())
            for m in replayed] == [
        (m.header, m.due, m.step_index, m.gripper_command, m.joint_deltas.tolist())
        for m in recorded]
