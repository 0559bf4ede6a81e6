"""The same observation gives the same action in-process and through the HTTP server.

Both paths call the same backend code; this checks that nothing between them
(request building, JPEG, JSON, validation, response parsing) changes the answer.
The in-process side is fed the image exactly as the server decodes it, since
JPEG is lossy and the server only ever sees the JPEG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import requests
from server_test_backends import FIXED_ABSOLUTE, FIXED_DELTA, FixedDeltaBackend

from manipulation_policy.backends import create_backend, predictor
from manipulation_policy.core.contract import (
    observation_to_request,
    parse_request,
    parse_response,
    request_to_observation,
    response_to_chunk,
)
from manipulation_policy.core.policy_types import (
    EefTargetMode,
    JointStateData,
    Observation,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.core.pose_math import apply_delta
from manipulation_policy.server.process import running_server

TEST_DIR = str(Path(__file__).resolve().parent)

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
            remote = response_to_chunk(parse_response(reply.json()))
            as_server_sees_it = request_to_observation(parse_request(body))
            local = predictor(backend)(as_server_sees_it)  # what policy_node calls
            assert remote == local
            assert not remote.actions[0].is_hold
            answers.append(remote)
        assert answers[0] != answers[1]  # the comparison is not between constant answers


def test_stub_backend_same_action_in_process_and_remote():
    assert_same_action_both_ways(("--backend", "stub"), create_backend("stub"))


def test_openvla_backend_same_action_in_process_and_remote(tiny_openvla_dir):
    options = {"model": str(tiny_openvla_dir), "device": "cpu"}
    backend = create_backend("openvla", **options)
    server_args = ("--backend", "openvla", "--model", str(tiny_openvla_dir), "--device", "cpu")
    assert_same_action_both_ways(server_args, backend)


def test_a_delta_answer_is_composed_with_eef_pose_once_on_both_paths():
    # The backend never composes; the server and the in-process node's predictor do, once.
    backend = FixedDeltaBackend()
    current = Pose(Vector3(0.35, 0.05, 0.25), Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))
    expected = apply_delta(current, FIXED_DELTA.eef_target)
    with running_server(
        "--backend", "server_test_backends:FixedDeltaBackend", extra_pythonpath=[TEST_DIR]
    ) as base_url:
        for instruction, eef_pose, mode, target in (
            ("", current, EefTargetMode.ABSOLUTE, expected),
            ("", None, EefTargetMode.DELTA, FIXED_DELTA.eef_target),
            # An answer that is absolute already is not composed a second time.
            ("absolute", current, EefTargetMode.ABSOLUTE, FIXED_ABSOLUTE.eef_target),
        ):
            observation = Observation(instruction=instruction, eef_pose=eef_pose)
            reply = requests.post(
                f"{base_url}/infer", json=observation_to_request(observation), timeout=30
            )
            assert reply.status_code == 200, reply.text
            remote = response_to_chunk(parse_response(reply.json()))
            local = predictor(backend)(observation)
            assert remote == local
            (action,) = remote.actions
            assert action.eef_target_mode is mode
            assert action.eef_target == target
