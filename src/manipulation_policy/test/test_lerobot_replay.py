"""Replaying a two-camera arm's recording through a LeRobot ACT checkpoint
(lerobot_checkpoints: cameras wrist and front, a state of 6): in this process
(``--backend lerobot``) and through the real policy server serving the same checkpoint,
the same commands (up to the wire's JPEG), absolute joint targets named by the layout."""

from __future__ import annotations

import json
from pathlib import Path

import lerobot_checkpoints as lc
import numpy as np
import pytest

lc.require_lerobot()

from replay_bags import (  # noqa: E402
    OUTPUT,
    STORE,
    Episode,
    compressed_fields,
    write_episode,
)

from manipulation_policy.core.api_key import API_KEY_ENV  # noqa: E402
from manipulation_policy.replay.bag_input import RecordedBag  # noqa: E402
from manipulation_policy.replay.cli import EXIT_PASSED, main  # noqa: E402
from manipulation_policy.robot.message_fields import time_fields  # noqa: E402
from manipulation_policy.server.process import ServerProcess  # noqa: E402

ARM_JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll",
              "gripper"]
WRIST = "/arm/wrist/image_raw"
FRONT = "/arm/front/image_raw/compressed"
JOINTS = "/joint_states"
FRAMES = 4


def arm_episode(path: Path) -> Path:
    """Wrist frames raw, front frames PNG-compressed 5 ms later, the arm's joint states
    at 20 Hz; colours and joints change frame by frame."""
    episode = Episode(frames=FRAMES, camera_topic=WRIST, width=lc.IMAGE_SIZE,
                      height=lc.IMAGE_SIZE, joint_states=False)
    extra = []
    for index in range(FRAMES):
        stamp = episode.frame_time(index) + 5_000_000
        rgb = np.empty((lc.IMAGE_SIZE, lc.IMAGE_SIZE, 3), dtype=np.uint8)
        rgb[...] = (30 + 40 * index, 160, 90 - 15 * index)
        extra.append((FRONT, "sensor_msgs/msg/CompressedImage", stamp,
                      compressed_fields(stamp, rgb)))
    start = episode.frame_time(0) - 100_000_000
    for index in range(2 * FRAMES * 5 + 4):
        stamp = start + index * 50_000_000
        extra.append((JOINTS, "sensor_msgs/msg/JointState", stamp, {
            "header": {"stamp": time_fields(stamp)}, "name": ARM_JOINTS,
            "position": [0.1 + 0.01 * index, -0.4, 0.6, 0.2, -0.1, 0.3],
            "velocity": [], "effort": [],
        }))
    episode.extra = sorted(extra, key=lambda m: m[2])
    return write_episode(path, episode)


def flags() -> list[str]:
    return [
        "-p", f"camera_topics=[{WRIST}, {FRONT}]", "-p", "camera_names=[wrist, front]",
        "-p", f"state_joints=[{', '.join(ARM_JOINTS)}]", "-p", "max_joint_delta=1000.0",
        "--joint-tolerance", "0.001", "--gripper-tolerance", "0.001", "--no-progress",
    ]


def outputs(bag: Path) -> list:
    with RecordedBag(str(bag), STORE) as reader:
        return [m for _, _, m in reader.messages({OUTPUT: "o"})]


@pytest.fixture(scope="module")
def act_server(act_checkpoint):
    with ServerProcess(
        "--backend", "lerobot", "--model", str(act_checkpoint), "--action-layout",
        lc.ARM_LAYOUT, "--device", "cpu", "--no-access-log",
        env={API_KEY_ENV: ""}, startup_timeout=180.0,
    ) as server:  # fmt: skip
        yield server
    assert "Traceback" not in server.log()


def test_a_two_camera_recording_replays_the_same_in_process_and_served(
    tmp_path, act_checkpoint, act_server
):
    bag = arm_episode(tmp_path / "episode")
    local = tmp_path / "local"
    status = main([str(bag), "--output", str(local), "--backend", "lerobot", "--model",
                   str(act_checkpoint), "--action-layout", lc.ARM_LAYOUT, "--device", "cpu",
                   *flags()])
    assert status == EXIT_PASSED
    commands = outputs(local)
    # Each frame's chunk, absolute joint targets named by the layout (the gripper apart).
    assert len({(c.header.stamp.sec, c.header.stamp.nanosec) for c in commands}) == FRAMES
    targets = [c for c in commands if c.has_joint_positions]  # the rest: holds between
    assert len(targets) >= 2 * FRAMES
    assert all(list(c.joint_names) == ARM_JOINTS[:5] and len(c.joint_positions) == 5
               for c in targets)
    assert len({tuple(c.joint_positions) for c in targets}) > FRAMES  # not one repeated
    report = tmp_path / "served.json"
    status = main([str(bag), "--output", str(tmp_path / "served"), "--server",
                   act_server.base_url, "--compare-with", str(local), "--report-json",
                   str(report), *flags()])
    summary = json.loads(report.read_text())["summary"]
    assert status == EXIT_PASSED, summary
    assert summary["steps"] == summary["paired"] == summary["within"] == len(commands)
    assert summary["failures"]["candidate"] == 0
