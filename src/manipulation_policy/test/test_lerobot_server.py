"""LeRobot checkpoints (lerobot_checkpoints: ACT and Diffusion, two cameras, a state of
6) served by the REAL policy server process, ``python -m manipulation_policy.policy_server
--backend lerobot --model DIR --action-layout ...``, in the lerobot lane's venv: /info
shows the checkpoint's inputs, a request with ``images`` and ``state`` gets the chunk
the backend gives the same observation in this process (a camera of another size
resized as LeRobot's async inference does; a seeded Diffusion's chunk too), a request
that does not fit is a 422 naming the field, and a bad configuration stops the server
with one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lerobot_checkpoints as lc
import numpy as np
import pytest

lc.require_lerobot()

import requests  # noqa: E402
import torch  # noqa: E402
from lerobot.async_inference.helpers import resize_robot_observation_image  # noqa: E402
from PIL import Image  # noqa: E402

from manipulation_policy import policy_server  # noqa: E402
from manipulation_policy.backends import create_backend  # noqa: E402
from manipulation_policy.core.api_key import API_KEY_ENV  # noqa: E402
from manipulation_policy.core.contract import observation_to_request  # noqa: E402
from manipulation_policy.core.imaging import encode_jpeg  # noqa: E402
from manipulation_policy.core.policy_types import Observation  # noqa: E402
from manipulation_policy.server.process import ServerProcess  # noqa: E402

JSON = {"Content-Type": "application/json"}
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll"]
# Loading torch and lerobot in a fresh process takes a while on a loaded 2-core machine.
STARTUP_SEC = 180.0
SEED = 7


def serve(checkpoint: Path, *options: str) -> ServerProcess:
    return ServerProcess(
        "--backend", "lerobot", "--model", str(checkpoint), "--action-layout", lc.ARM_LAYOUT,
        "--device", "cpu", "--no-access-log", *options,
        env={API_KEY_ENV: ""}, startup_timeout=STARTUP_SEC,
    )  # fmt: skip


@pytest.fixture(scope="module")
def act_server(act_checkpoint):
    with serve(act_checkpoint, "--gripper-closed", "0.1", "--gripper-open", "0.5") as process:
        yield process
    assert "Traceback" not in process.log()


@pytest.fixture(scope="module")
def diffusion_server(diffusion_checkpoint):
    with serve(diffusion_checkpoint, "--fps", "30", "--seed", str(SEED)) as process:
        yield process
    assert "Traceback" not in process.log()


def observation(seed: int = 0, robot_id: str = "/arm/remote_policy_node", **changes):
    rng = np.random.default_rng(seed)
    fields = {
        "images": {name: rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
                   for name in lc.CAMERAS},
        "state": tuple(float(v) for v in rng.normal(0.1, 0.5, lc.STATE_LENGTH)),
        "instruction": "pick the cube",
        "robot_id": robot_id,
    }
    fields.update(changes)
    return Observation(**fields)


def as_the_server_sees_it(obs: Observation) -> Observation:
    """The observation with each camera through the wire's JPEG (quality 90)."""
    images = {
        name: np.asarray(Image.open(io.BytesIO(encode_jpeg(rgb, 90))).convert("RGB"))
        for name, rgb in obs.images.items()
    }
    return Observation(images=images, state=obs.state, instruction=obs.instruction,
                       robot_id=obs.robot_id)


def post(server, body: dict) -> requests.Response:
    return requests.post(f"{server.base_url}/infer", data=json.dumps(body), headers=JSON,
                         timeout=120)


def test_info_shows_the_checkpoints_inputs_and_the_backend(act_server):
    info = requests.get(f"{act_server.base_url}/info", timeout=10).json()
    assert info["inputs"] == {"image_names": list(lc.CAMERAS), "state_length": lc.STATE_LENGTH,
                              "action_length": lc.ACTION_LENGTH}
    backend = info["backend"]
    assert (backend["backend"], backend["policy_type"], backend["fps"]) == ("lerobot", "act", 50.0)
    assert backend["action_layout"] == lc.ARM_LAYOUT


def served_matrix(body: dict) -> np.ndarray:
    return np.array([a["joint_positions"] + [a["gripper_command"]] for a in body["actions"]])


def chunk_matrix(chunk) -> np.ndarray:
    return np.array([a.joint_positions + (a.gripper_command,) for a in chunk.actions])


def in_process(checkpoint: Path, obs: Observation, **options) -> np.ndarray:
    local = create_backend("lerobot", model=str(checkpoint), action_layout=lc.ARM_LAYOUT,
                           device="cpu", **options)
    try:
        return chunk_matrix(local.predict(obs))
    finally:
        local.close()


