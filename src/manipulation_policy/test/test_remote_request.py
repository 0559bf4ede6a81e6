"""The remote node's request for any camera size, to a real server and back.

ROS-free, so it also runs on the robot's floor (Python 3.10, Ubuntu 22.04's
Pillow 9.0.1 and numpy 1.21.5), where resizing once failed on every frame
that was not already image_width x image_height and the node held forever.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.imaging import decode_base64_image
from manipulation_policy.core.policy_types import JointStateData, Observation
from manipulation_policy.robot.remote_client import RemoteClient, RemoteSettings
from manipulation_policy.robot.remote_request import remote_request_body
from manipulation_policy.server.process import ServerProcess

WIDTH, HEIGHT = 224, 224


def camera_frame(width: int, height: int) -> np.ndarray:
    """A frame with structure in it: a horizontal red ramp over a vertical blue one."""
    red = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    blue = np.linspace(255, 0, height, dtype=np.float64)[:, None].repeat(width, 1)
    return np.stack([red, np.full_like(red, 90.0), blue], axis=2).astype(np.uint8)


def observation(width: int, height: int) -> Observation:
    return Observation(
        joint_state=JointStateData(
            name=("shoulder", "elbow"),
            position=(0.1, -0.2),
            velocity=(math.nan, 0.0),  # a driver's "unknown": dropped, not sent
        ),
        image=camera_frame(width, height),
        instruction="pick up the cup",
    )


@pytest.mark.parametrize("size", [(640, 480), (224, 224), (64, 48), (1280, 720)])
def test_every_camera_size_becomes_a_request_of_the_configured_size(size):
    body = remote_request_body(observation(*size), WIDTH, HEIGHT, jpeg_quality=90)
    image = decode_base64_image(body["image"], body["image_encoding"])
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert (body["image_width"], body["image_height"]) == (WIDTH, HEIGHT)
    assert body["joint_states"]["velocity"] == []
    # Resized, not cropped or blank: the left-to-right red ramp survives.
    assert image[:, 0, 0].mean() < 40 and image[:, -1, 0].mean() > 215


def test_extra_fields_are_added_to_the_request():
    body = remote_request_body(
        observation(64, 48), WIDTH, HEIGHT, 90, {"openvla_xyz_scaling": 2.0}
    )
    assert body["openvla_xyz_scaling"] == 2.0


def test_a_640x480_frame_gets_a_real_action_from_a_real_server():
    with ServerProcess("--backend", "stub") as server:
        client = RemoteClient(RemoteSettings(url=server.base_url, timeout_sec=5.0))
        try:
            body = remote_request_body(observation(640, 480), WIDTH, HEIGHT, jpeg_quality=90)
            result = client.infer(body)
        finally:
            client.close()
    assert result.ok, result.failure
    sent = observation(640, 480)
    expected = StubBackend().predict(
        Observation(
            sent.joint_state,
            decode_base64_image(body["image"], "jpeg"),
            instruction=sent.instruction,
        )
    )
    assert not result.action.is_hold and result.action.eef_target is not None
    assert result.action.eef_target == expected.eef_target


def test_each_named_camera_is_sized_and_sent_with_the_state_and_the_robot_id():
    sent = Observation(
        images={"wrist": camera_frame(640, 480), "front": camera_frame(64, 48)},
        state=(0.25, -1.5, 3.0),
        robot_id="/robot1/remote_policy_node",
    )
    body = remote_request_body(sent, WIDTH, HEIGHT, jpeg_quality=90)
    assert set(body["images"]) == {"wrist", "front"}
    for camera in body["images"].values():
        image = decode_base64_image(camera["image"], camera["image_encoding"])
        assert image.shape == (HEIGHT, WIDTH, 3)
        assert (camera["image_width"], camera["image_height"]) == (WIDTH, HEIGHT)
    assert body["state"] == [0.25, -1.5, 3.0]
    assert body["robot_id"] == "/robot1/remote_policy_node"
    assert body.get("image") in (None, "")  # no unnamed camera
