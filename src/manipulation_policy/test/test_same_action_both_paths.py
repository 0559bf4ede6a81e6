"""The same observation gives the same action in-process and through the HTTP server.

Both paths call the same backend code; this checks that nothing between them
(request building, JPEG, JSON, validation, response parsing) changes the answer.
The in-process side is fed the image exactly as the server decodes it, since
JPEG is lossy and the server only ever sees the JPEG.
"""

from __future__ import annotations

import math

import numpy as np
import requests

from manipulation_policy.backends import create_backend
from manipulation_policy.contract import (
    observation_to_request,
    parse_request,
    parse_response,
    request_to_observation,
    response_to_action,
)
from manipulation_policy.policy_types import (
    JointStateData,
    Observation,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.server_process import running_server

INSTRUCTION = "put the carrot on the plate"


def observations(image_factory):
    joints = JointStateData(("j1", "j2", "j3"), (0.4, -0.3, 1.2), (0.0, 0.1, 0.0), ())
    yield Observation(joint_state=joints, image=image_factory(0), instruction=INSTRUCTION)
    yield Observation(
        joint_state=joints,
        image=image_factory(1),
        instruction=INSTRUCTION,
        reference_frame="arm_base",
        eef_pose=Pose(Vector3(0.35, 0.05, 0.25), Quaternion(0.0, 0.0, math.sqrt(0.5),
                                                              math.sqrt(0.5))),
    )


def make_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    image[:, : 40 + 40 * seed, seed] = 255
    return image


def assert_same_action_both_ways(server_args, backend):
    with running_server(*server_args, startup_timeout=120.0) as base_url:
        answers = []
        for observation in observations(make_image):
            body = observation_to_request(observation, request_id="same-1")
            reply = requests.post(f"{base_url}/infer", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            remote = response_to_action(parse_response(reply.json()))
            as_server_sees_it = request_to_observation(parse_request(body))
            local = backend.predict(as_server_sees_it)
            assert remote == local
            assert not remote.is_hold
            answers.append(remote)
        assert answers[0] != answers[1]  # the comparison is not between constant answers


def test_stub_backend_same_action_in_process_and_remote():
    assert_same_action_both_ways(("--backend", "stub"), create_backend("stub"))


def test_openvla_backend_same_action_in_process_and_remote(tiny_openvla_dir):
    options = {"model": str(tiny_openvla_dir), "device": "cpu"}
    backend = create_backend("openvla", **options)
    server_args = ("--backend", "openvla", "--model", str(tiny_openvla_dir), "--device", "cpu")
    assert_same_action_both_ways(server_args, backend)