def test_a_request_with_images_and_state_gets_the_backends_chunk(act_server, act_checkpoint):
    sent = observation(seed=3)
    answer = post(act_server, observation_to_request(sent))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["actions"]) == lc.ACT_CHUNK
    assert body["action_period_sec"] == pytest.approx(1 / lc.ACT_FPS)
    first = body["actions"][0]
    assert first["has_joint_positions"] is True and first["joint_names"] == JOINTS
    assert body["joint_positions"] == first["joint_positions"]  # upstream's top level
    # The same observation, as the server decoded it, in this process: the same chunk.
    here = in_process(act_checkpoint, as_the_server_sees_it(sent), gripper_closed=0.1,
                      gripper_open=0.5)
    np.testing.assert_allclose(served_matrix(body), here, atol=1e-5)


def test_a_camera_of_another_size_is_resized_to_the_checkpoints(act_server, act_checkpoint):
    rng = np.random.default_rng(8)
    sent = observation(seed=4, images={"wrist": rng.integers(0, 256, (120, 160, 3), np.uint8),
                                       "front": rng.integers(0, 256, (48, 64, 3), np.uint8)})
    answer = post(act_server, observation_to_request(sent))
    assert answer.status_code == 200, answer.text
    # What the server decoded, resized beforehand by LeRobot's own helper.
    decoded = as_the_server_sees_it(sent)
    shape = (3, lc.IMAGE_SIZE, lc.IMAGE_SIZE)
    resized = {name: resize_robot_observation_image(torch.tensor(rgb), shape)
               .permute(1, 2, 0).numpy() for name, rgb in decoded.images.items()}
    here = in_process(act_checkpoint, Observation(
        images=resized, state=sent.state, instruction=sent.instruction),
        gripper_closed=0.1, gripper_open=0.5)
    np.testing.assert_allclose(served_matrix(answer.json()), here, atol=1e-5)
    assert "frames of 160x120 are resized to the checkpoint's 96x96" in act_server.log()


@pytest.mark.parametrize("changes, field, words", [
    ({"images": {"wrist": np.zeros((96, 96, 3), np.uint8),
                 "top": np.zeros((96, 96, 3), np.uint8)}}, "images.front", "top, wrist"),
    ({"state": (0.0,) * 5}, "state", "has 5 values, but the policy reads 6"),
    ({"state": None}, "state", "is missing"),
])
def test_a_request_that_does_not_fit_is_422_naming_the_field(act_server, changes, field, words):
    answer = post(act_server, observation_to_request(observation(**changes)))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["field"] == field and words in body["detail"]
    assert act_server.process.poll() is None


def test_diffusion_serves_two_robots_each_with_its_history(diffusion_server):
    for seed, robot in ((1, "/a/remote_policy_node"), (2, "/b/remote_policy_node"),
                        (3, "/a/remote_policy_node")):
        answer = post(diffusion_server, observation_to_request(observation(seed, robot)))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["actions"]) == lc.DIFFUSION_ACTIONS
        assert body["action_period_sec"] == pytest.approx(1 / 30)
    info = requests.get(f"{diffusion_server.base_url}/info", timeout=10).json()["backend"]
    assert info["history_per_robot"] is True and info["fps_source"] == "option"
    assert info["seed"] == SEED


def test_a_seeded_diffusion_serves_the_chunk_it_gives_in_process(diffusion_server,
                                                                 diffusion_checkpoint):
    sent = observation(seed=5, robot_id="/seeded/remote_policy_node")
    answers = []
    for _ in range(2):  # the same frame again: that robot's history holds it twice
        answer = post(diffusion_server, observation_to_request(sent))
        assert answer.status_code == 200, answer.text
        answers.append(served_matrix(answer.json()))
    np.testing.assert_array_equal(answers[0], answers[1])
    here = in_process(diffusion_checkpoint, as_the_server_sees_it(sent), fps=30, seed=SEED)
    np.testing.assert_allclose(answers[0], here, atol=1e-5)


def exit_code(argv: list[str]) -> int:
    """policy_server.main's exit status (a refused flag exits from argparse)."""
    try:
        return policy_server.main(argv)
    except SystemExit as exited:
        return exited.code


@pytest.mark.parametrize("options, line", [
    (["--action-layout", "joint_position:a,gripper"],
     "action_layout has 2 entries, but the checkpoint's action has 6 values"),
    (["--action-layout", "joint_position:a,joint_delta:b"],
     "mixes joint_position and joint_delta"),
])
def test_a_bad_configuration_stops_the_server_with_one_line(act_checkpoint, options, line,
                                                             monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "")
    assert exit_code(["--backend", "lerobot", "--model", str(act_checkpoint),
                      "--device", "cpu", *options]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], lines


def test_a_checkpoint_without_fps_stops_the_server_asking_for_it(diffusion_checkpoint,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv(API_KEY_ENV, "")
    assert exit_code(["--backend", "lerobot", "--model", str(diffusion_checkpoint),
                      "--action-layout", lc.ARM_LAYOUT, "--device", "cpu"]) != 0
    [only] = capsys.readouterr().err.strip().splitlines()
    assert "fps: the checkpoint" in only and "--fps" in only
