"""Fuzzing the real server: no input may produce a 5xx or take the server down.

Three generators, each bounded: schemathesis from the server's own
/openapi.json (schema-valid and schema-violating requests, responses checked
against the declared schemas), damaged JPEG/PNG bytes, and arbitrary bodies.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode, checks

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.server.process import ServerProcess

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# What a 4xx is allowed to name for a damaged image.
IMAGE_FIELDS = {"image", "image_width", "image_height", "image_encoding"}
# Documented behaviour that schemathesis cannot see in the schema: joint arrays must agree in
# length, an image string must decode, so schema-valid data may still be refused with a 4xx.
RESPONSE_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--no-access-log", env={API_KEY_ENV: ""}) as process:
        yield process
    assert "Traceback" not in process.log()
    # imaging.py translates every decoder failure into an InputError of its own.
    assert "image decoder raised" not in process.log()


@pytest.fixture(scope="module")
def session():
    with requests.Session() as shared:
        yield shared


def assert_healthy(server) -> None:
    assert server.process.poll() is None, server.log()
    assert requests.get(f"{server.base_url}/health", timeout=5).json() == {"status": "ok"}


def test_schemathesis_from_the_servers_openapi(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/infer", "/info", "/metrics"}
    cases = st.one_of(
        [
            operation.as_strategy(generation_mode=mode)
            for operation in operations
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    statuses = []

    @FUZZ
    @given(case=cases)
    def run(case):
        response = case.call(base_url=server.base_url)
        statuses.append(response.status_code)
        case.validate_response(response, checks=RESPONSE_CHECKS)

    run()
    assert 200 in statuses and 422 in statuses  # both valid and invalid requests were made
    assert_healthy(server)


def _sample_images() -> dict[str, tuple[bytes, str]]:
    rgb = np.random.default_rng(3).integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    progressive = io.BytesIO()
    Image.fromarray(rgb).save(progressive, format="JPEG", progressive=True)
    return {
        "jpeg": (encode_jpeg(rgb), "jpeg"),
        "progressive-jpeg": (progressive.getvalue(), "jpeg"),
        "png": (png.getvalue(), "png"),
    }


SAMPLE_IMAGES = _sample_images()


@st.composite
def damaged_images(draw) -> tuple[bytes, str]:
    """A real image with bytes overwritten, cut out or inserted."""
    original, encoding = SAMPLE_IMAGES[draw(st.sampled_from(sorted(SAMPLE_IMAGES)))]
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["overwrite", "cut", "insert"]))
        if edit == "overwrite":
            data[position] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[position : position + draw(st.integers(1, 64))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            data = bytearray(b"\x00")
    return bytes(data), encoding


def test_damaged_images_are_refused_naming_an_image_field(server, session):
    @FUZZ
    @given(image=damaged_images(), declare_size=st.booleans())
    def run(image, declare_size):
        data, encoding = image
        body = {"image": base64.b64encode(data).decode(), "image_encoding": encoding}
        if declare_size:
            body.update(image_width=32, image_height=24)
        answer = session.post(f"{server.base_url}/infer", json=body, timeout=10)
        assert answer.status_code in (200, 422), answer.text
        if answer.status_code == 422:
            assert answer.json()["field"] in IMAGE_FIELDS, answer.text

    run()
    assert_healthy(server)


def test_damaged_cameras_are_refused_naming_that_camera(server, session):
    good, _ = SAMPLE_IMAGES["jpeg"]

    @FUZZ
    @given(image=damaged_images(), declare_size=st.booleans(),
           name=st.sampled_from(["wrist", "front.left", "cam_0"]))
    def run(image, declare_size, name):
        data, encoding = image
        camera = {"image": base64.b64encode(data).decode(), "image_encoding": encoding}
        if declare_size:
            camera.update(image_width=32, image_height=24)
        body = {"images": {"other": {"image": base64.b64encode(good).decode()}, name: camera}}
        answer = session.post(f"{server.base_url}/infer", json=body, timeout=10)
        assert answer.status_code in (200, 422), answer.text
        if answer.status_code == 422:
            field = answer.json()["field"]
            assert field.startswith(f"images.{name}."), answer.text
            assert field.removeprefix(f"images.{name}.") in IMAGE_FIELDS, answer.text

    run()
    assert_healthy(server)


FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | FINITE | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
REQUEST_FIELDS = [
    "reference_frame", "joint_states", "image", "image_encoding", "image_width",
    "image_height", "instruction", "eef_pose", "request_id", "images", "state", "robot_id",
    "pending_actions",
]  # fmt: skip


@st.composite
def hostile_bodies(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["bytes", "fields", "non-finite", "unknown-joint", "cameras"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300))
    body = draw(st.dictionaries(st.sampled_from(REQUEST_FIELDS), JSON_VALUES, max_size=5))
    if kind == "fields":
        return kind, json.dumps(body).encode()
    if kind == "cameras":
        cameras = draw(st.dictionaries(
            st.text(max_size=12) | st.sampled_from(["wrist", "front"]),
            JSON_VALUES | st.fixed_dictionaries({"image": st.text(max_size=40)},
                                                optional={"image_width": JSON_VALUES}),
            max_size=10,
        ))  # fmt: skip
        return kind, json.dumps({"images": cameras}).encode()
    # A body plus one NaN/Infinity (no JSON encoder writes these; Python's parser reads them):
    # refused outside joint arrays, "unknown" inside them.
    literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400"]))
    if kind == "non-finite":
        rest = json.dumps({k: v for k, v in body.items() if k != "eef_pose"})[:-1]
        extra = f'"eef_pose": {{"position": {{"x": {literal}}}}}'
    else:
        rest = json.dumps({k: v for k, v in body.items() if k != "joint_states"})[:-1]
        extra = f'"joint_states": {{"name": ["a"], "position": [{literal}]}}'
    return kind, (rest + (", " if rest != "{" else "") + extra + "}").encode()


def test_arbitrary_bodies_get_4xx_naming_a_field_or_200(server, session):
    @FUZZ
    @given(body=hostile_bodies())
    def run(body):
        kind, raw = body
        answer = session.post(
            f"{server.base_url}/infer",
            data=raw,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert answer.status_code in (200, 400, 422), (raw, answer.text)
        if answer.status_code != 200:
            error = answer.json()
            assert error["field"] and error["detail"], error
        if kind == "non-finite":
            assert answer.status_code == 400
            assert answer.json()["field"] == "eef_pose.position.x"
        if kind == "unknown-joint" and answer.status_code != 200:
            assert not answer.json()["field"].startswith("joint_states"), answer.text
        if kind == "cameras" and answer.status_code != 200:
            assert answer.json()["field"].startswith("images"), answer.text

    run()
    assert_healthy(server)
