"""A backend that declares the cameras and state it reads, served by the real server:
/info shows them, a request that lacks them is a 422 naming the field before it is
queued, and what the backend is given is what the robot sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from server_test_backends import CamerasBackend

from manipulation_policy import policy_server
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.contract import observation_to_request
from manipulation_policy.core.policy_inputs import inputs_from_wire
from manipulation_policy.core.policy_types import Observation
from manipulation_policy.server.process import ServerProcess

TEST_DIR = str(Path(__file__).resolve().parent)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        "--backend", "server_test_backends:CamerasBackend", "--no-access-log",
        env={API_KEY_ENV: ""}, extra_pythonpath=[TEST_DIR],
    ) as process:  # fmt: skip
        yield process


@pytest.fixture(autouse=True)
def server_survives(server):
    yield
    assert server.process.poll() is None
    assert requests.get(f"{server.base_url}/health", timeout=5).json() == {"status": "ok"}
    assert "Traceback" not in server.log()


def post_infer(server, body: dict) -> requests.Response:
    return requests.post(f"{server.base_url}/infer", data=json.dumps(body), headers=JSON,
                         timeout=10)  # fmt: skip


def frame(width: int, height: int, value: int) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def test_info_shows_what_the_backend_reads(server):
    info = requests.get(f"{server.base_url}/info", timeout=5).json()
    assert info["inputs"] == {"image_names": ["wrist", "front"], "state_length": 3,
                              "action_length": 5}  # fmt: skip
    assert inputs_from_wire(info["inputs"]) == CamerasBackend.INPUTS


def test_the_backend_gets_every_camera_the_state_and_the_robot_id(server):
    observation = Observation(
        images={"front": frame(32, 24, 200), "wrist": frame(16, 12, 40), "top": frame(8, 8, 0)},
        state=(0.5, -0.25, 1.0),
        robot_id="/arm/remote_policy_node",
    )
    answer = post_infer(server, observation_to_request(observation))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["joint_names"] == ["state[0]", "state[1]", "state[2]", "wrist:16x12",
                                   "front:32x24", "robot_id=/arm/remote_policy_node"]  # fmt: skip
    positions = body["joint_positions"]
    assert positions[:3] == [0.5, -0.25, 1.0]
    assert positions[3] == pytest.approx(40, abs=2) and positions[4] == pytest.approx(200, abs=2)
    assert body["has_joint_positions"] is True
    assert body["actions"][0]["joint_names"] == body["joint_names"]


@pytest.mark.parametrize(
    "observation, field, words",
    [
        (Observation(images={"wrist": frame(8, 8, 1)}, state=(0.0,) * 3),
         "images.front", "front, wrist"),
        (Observation(images={"front": frame(8, 8, 1), "top": frame(8, 8, 1)}, state=(0.0,) * 3),
         "images.wrist", "front, top"),
        (Observation(image=frame(8, 8, 1), state=(0.0,) * 3), "images.wrist", "sends none"),
        (Observation(images={"wrist": frame(8, 8, 1), "front": frame(8, 8, 1)}),
         "state", "is missing"),
        (Observation(images={"wrist": frame(8, 8, 1), "front": frame(8, 8, 1)}, state=(0.0,) * 4),
         "state", "has 4 values, but the policy reads 3"),
    ],
)  # fmt: skip
def test_a_request_that_lacks_what_the_backend_reads_is_422_naming_it(
    server, observation, field, words
):
    answer = post_infer(server, observation_to_request(observation))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert (body["error"], body["field"]) == ("invalid_request", field)
    assert words in body["detail"]


def test_a_declaration_the_server_cannot_read_stops_it_with_one_line(monkeypatch, capsys):
    monkeypatch.syspath_prepend(TEST_DIR)
    monkeypatch.setenv(API_KEY_ENV, "")
    assert policy_server.main(["--backend", "server_test_backends:BadInputsBackend"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "policy_server: error: cannot load backend 'server_test_backends:BadInputsBackend': "
        "inputs() returned dict, not a PolicyInputs"
    ]


def test_a_backend_without_inputs_shows_none(monkeypatch):
    with ServerProcess("--backend", "stub", env={API_KEY_ENV: ""}) as stub:
        assert "inputs" not in requests.get(f"{stub.base_url}/info", timeout=5).json()
