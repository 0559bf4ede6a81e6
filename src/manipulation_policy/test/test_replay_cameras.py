"""The replay of a robot with several cameras and a state vector (``camera_topics``,
``camera_names``, ``state_joints``), through ``CamerasAndStateBackend``: it answers with
the mean red of each named camera, the state as received and the length of the robot_id,
so the replayed commands show which frame reached which name, at which stamp, and the
state's order. Bags are written with rosbags; the server is a real process on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from replay_bags import (
    OUTPUT,
    STORE,
    Episode,
    compressed_fields,
    frame_colour,
    joint_fields,
    write_episode,
)

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.replay.bag_input import RecordedBag
from manipulation_policy.replay.cli import EXIT_BAD_INPUT, EXIT_PASSED, main
from manipulation_policy.server.process import ServerProcess

BACKEND = "camera_test_backends:CamerasAndStateBackend"
WRIST = "/cameras/wrist/image_raw"  # raw
FRONT = "/cameras/front/image_raw/compressed"  # compressed (PNG: lossless)
FRONT_DELAY_NS = 10_000_000  # each front frame comes 10 ms after its wrist frame
STATE_JOINTS = ["wrist", "shoulder", "elbow"]
JOINT_PERIOD_NS = 50_000_000  # replay_bags writes joint states every 50 ms


def front_red(index: int) -> int:
    return 250 - 9 * index


def two_camera_episode(path: Path, frames: int = 6, front_frames: int = 6) -> Path:
    """Wrist frames on the episode's camera topic (raw), front frames (compressed) 10 ms
    later on FRONT, only the first ``front_frames`` of them."""
    episode = Episode(frames=frames, camera_topic=WRIST)
    extra = []
    for index in range(front_frames):
        stamp = episode.frame_time(index) + FRONT_DELAY_NS
        rgb = np.empty((episode.height, episode.width, 3), dtype=np.uint8)
        rgb[...] = (front_red(index), 10, 20)
        extra.append((FRONT, "sensor_msgs/msg/CompressedImage", stamp,
                      compressed_fields(stamp, rgb)))
    episode.extra = extra
    return write_episode(path, episode)


def camera_flags(*extra: str) -> list[str]:
    return [
        "-p", f"camera_topics=[{WRIST}, {FRONT}]", "-p", "camera_names=[wrist, front]",
        "-p", f"state_joints=[{', '.join(STATE_JOINTS)}]", "-p", "max_joint_delta=1000.0",
        *extra,
    ]


def replay(tmp_path: Path, bag: Path, *flags: str, name: str = "out"):
    output, report = tmp_path / name, tmp_path / f"{name}.json"
    status = main([str(bag), "--output", str(output), "--report-json", str(report),
                   "--no-progress", *flags])
    return status, output, json.loads(report.read_text()) if report.exists() else {}


def outputs(bag: Path) -> list:
    with RecordedBag(str(bag), STORE) as reader:
        return [m for _, _, m in reader.messages({OUTPUT: "o"})]


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def expected_state(frame_time_ns: int) -> list[float]:
    """The state of the newest joint states at a wrist frame's time, in STATE_JOINTS order."""
    episode = Episode()
    index = (frame_time_ns - (episode.frame_time(0) - 100_000_000)) // JOINT_PERIOD_NS
    fields = joint_fields(0, index)
    positions = dict(zip(fields["name"], fields["position"], strict=True))
    return [positions[name] for name in STATE_JOINTS]


@pytest.fixture(scope="module")
def camera_server():
    with ServerProcess(
        "--backend", BACKEND, "--no-access-log", env={API_KEY_ENV: ""},
        extra_pythonpath=[str(Path(__file__).resolve().parent)],
    ) as server:
        yield server


def test_two_cameras_and_the_state_reach_the_policy_by_name_at_the_first_cameras_stamp(
    tmp_path,
):
    bag = two_camera_episode(tmp_path / "episode")
    status, output, report = replay(tmp_path, bag, "--backend", BACKEND, *camera_flags())
    assert status == EXIT_PASSED
    messages = outputs(output)
    assert len(messages) == 6
    episode = Episode()
    for index, msg in enumerate(messages):
        # The set's stamp is the wrist's (the first camera); the front frame 10 ms later
        # completed it.
        assert stamp_ns(msg) == episode.frame_time(index)
        assert list(msg.joint_names) == ["red_wrist", "red_front", "state_0", "state_1",
                                         "state_2", "robot_id_length"]
        values = list(msg.joint_deltas)
        assert values[:2] == [frame_colour(index)[0], front_red(index)]
        assert values[2:5] == pytest.approx(expected_state(episode.frame_time(index)))
        assert values[5] == len("/policy_node")
    assert report["replay_counts"]["skipped_sets"] == 0
    assert report["skipped_sets"] == {}


