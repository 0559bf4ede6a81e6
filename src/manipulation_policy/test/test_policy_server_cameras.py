"""Several cameras, the state and robot id through the real policy server on loopback:
every bad new field is a 4xx naming it, and the server stays up and healthy."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import pytest
import requests

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.server.process import ServerProcess

JSON = {"Content-Type": "application/json"}
JPEG_10x20 = encode_jpeg(np.zeros((10, 20, 3), np.uint8))


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--backend", "stub", env={API_KEY_ENV: ""}) as process:
        yield process


@pytest.fixture(scope="module")
def url(server):
    return server.base_url


@pytest.fixture(autouse=True)
def server_survives(server):
    yield
    assert server.process.poll() is None
    assert requests.get(f"{server.base_url}/health", timeout=5).json() == {"status": "ok"}
    assert "Traceback" not in server.log()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def post_infer(url: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{url}/infer", data=data, headers=JSON, timeout=10)


def camera(data: bytes = JPEG_10x20, **fields) -> dict:
    return {"image": b64(data), **fields}


def test_several_cameras_with_state_and_robot_id_are_answered(url):
    body = {
        "joint_states": {"name": ["j1"], "position": [0.2]},
        "images": {
            "wrist": camera(image_encoding="jpeg", image_width=20, image_height=10),
            "front": camera(),
        },
        "state": [0.2, -0.1, 0.0],
        "robot_id": "/arm/remote_policy_node",
    }
    answer = post_infer(url, body)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert reply["has_joint_positions"] is False
    assert reply["joint_positions"] == [] and reply["joint_names"] == []
    assert reply["actions"][0]["has_joint_positions"] is False


BAD_REQUESTS = [
    pytest.param({"images": {"bad name": camera()}}, "images.bad name", "invalid_request",
                 id="bad-camera-name"),
    pytest.param({"images": {f"c{i}": camera() for i in range(9)}}, "images", "invalid_request",
                 id="nine-cameras"),
    pytest.param({"images": ["wrist"]}, "images", "invalid_request", id="images-not-object"),
    pytest.param({"images": {"wrist": {}}}, "images.wrist.image", "invalid_request",
                 id="camera-without-image"),
    pytest.param({"images": {"wrist": camera(image_width=0)}}, "images.wrist.image_width",
                 "invalid_request", id="camera-zero-width"),
    pytest.param({"images": {"wrist": camera(image_height="10")}},
                 "images.wrist.image_height", "invalid_request", id="camera-string-height"),
    pytest.param({"images": {"wrist": {"image": "not base64!!"}}}, "images.wrist.image",
                 "invalid_image", id="camera-bad-base64"),
    pytest.param({"images": {"wrist": camera(b"not an image")}}, "images.wrist.image",
                 "invalid_image", id="camera-not-an-image"),
    pytest.param({"images": {"wrist": camera(image_encoding="gif")}},
                 "images.wrist.image_encoding", "invalid_image", id="camera-gif"),
    pytest.param({"images": {"front": camera(), "wrist": camera(image_width=21)}},
                 "images.wrist.image_width", "invalid_image", id="camera-width-disagrees"),
    pytest.param({"images": {"wrist": camera(image_height=11)}}, "images.wrist.image_height",
                 "invalid_image", id="camera-height-disagrees"),
    pytest.param({"images": {"wrist": camera(png_declaring(5000, 5000))}}, "images.wrist.image",
                 "invalid_image", id="camera-png-bomb"),
    pytest.param({"state": [0.1, "0.2"]}, "state[1]", "invalid_request", id="state-string"),
    pytest.param({"state": [0.0] * 257}, "state", "invalid_request", id="state-too-long"),
    pytest.param({"state": {"a": 1}}, "state", "invalid_request", id="state-not-list"),
    pytest.param({"robot_id": "r" * 129}, "robot_id", "invalid_request", id="long-robot-id"),
    pytest.param({"robot_id": 5}, "robot_id", "invalid_request", id="number-robot-id"),
    pytest.param({"pending_actions": [{"has_joint_positions": True, "joint_positions": [0.1],
                                       "joint_names": ["a", "b"]}]},
                 "pending_actions[0].joint_positions", "invalid_request",
                 id="pending-positions-names-disagree"),
    pytest.param({"pending_actions": [{"joint_names": ["a", "a"]}]},
                 "pending_actions[0].joint_names", "invalid_request",
                 id="pending-names-twice"),
    pytest.param({"pending_actions": [{"has_joint_positions": True}]},
                 "pending_actions[0].joint_positions", "invalid_request",
                 id="pending-positions-announced-absent"),
]  # fmt: skip


@pytest.mark.parametrize("payload, field, kind", BAD_REQUESTS)
def test_bad_new_fields_are_422_naming_the_field(url, payload, field, kind):
    answer = post_infer(url, payload)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert (body["error"], body["field"]) == (kind, field), body
    assert isinstance(body["detail"], str) and body["detail"]


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"state": [0.1, NaN]}', "state[1]"),
        (b'{"state": [Infinity]}', "state[0]"),
        (b'{"state": [1e999]}', "state[0]"),
        (b'{"pending_actions": [{"joint_positions": [NaN]}]}',
         "pending_actions[0].joint_positions[0]"),
    ],
)
def test_non_finite_state_and_joint_targets_are_400_naming_the_field(url, raw, field):
    answer = post_infer(url, raw)
    assert answer.status_code == 400, answer.text
    assert (answer.json()["error"], answer.json()["field"]) == ("invalid_json", field)


def test_a_large_multi_camera_body_is_decoded_off_the_loop_and_refused_by_name(url):
    # Large enough for the decode pool; the bad camera is the last one decoded.
    rng = np.random.default_rng(1)
    noisy = encode_jpeg(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), quality=95)
    images = {f"cam{i}": camera(noisy) for i in range(7)}
    images["last"] = camera(noisy, image_width=641)
    answer = post_infer(url, {"images": images})
    assert len(json.dumps({"images": images})) > 1024 * 1024
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "images.last.image_width"


def test_openapi_declares_the_new_fields(url):
    schemas = requests.get(f"{url}/openapi.json", timeout=5).json()["components"]["schemas"]
    request = schemas["InferRequest"]["properties"]
    assert {"images", "state", "robot_id"} <= request.keys()
    assert {"image", "image_encoding", "image_width", "image_height"} <= (
        schemas["NamedImageModel"]["properties"].keys()
    )
    assert {"has_joint_positions", "joint_positions", "joint_names"} <= (
        schemas["InferResponse"]["properties"].keys()
    )
    assert {"has_joint_positions", "joint_positions", "joint_names"} <= (
        schemas["ActionModel"]["properties"].keys()
    )
