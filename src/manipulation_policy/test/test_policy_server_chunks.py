"""Action chunks through a real policy server process with a chunk-predicting plugin
backend (server_test_backends:ChunkedBackend), checked by the robot's RemoteClient."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from server_test_backends import BAD_CHUNKS, CHUNK_PERIOD_SEC, chunk_steps

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.contract import (
    action_to_wire,
    parse_response,
    response_to_chunk,
)
from manipulation_policy.core.policy_types import (
    MAX_CHUNK_LENGTH,
    SINGLE_ACTION_PERIOD_SEC,
    EefTargetMode,
    PolicyAction,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.core.pose_math import compose_chunk_with_current_pose
from manipulation_policy.robot.remote_client import RemoteClient, RemoteSettings
from manipulation_policy.server.process import ServerProcess

TEST_DIR = str(Path(__file__).resolve().parent)
# The fields of upstream's answers, which its client reads: the chunk's first action.
UPSTREAM_RESPONSE_FIELDS = {
    "has_eef_target", "eef_target_pose", "has_joint_deltas", "joint_deltas",
    "gripper_command", "gripper_active", "has_base_hint", "base_velocity_hint",
    "reference_frame", "confidence",
}  # fmt: skip
CURRENT = Pose(Vector3(0.3, -0.1, 0.4), Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))
BOUND_S = 10.0


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        "--backend", "server_test_backends:ChunkedBackend",
        "--max-batch-size", "4", "--batch-window-ms", "20", "--no-access-log",
        env={API_KEY_ENV: ""}, extra_pythonpath=[TEST_DIR],
    ) as process:  # fmt: skip
        yield process.base_url
    assert "Traceback" not in process.log()


@pytest.fixture
def client(server):
    client = RemoteClient(RemoteSettings(url=server, timeout_sec=BOUND_S, retry_attempts=0))
    yield client
    client.close()


def body(instruction: str, joints: int = 2, eef_pose: bool = True, **fields) -> dict:
    request = {
        "reference_frame": "arm_base",
        "joint_states": {"name": [f"j{i}" for i in range(joints)], "position": [0.1] * joints},
        "instruction": instruction,
        **fields,
    }
    if eef_pose:
        p, q = CURRENT.position, CURRENT.orientation
        request["eef_pose"] = {"position": vars(p), "orientation": vars(q)}
    return request


def post(url: str, request: dict) -> requests.Response:
    return requests.post(f"{url}/infer", json=request, timeout=BOUND_S)


def error_count(url: str, kind: str) -> int:
    return requests.get(f"{url}/info", timeout=5).json()["errors_by_kind"].get(kind, 0)


def test_a_chunk_is_answered_over_http_and_taken_by_the_robots_client(server, client):
    result = client.infer(body("chunk 8"))
    assert result.ok, result.failure
    # The deltas, composed by the server with eef_pose, each on the target before.
    expected = compose_chunk_with_current_pose(chunk_steps(8, "arm_base", 2), CURRENT)
    assert result.chunk == expected
    # Accumulated: the last target is the eight 1 cm steps away from the current pose.
    last = result.chunk.actions[-1].eef_target.position
    assert last.x == pytest.approx(CURRENT.position.x + 0.08)
    assert result.chunk.action_period_sec == CHUNK_PERIOD_SEC
    assert all(a.eef_target_mode is EefTargetMode.ABSOLUTE for a in result.chunk.actions)
    assert result.action == expected.actions[0]  # what older callers read
    assert result.request_id and result.attempts == 1


def test_the_answer_keeps_upstreams_fields_with_the_first_action(server):
    answer = post(server, body("chunk 4", request_id="up-1"))
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    assert UPSTREAM_RESPONSE_FIELDS <= payload.keys()
    assert len(payload["actions"]) == 4 and payload["action_period_sec"] == CHUNK_PERIOD_SEC
    assert payload["actions"][0].items() <= payload.items()
    assert payload["actions"][0] != payload["actions"][1]
    assert payload["request_id"] == "up-1"


def test_the_longest_chunk_is_taken(server, client):
    result = client.infer(body("chunk 256", joints=3, eef_pose=False))
    assert result.ok, result.failure
    assert len(result.chunk) == MAX_CHUNK_LENGTH == 256
    assert result.chunk == chunk_steps(256, "arm_base", 3)


def test_a_single_action_from_the_same_server_is_a_chunk_of_one(server, client):
    result = client.infer(body("pick up the cup"))
    assert result.ok, result.failure
    assert len(result.chunk) == 1
    assert result.chunk.action_period_sec == SINGLE_ACTION_PERIOD_SEC
    assert result.action.eef_target_mode is EefTargetMode.ABSOLUTE


@pytest.mark.parametrize("kind", sorted(BAD_CHUNKS))
def test_a_broken_chunk_is_a_counted_500_naming_the_field(server, kind):
    before = error_count(server, "backend_error")
    answer = post(server, body(f"bad {kind}"))
    assert answer.status_code == 500, answer.text
    error = answer.json()
    assert error["error"] == "backend_error"
    assert error["field"] == BAD_CHUNKS[kind][1]
    assert error_count(server, "backend_error") == before + 1


def test_pending_actions_reach_the_backend(server):
    pending = [
        PolicyAction(
            reference_frame="arm_base",
            eef_target=Pose(Vector3(0.2, 0.1, 0.3)),
            eef_target_mode=EefTargetMode.ABSOLUTE,
            joint_deltas=(0.01, -0.02),
            gripper_command=0.0,
            confidence=0.8,
        ),
        PolicyAction(reference_frame="arm_base", gripper_command=1.0, confidence=0.6),
    ]
    request = body(
        "echo pending",
        eef_pose=False,
        pending_actions=[action_to_wire(a) for a in pending],
        pending_delay_sec=0.35,
    )
    answer = post(server, request)
    assert answer.status_code == 200, answer.text
    echoed = response_to_chunk(parse_response(answer.json()))
    assert list(echoed.actions) == pending and echoed.action_period_sec == 0.35


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"pending_actions": [{}, {}, {"eef_target_pose": {"position": {"x": "a"}}}]},
         "pending_actions[2].eef_target_pose.position.x"),
        ({"pending_actions": [{"confidence": 3.0}]}, "pending_actions[0].confidence"),
        ({"pending_actions": [{"has_joint_deltas": True, "joint_deltas": [0.1]}]},
         "pending_actions[0].joint_deltas"),
        ({"pending_actions": [{}] * 257}, "pending_actions"),
        ({"pending_delay_sec": 60.0}, "pending_delay_sec"),
    ],
)  # fmt: skip
def test_bad_pending_fields_are_a_422_naming_the_field(server, fields, field):
    answer = post(server, body("chunk 2", **fields))
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


def test_batched_requests_each_get_their_own_chunk(server):
    before = requests.get(f"{server}/info", timeout=5).json()["batching"]
    lengths = [1, 2, 3, 4]
    with ThreadPoolExecutor(len(lengths) + 1) as pool:
        hold = pool.submit(post, server, body("sleep 1.5"))  # holds the model meanwhile
        deadline = time.monotonic() + BOUND_S
        while requests.get(f"{server}/info", timeout=5).json()["batching"]["in_prediction"] != 1:
            assert time.monotonic() < deadline, "the holding request never ran"
            time.sleep(0.01)
        futures = [
            pool.submit(post, server, body(f"chunk {n}", request_id=f"b{n}")) for n in lengths
        ]
        assert hold.result().status_code == 200
        answers = [future.result() for future in futures]
    after = requests.get(f"{server}/info", timeout=5).json()["batching"]
    assert after["largest_batch"] > 1  # some of them did share a backend call
    assert after["batched_requests_total"] - before["batched_requests_total"] == 5
    for n, answer in zip(lengths, answers, strict=True):
        assert answer.status_code == 200, answer.text
        payload = answer.json()
        assert payload["request_id"] == f"b{n}"
        chunk = response_to_chunk(parse_response(payload))
        assert chunk == compose_chunk_with_current_pose(chunk_steps(n, "arm_base", 2), CURRENT)


def test_the_openapi_document_declares_the_chunk_fields(server):
    document = requests.get(f"{server}/openapi.json", timeout=5).json()
    schemas = document["components"]["schemas"]
    request, response = schemas["InferRequest"], schemas["InferResponse"]
    assert {"pending_actions", "pending_delay_sec", "request_id"} <= request["properties"].keys()
    assert {"actions", "action_period_sec"} <= response["properties"].keys()
    actions = next(s for s in response["properties"]["actions"]["anyOf"] if s["type"] == "array")
    assert actions["items"] == {"$ref": "#/components/schemas/ActionModel"}
    assert (actions["minItems"], actions["maxItems"]) == (1, MAX_CHUNK_LENGTH)
    period = next(
        s for s in response["properties"]["action_period_sec"]["anyOf"] if s["type"] == "number"
    )
    assert period["exclusiveMinimum"] == 0.0 and period["maximum"] == 10.0
    assert "confidence" in schemas["ActionModel"]["properties"]
    assert "actions" not in schemas["ActionModel"]["properties"]
    json.dumps(document)  # plain JSON throughout
