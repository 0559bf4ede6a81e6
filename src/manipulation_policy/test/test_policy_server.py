"""The policy server as a real process on loopback: endpoints, answers, every bad-input class."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import manipulation_policy
from manipulation_policy.backends import predictor
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.contract import (
    chunk_to_response,
    parse_request,
    request_to_observation,
)
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.server.process import ServerProcess

MAX_BODY = 256 * 1024
MINIMAL_GUIDE_REQUEST = {
    "reference_frame": "base_link",
    "joint_states": {"name": [], "position": [], "velocity": [], "effort": []},
}
GUIDE_RESPONSE_FIELDS = {
    "has_eef_target", "eef_target_pose", "has_joint_deltas", "joint_deltas",
    "gripper_command", "gripper_active", "has_base_hint", "base_velocity_hint",
    "reference_frame", "confidence",
}  # fmt: skip
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        "--backend", "stub", "--max-body-bytes", str(MAX_BODY), env={API_KEY_ENV: ""}
    ) as process:
        yield process


@pytest.fixture(scope="module")
def url(server):
    return server.base_url


@pytest.fixture(autouse=True)
def server_survives(request):
    """After every test that used the shared server, whatever it sent: still up, healthy,
    and no traceback in its log (checked per test, so it holds in any order and alone)."""
    yield
    if "server" not in request.fixturenames:
        return
    server = request.getfixturevalue("server")
    assert server.process.poll() is None
    assert requests.get(f"{server.base_url}/health", timeout=5).json() == {"status": "ok"}
    assert "Traceback" not in server.log()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scene_rgb(width: int = 224, height: int = 224) -> np.ndarray:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    rgb[:, : width // 2, 0] = 230  # a red half, so the stub's answer is not zero
    return rgb


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny real JPEG with its frame header patched to claim width x height."""
    data = bytearray(encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def post_infer(url: str, body, **kwargs) -> requests.Response:
    if isinstance(body, (bytes, str)):
        return requests.post(f"{url}/infer", data=body, headers=kwargs.pop("headers", JSON),
                             timeout=10, **kwargs)  # fmt: skip
    return requests.post(f"{url}/infer", json=body, timeout=10, **kwargs)


def metric_samples(url: str) -> dict:
    text = requests.get(f"{url}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# ----------------------------------------------------------------- good answers


def test_health_is_ok(url):
    answer = requests.get(f"{url}/health", timeout=5)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


def test_minimal_guide_request_gets_a_full_policy_output(url):
    answer = post_infer(url, MINIMAL_GUIDE_REQUEST)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert GUIDE_RESPONSE_FIELDS <= body.keys()
    assert body["reference_frame"] == "base_link"
    assert body["request_id"] is None
    assert isinstance(body["inference_time_ms"], float) and body["inference_time_ms"] >= 0.0


def test_answer_equals_the_in_process_backend_on_the_same_observation(url):
    request = {
        "reference_frame": "arm_base",
        "joint_states": {"name": ["j1", "j2"], "position": [0.3, -0.9],
                         "velocity": [], "effort": []},
        "image": b64(encode_jpeg(scene_rgb(), quality=90)),
        "image_encoding": "jpeg",
        "image_width": 224,
        "image_height": 224,
        "instruction": "pick up the red block",
        "eef_pose": {"position": {"x": 0.4, "y": 0.0, "z": 0.2},
                     "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}},
        "request_id": "req-42",
        "a_future_field": {"ignored": True},
    }  # fmt: skip
    answer = post_infer(url, request)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    local = predictor(StubBackend())(request_to_observation(parse_request(request)))
    expected = chunk_to_response(local, request_id="req-42")
    del body["inference_time_ms"], expected["inference_time_ms"]
    assert body == expected
    assert body["request_id"] == "req-42"
    # A single-step model's answer is a chunk of one; its top level is that action.
    assert len(body["actions"]) == 1 and body["action_period_sec"] == 1.0
    assert {**body["actions"][0], "request_id": "req-42"}.items() <= body.items()
    assert body["eef_target_mode"] == "absolute"  # the stub composed with eef_pose
    assert body["has_joint_deltas"] and len(body["joint_deltas"]) == 2


def test_png_images_are_accepted(url):
    rgb = scene_rgb(64, 48)
    request = {"image": b64(png_bytes(rgb)), "image_encoding": "png",
               "image_width": 64, "image_height": 48}  # fmt: skip
    answer = post_infer(url, request)
    assert answer.status_code == 200, answer.text
    # PNG is lossless: the stub's gripper command is exactly the mean brightness.
    assert answer.json()["gripper_command"] == pytest.approx(rgb.mean() / 255.0)


def test_json_with_charset_and_vendor_types_is_accepted(url):
    for content_type in ("application/json; charset=utf-8", "application/vnd.policy+json"):
        answer = post_infer(url, json.dumps({}), headers={"Content-Type": content_type})
        assert answer.status_code == 200, (content_type, answer.text)


def test_many_requests_on_one_keep_alive_connection(url):
    with requests.Session() as session:
        for index in range(20):
            answer = session.post(f"{url}/infer", json={"request_id": str(index)}, timeout=5)
            assert answer.json()["request_id"] == str(index)


# ------------------------------------------------------------------- bad input

JPEG_10x20 = encode_jpeg(np.zeros((10, 20, 3), np.uint8))

BAD_JSON_BODIES = [
    pytest.param(b"{not json", "body", id="syntax-error"),
    pytest.param(b"", "body", id="empty"),
    pytest.param(b"\xff\xfe\x00garbage\x80", "body", id="not-utf8"),
    pytest.param(b"[" * 60000 + b"]" * 60000, "body", id="nested-too-deep"),
    # NaN/Infinity are read as "unknown" inside joint arrays only (test_upstream_requests).
    pytest.param(b'{"eef_pose": {"orientation": {"w": NaN}}}',
                 "eef_pose.orientation.w", id="nan-literal"),
    pytest.param(b'{"eef_pose": {"position": {"x": Infinity}}}', "eef_pose.position.x",
                 id="infinity-literal"),
    pytest.param(b'{"something_unknown": [1, -Infinity]}', "something_unknown[1]",
                 id="infinity-in-unknown-field"),
    pytest.param(b'{"openvla_xyz_scaling": 1e999}',
                 "openvla_xyz_scaling", id="overflowing-number"),
    pytest.param(b"NaN", "body", id="bare-nan"),
]  # fmt: skip


@pytest.mark.parametrize("raw, field", BAD_JSON_BODIES)
def test_invalid_json_is_400_naming_the_field(url, raw, field):
    answer = post_infer(url, raw)
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": "invalid_json", "field": field,
                             "detail": answer.json()["detail"]}  # fmt: skip
    assert answer.json()["detail"]


BAD_REQUESTS = [
    pytest.param([1, 2], "body", "invalid_request", id="array-body"),
    pytest.param("just a string", "body", "invalid_request", id="string-body"),
    pytest.param(None, "body", "invalid_request", id="null-body"),
    pytest.param({"reference_frame": 5}, "reference_frame", "invalid_request", id="int-frame"),
    pytest.param({"joint_states": {"name": ["a"], "position": ["0.1"]}},
                 "joint_states.position[0]", "invalid_request", id="string-number"),
    pytest.param({"joint_states": {"name": ["a"], "position": [True]}},
                 "joint_states.position[0]", "invalid_request", id="bool-number"),
    pytest.param({"joint_states": {"name": ["a", "b"], "position": [0.1]}},
                 "joint_states.position", "invalid_request", id="mismatched-lengths"),
    pytest.param({"joint_states": {"name": [], "effort": [1.0]}},
                 "joint_states.effort", "invalid_request", id="effort-without-names"),
    pytest.param({"joint_states": "j1"}, "joint_states", "invalid_request", id="joints-not-object"),
    pytest.param({"image": 123}, "image", "invalid_request", id="image-not-string"),
    pytest.param({"image_width": 0}, "image_width", "invalid_request", id="zero-width"),
    pytest.param({"image_width": "224"}, "image_width", "invalid_request", id="string-width"),
    pytest.param({"image_height": 10**9}, "image_height", "invalid_request", id="huge-height"),
    pytest.param({"instruction": ["pick"]}, "instruction", "invalid_request", id="list-text"),
    pytest.param({"request_id": "x" * 500}, "request_id", "invalid_request", id="long-id"),
    pytest.param({"eef_pose": {"orientation": {"w": "one"}}}, "eef_pose.orientation.w",
                 "invalid_request", id="string-quaternion"),
    pytest.param({"image": "not base64!!"}, "image", "invalid_image", id="bad-base64"),
    pytest.param({"image": ""}, "image", "invalid_image", id="empty-image"),
    pytest.param({"image": b64(b"hello, not an image")}, "image", "invalid_image",
                 id="not-an-image"),
    pytest.param({"image": b64(JPEG_10x20[: len(JPEG_10x20) // 3])}, "image", "invalid_image",
                 id="truncated-jpeg"),
    pytest.param({"image": b64(JPEG_10x20), "image_encoding": "png"}, "image", "invalid_image",
                 id="jpeg-declared-png"),
    pytest.param({"image": b64(JPEG_10x20), "image_encoding": "gif"}, "image_encoding",
                 "invalid_image", id="unsupported-encoding"),
    pytest.param({"image": b64(JPEG_10x20), "image_width": 21}, "image_width",
                 "invalid_image", id="width-disagrees"),
    pytest.param({"image": b64(JPEG_10x20), "image_height": 11}, "image_height",
                 "invalid_image", id="height-disagrees"),
    pytest.param({"image": b64(png_declaring(5000, 5000)), "image_encoding": "png"}, "image",
                 "invalid_image", id="png-bomb-over-server-limit"),
    pytest.param({"image": b64(png_declaring(100_000, 100_000)), "image_encoding": "png"},
                 "image", "invalid_image", id="png-bomb-over-pillow-limit"),
    pytest.param({"image": b64(jpeg_declaring(6000, 6000))}, "image", "invalid_image",
                 id="jpeg-bomb"),
]  # fmt: skip


@pytest.mark.parametrize("payload, field, kind", BAD_REQUESTS)
def test_bad_fields_are_422_naming_the_field(url, payload, field, kind):
    answer = post_infer(url, json.dumps(payload))
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert (body["error"], body["field"]) == (kind, field), body
    assert isinstance(body["detail"], str) and body["detail"]


def test_decompression_bomb_is_refused_from_its_header(url):
    answer = post_infer(url, {"image": b64(png_declaring(5000, 5000)), "image_encoding": "png"})
    assert "exceeds the limit" in answer.json()["detail"]


def test_integer_with_thousands_of_digits_is_refused(url):
    answer = post_infer(url, b'{"image_width": ' + b"9" * 5000 + b"}")
    assert answer.status_code in (400, 422)
    assert answer.json()["field"] in ("body", "image_width")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None],
)
def test_non_json_or_missing_content_type_is_415(url, content_type):
    body = json.dumps(MINIMAL_GUIDE_REQUEST)
    # requests sends no Content-Type for a str body unless told.
    headers = {"Content-Type": content_type} if content_type else {}
    answer = post_infer(url, body, headers=headers)
    assert answer.status_code == 415
    assert answer.json()["field"] == "content-type"
    assert "application/json" in answer.json()["detail"]


def test_body_over_the_limit_is_413_from_content_length(server):
    # Only the headers are sent: the answer must not wait for a gigabyte of body.
    with socket.create_connection((server.host, server.port), timeout=10) as connection:
        connection.sendall(
            b"POST /infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            data = connection.recv(65536)
            assert data, f"connection closed after {received!r}"
            received += data
    head, _, body = received.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert json.loads(body)["field"] == "body"


def test_body_over_the_limit_is_413_while_streaming_without_content_length(url):
    sent = []

    def chunks():  # requests sends a generator with Transfer-Encoding: chunked
        for _ in range(4 * MAX_BODY // 16384):
            sent.append(16384)
            yield b" " * 16384

    answer = requests.post(f"{url}/infer", data=chunks(), headers=JSON, timeout=10)
    assert answer.status_code == 413
    assert answer.json()["field"] == "body"
    assert "streamed" in answer.json()["detail"]


def test_body_just_under_the_limit_is_read(url):
    padding = " " * (MAX_BODY - 200)
    answer = post_infer(url, '{"request_id": "padded"}' + padding)
    assert answer.status_code == 200, answer.text
    assert answer.json()["request_id"] == "padded"


def test_unknown_path_and_method_answer_json_errors(url):
    missing = requests.get(f"{url}/no/such/path", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong_method = requests.get(f"{url}/infer", timeout=5)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"


# ------------------------------------------------------- info, metrics, schema


def test_info_reports_backend_version_and_counts(url):
    post_infer(url, b"{broken")
    info = requests.get(f"{url}/info", timeout=5).json()
    assert info["version"] == manipulation_policy.__version__
    assert info["backend"] == StubBackend().describe()
    assert info["model"] == "stub" and info["device"] == "cpu"
    assert info["gpu_memory"] is None  # the stub never loads torch
    assert info["uptime_s"] > 0
    assert info["requests_total"] >= 1
    assert info["errors_by_kind"]["invalid_json"] >= 1
    assert info["errors_total"] == sum(info["errors_by_kind"].values())
    assert info["queue"] == {"depth": 0, "max": 8, "inference_in_progress": 0}
    assert info["limits"]["max_body_bytes"] == MAX_BODY
    assert info["auth_required"] is False


def test_metrics_count_requests_errors_and_inference_time(url):
    before = metric_samples(url)
    assert post_infer(url, MINIMAL_GUIDE_REQUEST).status_code == 200
    assert post_infer(url, {"image": "!!"}).status_code == 422
    assert post_infer(url, b"[" * 10).status_code == 400
    after = metric_samples(url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    requests_total = "policy_server_requests_total"
    assert delta(requests_total, endpoint="/infer", method="POST", status="200") == 1
    assert delta(requests_total, endpoint="/infer", method="POST", status="422") == 1
    assert delta(requests_total, endpoint="/infer", method="POST", status="400") == 1
    assert delta("policy_server_errors_total", kind="invalid_image") == 1
    assert delta("policy_server_errors_total", kind="invalid_json") == 1
    assert delta("policy_server_inference_duration_seconds_count") == 1
    assert delta("policy_server_request_duration_seconds_count", endpoint="/infer") == 3
    assert after[("policy_server_queue_depth", ())] == 0
    assert after[("policy_server_uptime_seconds", ())] > 0
    info_labels = (("backend", "stub"), ("model", "stub"),
                   ("version", manipulation_policy.__version__))  # fmt: skip
    assert after[("policy_server_info", info_labels)] == 1


def test_unknown_paths_share_one_metrics_label(url):
    for index in range(3):
        requests.get(f"{url}/probe-{index}", timeout=5)
    samples = metric_samples(url)
    endpoints = {dict(labels).get("endpoint") for _, labels in samples}
    assert "other" in endpoints
    assert not any(e and e.startswith("/probe") for e in endpoints)


def test_openapi_declares_the_wire_contract(url):
    document = requests.get(f"{url}/openapi.json", timeout=5).json()
    schemas = document["components"]["schemas"]
    assert {"InferRequest", "InferResponse", "ErrorResponse", "HealthResponse"} <= schemas.keys()
    assert {"joint_states", "image", "image_width", "request_id"} <= schemas["InferRequest"][
        "properties"
    ].keys()
    assert GUIDE_RESPONSE_FIELDS <= schemas["InferResponse"]["properties"].keys()
    infer = document["paths"]["/infer"]["post"]
    request_schema = infer["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema == {"$ref": "#/components/schemas/InferRequest"}
    assert {"200", "400", "413", "415", "422", "503"} <= infer["responses"].keys()
    assert {"/health", "/infer", "/info", "/metrics"} <= document["paths"].keys()
    docs = requests.get(f"{url}/docs", timeout=5)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