def test_a_stale_cameras_sets_are_skipped_and_reported(tmp_path, capsys):
    bag = two_camera_episode(tmp_path / "episode", frames=6, front_frames=3)
    status, output, report = replay(tmp_path, bag, "--backend", BACKEND, *camera_flags())
    assert status == EXIT_PASSED
    messages = outputs(output)
    assert [values[0] for values in (list(m.joint_deltas) for m in messages)] == [
        frame_colour(i)[0] for i in range(3)]
    assert report["replay_counts"]["skipped_sets"] == 3
    reasons = report["skipped_sets"]
    assert sum(reasons.values()) == 3
    assert all(r.startswith("camera front: newest frame is") and "before wrist's" in r
               and "camera_sync_tolerance_sec=0.05" in r for r in reasons)
    assert "camera set(s) not sent: camera front" in capsys.readouterr().err


def test_a_joint_missing_from_the_joint_states_skips_every_set(tmp_path):
    bag = two_camera_episode(tmp_path / "episode", frames=3, front_frames=3)
    status, output, report = replay(
        tmp_path, bag, "--backend", BACKEND,
        *camera_flags("-p", "state_joints=[wrist, gripper, elbow]"))
    assert status == EXIT_PASSED
    assert outputs(output) == []
    assert report["replay_counts"]["skipped_sets"] == 3
    (reason,) = report["skipped_sets"]
    assert reason.startswith("state: joint 'gripper' is not in the joint states")


@pytest.mark.parametrize("flags, message", [
    (["-p", "camera_names=[wrist, top]"],
     "the policy does not fit this robot: images.front is missing: the policy reads "
     "cameras front, wrist, the robot sends top, wrist (camera_names)"),
    (["-p", "state_joints=[wrist, elbow]"], "(state_joints has 2)"),
    (["-p", "state_eef_pose=true"], "(state_joints has 3 + 7 with state_eef_pose)"),
])
def test_a_configuration_the_policy_cannot_read_is_refused_at_start(
    tmp_path, capsys, flags, message
):
    bag = two_camera_episode(tmp_path / "episode", frames=2, front_frames=2)
    status, output, _ = replay(tmp_path, bag, "--backend", BACKEND, *camera_flags(*flags))
    assert status == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not output.exists()


def test_camera_names_must_name_each_camera_topic(tmp_path, capsys):
    bag = two_camera_episode(tmp_path / "episode", frames=2, front_frames=2)
    status, output, _ = replay(tmp_path, bag, "--backend", BACKEND,
                               *camera_flags("-p", "camera_names=[wrist]"))
    assert status == EXIT_BAD_INPUT
    assert "camera_names must name each of camera_topics" in capsys.readouterr().err
    assert not output.exists()


def test_a_camera_topic_missing_from_the_bag_is_named(tmp_path, capsys):
    bag = write_episode(tmp_path / "episode", Episode(frames=2, camera_topic=WRIST))
    status, _, _ = replay(tmp_path, bag, "--backend", BACKEND, *camera_flags())
    assert status == EXIT_BAD_INPUT
    assert f"no topic {FRONT} of camera front in the bag" in capsys.readouterr().err


def test_the_server_gets_both_cameras_the_state_and_the_robot_id(tmp_path, camera_server):
    bag = two_camera_episode(tmp_path / "episode", frames=4, front_frames=4)
    status, output, _ = replay(tmp_path, bag, "--server", camera_server.base_url,
                               *camera_flags())
    assert status == EXIT_PASSED
    messages = outputs(output)
    assert len(messages) == 4
    episode = Episode()
    for index, msg in enumerate(messages):
        assert stamp_ns(msg) == episode.frame_time(index)
        values = list(msg.joint_deltas)
        # Each camera JPEG-encoded on the way: a solid colour survives within a unit or two.
        assert values[0] == pytest.approx(frame_colour(index)[0], abs=3)
        assert values[1] == pytest.approx(front_red(index), abs=3)
        assert values[2:5] == pytest.approx(expected_state(episode.frame_time(index)))
        assert values[5] == len("/remote_policy_node")


def test_a_server_whose_policy_does_not_fit_is_refused_at_start(tmp_path, camera_server, capsys):
    bag = two_camera_episode(tmp_path / "episode", frames=2, front_frames=2)
    status, output, _ = replay(tmp_path, bag, "--server", camera_server.base_url,
                               *camera_flags("-p", "camera_names=[wrist, top]"))
    assert status == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "the policy does not fit this robot" in err and "(camera_names)" in err
    assert not output.exists()
