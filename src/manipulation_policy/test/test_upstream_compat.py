"""Drop-in for the upstream MobileManipulationCore, replayed in its shapes, both directions.

The requests and answers here are written from upstream's documented contract
(docs/openvla_remote.md, docs/api_reference.md, the request its policy node
builds, its tests/test_openvla_server.py script), not copied from its code:

- upstream client -> this server: ``task`` as the instruction, bare ``NaN``
  tokens for joints without velocity/effort sensors, per-request
  ``openvla_*`` scaling and clipping, a PNG without ``image_encoding``, a
  server started with ``OPENVLA_*`` variables and no ``--backend``;
- upstream server -> this client: its PolicyOutput-shaped answers and the raw
  OpenVLA action vectors its client accepts;
- upstream's node parameters (``task_prompt_topic``, ``use_remote``,
  ``max_steps``) and its wait for a task before acting.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import requests
from node_harness import Rig, ScriptedPolicyServer, sample_image, wait_until
from PIL import Image
from rclpy.parameter import Parameter
from std_msgs.msg import String

from manipulation_policy import policy_server
from manipulation_policy.backends.openvla import OpenVLABackend
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.contract import parse_request, request_to_observation
from manipulation_policy.core.policy_types import ActionOverrides, Observation, Quaternion
from manipulation_policy.core.pose_math import rpy_from_quaternion
from manipulation_policy.core.upstream_compat import canonical_answer, convert_action_vector
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import policy_output_to_action
from manipulation_policy.robot.node_parameters import (
    resolve_upstream_parameters,
    upstream_action_fields,
)
from manipulation_policy.robot.remote_client import RemoteClient, RemoteSettings
from manipulation_policy.robot.safety_guard import GuardContext, GuardLimits, SafetyGuard
from manipulation_policy.server.errors import ApiError
from manipulation_policy.server.process import ServerProcess
from manipulation_policy.server.request_decoding import decode_infer_body

# The response fields of upstream's docs/openvla_remote.md, every one always present.
UPSTREAM_RESPONSE_FIELDS = {
    "has_eef_target", "eef_target_pose", "has_joint_deltas", "joint_deltas",
    "gripper_command", "gripper_active", "has_base_hint", "base_velocity_hint",
    "reference_frame", "confidence",
}  # fmt: skip
# A server started by these tests chooses its backend from nothing but what they give it.
CLEAN_ENV = {API_KEY_ENV: "", policy_server.BACKEND_ENV: ""}
TASK = "pick up the cardboard box"


def upstream_gripper(value: float) -> float:
    """Upstream's documented mapping of OpenVLA's raw gripper value (0 closed, 1 open)."""
    if value < 0.0 or value > 1.0:
        value = (value + 1.0) * 0.5
    return max(0.0, min(1.0, value))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_bytes(rgb: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def upstream_client_body(rgb: np.ndarray, task: str = TASK, **openvla_fields) -> bytes:
    """The body upstream's policy node posts: every field it sends, NaN where a real
    robot's JointState has no velocity/effort sensor, serialised as its json.dumps does."""
    payload = {
        "reference_frame": "piper_base_link",
        "task": task,
        "openvla_xyz_scaling": 1.0,
        "openvla_rotation_scaling": 1.0,
        "openvla_clip_actions": False,
        "openvla_position_bounds": [-1.0, 1.0],
        "openvla_rotation_bounds": [-math.pi, math.pi],
        "openvla_gripper_bounds": [0.0, 1.0],
        "joint_states": {
            "name": ["joint1", "joint2", "gripper"],
            "position": [0.1, -0.4, 0.02],
            "velocity": [math.nan, math.nan, math.nan],
            "effort": [math.nan, 0.5, math.inf],
        },
        "image": b64(image_bytes(rgb, "JPEG")),
        "image_encoding": "jpeg",
        "image_width": rgb.shape[1],
        "image_height": rgb.shape[0],
        **openvla_fields,
    }
    raw = json.dumps(payload).encode()
    assert b"NaN" in raw and b"Infinity" in raw  # the bare tokens, as upstream sends them
    return raw


def upstream_test_script_body(rgb: np.ndarray, task: str = TASK) -> dict:
    """Upstream's tests/test_openvla_server.py: a PNG file, no image_encoding, no joints."""
    return {"image": b64(image_bytes(rgb, "PNG")), "task": task, "reference_frame": "base_link"}


def post(url: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{url}/infer", data=data, headers={"Content-Type": "application/json"}, timeout=60
    )


# ====================================================== upstream client -> this server


def test_task_and_task_text_are_the_instruction_in_upstreams_precedence():
    def instruction(**fields) -> str:
        return request_to_observation(parse_request(fields)).instruction

    assert instruction(task="pick up the cup") == "pick up the cup"
    assert instruction(task_text="open the drawer") == "open the drawer"
    assert instruction(instruction="wipe the table") == "wipe the table"
    assert instruction(task="a", instruction="b", task_text="c") == "a"
    assert instruction(task="", instruction="b") == "b"  # an empty one counts as absent
    assert instruction() == ""


def test_nan_tokens_in_joint_arrays_are_unknown_values_elsewhere_refused():
    raw = (b'{"joint_states": {"name": ["a", "b"], "position": [0.5, NaN],'
           b' "velocity": [NaN, Infinity], "effort": [-Infinity, 1e999]}}')  # fmt: skip
    _request, observation = decode_infer_body(raw, 4096 * 4096)
    joints = observation.joint_state
    assert joints.position[0] == 0.5 and math.isnan(joints.position[1])
    assert all(math.isnan(v) for v in joints.velocity + joints.effort)
    # The stub does not move a joint whose position is unknown, and answers finite numbers.
    action = StubBackend().predict(observation)
    assert action.joint_deltas == (pytest.approx(-0.05), 0.0)
    for raw in (b'{"eef_pose": {"position": {"x": NaN}}}', b'{"joint_states": NaN}',
                b'{"openvla_xyz_scaling": Infinity}', b'{"other": {"position": [NaN]}}'):
        with pytest.raises(ApiError) as caught:
            decode_infer_body(raw, 4096 * 4096)
        assert (caught.value.status, caught.value.kind) == (400, "invalid_json")


@pytest.fixture(scope="module")
def stub_server():
    with ServerProcess(env=CLEAN_ENV) as server:  # no --backend, no OPENVLA_*: the stub
        yield server


def test_stub_says_its_answers_are_synthetic_at_start_and_on_info(stub_server):
    assert "synthetic" in stub_server.log()
    info = requests.get(f"{stub_server.base_url}/info", timeout=10).json()
    assert info["backend"]["backend"] == "stub"
    assert info["backend"]["synthetic"] is True
    assert "synthetic" in info["backend"]["warning"]


def test_upstream_client_request_is_answered_in_upstreams_shape(stub_server):
    rgb = sample_image(width=96, height=64)
    answer = post(stub_server.base_url, upstream_client_body(rgb))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert UPSTREAM_RESPONSE_FIELDS <= body.keys()
    assert body["reference_frame"] == "piper_base_link"
    assert body["has_joint_deltas"] and all(math.isfinite(v) for v in body["joint_deltas"])
    assert body["gripper_active"] and 0.0 <= body["gripper_command"] <= 1.0


def test_png_without_image_encoding_is_read_from_its_bytes(stub_server):
    rgb = sample_image(width=40, height=30, seed=3)
    answer = post(stub_server.base_url, upstream_test_script_body(rgb))
    assert answer.status_code == 200, answer.text
    # PNG is lossless: the stub's gripper command is exactly the mean brightness.
    assert answer.json()["gripper_command"] == pytest.approx(rgb.mean() / 255.0)
    jpeg = {"image": b64(image_bytes(rgb, "JPEG")), "task": TASK}
    assert post(stub_server.base_url, jpeg).status_code == 200
    gif = {"image": b64(image_bytes(rgb, "GIF")), "task": TASK}
    refused = post(stub_server.base_url, gif)
    assert refused.status_code == 422
    assert refused.json()["field"] == "image"
    assert "neither a JPEG nor a PNG" in refused.json()["detail"]


@pytest.fixture(scope="module")
def local_openvla(tiny_openvla_dir):
    return OpenVLABackend(model=str(tiny_openvla_dir), device="cpu",
                          check_image_sensitivity=False)  # fmt: skip


@pytest.fixture(scope="module")
def upstream_style_openvla_server(tiny_openvla_dir):
    """Started as upstream's docs say: OPENVLA_* exported, no --backend."""
    env = {
        **CLEAN_ENV,
        "OPENVLA_MODEL_ID": str(tiny_openvla_dir),
        "OPENVLA_DEVICE": "cpu",
        "OPENVLA_XYZ_SCALING": "2.0",
        "OPENVLA_CLIP_ACTIONS": "true",
        "OPENVLA_POSITION_BOUNDS": "-0.01,0.01",
        "OPENVLA_GRIPPER_BOUNDS": "0.0,1.0",
    }
    with ServerProcess(env=env, startup_timeout=120.0) as server:
        yield server


def remote_delta(body: dict) -> tuple[np.ndarray, np.ndarray]:
    pose = body["eef_target_pose"]
    position = np.array([pose["position"][k] for k in "xyz"])
    q = pose["orientation"]
    return position, np.array(rpy_from_quaternion(Quaternion(q["x"], q["y"], q["z"], q["w"])))


def test_openvla_server_started_upstreams_way_serves_openvla_with_env_settings(
    upstream_style_openvla_server, local_openvla
):
    server = upstream_style_openvla_server
    info = requests.get(f"{server.base_url}/info", timeout=10).json()["backend"]
    assert info["backend"] == "openvla"
    assert info["clip_actions"] is True and info["position_bounds"] == [-0.01, 0.01]
    assert info["position_scale"] == 2.0
    assert "OPENVLA_MODEL_ID" in server.log()  # the log says why openvla was chosen

    rgb = sample_image(width=64, height=48, seed=5)
    body = upstream_test_script_body(rgb)
    answer = post(server.base_url, body)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    # Not a hold: the task under upstream's name reached the model.
    assert reply["has_eef_target"] and reply["confidence"] == 1.0
    raw = local_openvla.predict_raw(request_to_observation(parse_request(body)))
    position, _ = remote_delta(reply)
    np.testing.assert_allclose(position, np.clip(raw[:3] * 2.0, -0.01, 0.01), atol=1e-12)
    assert reply["gripper_command"] == pytest.approx(upstream_gripper(raw[6]))


def test_per_request_openvla_fields_replace_the_servers_scaling_and_clipping(
    upstream_style_openvla_server, local_openvla
):
    rgb = sample_image(width=64, height=48, seed=6)
    fields = {
        "openvla_xyz_scaling": 3.0,
        "openvla_rotation_scaling": 0.5,
        "openvla_clip_actions": True,
        "openvla_position_bounds": [-0.02, 0.02],
        "openvla_rotation_bounds": [-0.1, 0.1],
        "openvla_gripper_bounds": [-0.5, 0.9],
    }
    raw_body = upstream_client_body(rgb, **fields)
    answer = post(upstream_style_openvla_server.base_url, raw_body)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert reply["reference_frame"] == "piper_base_link"
    observation = request_to_observation(parse_request(json.loads(raw_body)))
    raw = local_openvla.predict_raw(observation)
    position, rpy = remote_delta(reply)
    np.testing.assert_allclose(position, np.clip(raw[:3] * 3.0, -0.02, 0.02), atol=1e-12)
    np.testing.assert_allclose(rpy, np.clip(raw[3:6] * 0.5, -0.1, 0.1), atol=1e-9)
    assert reply["gripper_command"] == pytest.approx(upstream_gripper(min(0.9, max(-0.5, raw[6]))))
    # The server's own settings would have given another answer: the request's won.
    assert not np.allclose(position, np.clip(raw[:3] * 2.0, -0.01, 0.01))


def test_backend_choice_and_openvla_environment():
    assert policy_server.choose_backend("stub", {"OPENVLA_MODEL_ID": "m"})[0] == "stub"
    assert policy_server.choose_backend(None, {"OPENVLA_MODEL_ID": "m"})[0] == "openvla"
    assert policy_server.choose_backend(None, {"OPENVLA_DEVICE": " "})[0] == "stub"
    # The tests' pointer to OpenVLA's remote code is no server setting (make test exports it).
    assert policy_server.choose_backend(None, {"OPENVLA_HF_DIR": "/x/openvla-hf"})[0] == "stub"
    assert policy_server.choose_backend(
        None, {"OPENVLA_MODEL_ID": "m", policy_server.BACKEND_ENV: "stub"}
    )[0] == "stub"
    environ = {"OPENVLA_MODEL_ID": "openvla/openvla-7b", "OPENVLA_CLIP_ACTIONS": "yes",
               "OPENVLA_POSITION_BOUNDS": "-0.10, 0.10", "OPENVLA_ROTATION_BOUNDS": "-0.35,0.35",
               "OPENVLA_GRIPPER_BOUNDS": "0.0,1.0", "OPENVLA_ROTATION_SCALING": "10"}  # fmt: skip
    args = policy_server.build_parser().parse_args([])
    assert policy_server.backend_arguments(args, environ) == {
        "model": "openvla/openvla-7b",
        "clip_actions": True,
        "position_bounds": (-0.1, 0.1),
        "rotation_bounds": (-0.35, 0.35),
        "gripper_bounds": (0.0, 1.0),
        "rotation_scale": 10.0,
    }
    for name, bad in (("OPENVLA_POSITION_BOUNDS", "1,-1"), ("OPENVLA_CLIP_ACTIONS", "maybe"),
                      ("OPENVLA_GRIPPER_BOUNDS", "0,nan")):
        with pytest.raises(policy_server.StartupError, match=name):
            policy_server.backend_arguments(args, {**environ, name: bad})
    prompt_joints = "OPENVLA_INCLUDE_JOINT_STATES_IN_PROMPT"
    warnings = policy_server.environment_warnings({prompt_joints: "1"})
    assert warnings and "not supported" in warnings[0]
    assert policy_server.environment_warnings({prompt_joints: "no"}) == []


def test_upstreams_flash_attention_variable_is_a_preference_not_a_requirement(caplog):
    # Upstream's docs export OPENVLA_ATTENTION_IMPL=flash_attention_2 and its server falls
    # back when flash-attention does not load: so does this one ("auto" tries it first).
    parse = policy_server.build_parser().parse_args
    upstream = {"OPENVLA_MODEL_ID": "m", "OPENVLA_ATTENTION_IMPL": "flash_attention_2"}
    with caplog.at_level("WARNING"):
        assert policy_server.backend_arguments(parse([]), upstream)["attn_implementation"] == "auto"
    assert "OPENVLA_ATTENTION_IMPL=flash_attention_2 taken as upstream does" in caplog.text
    # Any other value, this project's own variable, or the flag: taken as a requirement.
    assert policy_server.backend_arguments(
        parse([]), {**upstream, "OPENVLA_ATTENTION_IMPL": "eager"}
    )["attn_implementation"] == "eager"
    own = {"OPENVLA_MODEL_ID": "m", "OPENVLA_ATTN_IMPLEMENTATION": "flash_attention_2"}
    assert policy_server.backend_arguments(parse([]), own)["attn_implementation"] == (
        "flash_attention_2"
    )
    flag = parse(["--attn-implementation", "flash_attention_2"])
    assert policy_server.backend_arguments(flag, upstream)["attn_implementation"] == (
        "flash_attention_2"
    )


@pytest.mark.parametrize("level", ["error", "critical"])
def test_upstreams_log_levels_are_accepted(level):
    assert policy_server.build_parser().parse_args(["--log-level", level]).log_level == level


# ====================================================== upstream server -> this client

# The example answer of upstream's docs/openvla_remote.md (gripper 0.5: half open).
UPSTREAM_EXAMPLE_ANSWER = {
    "has_eef_target": True,
    "eef_target_pose": {
        "position": {"x": 0.3, "y": 0.0, "z": 0.3},
        "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0},
    },
    "has_joint_deltas": False,
    "joint_deltas": [],
    "gripper_command": 0.5,
    "gripper_active": True,
    "has_base_hint": False,
    "base_velocity_hint": {
        "linear": {"x": 0.0, "y": 0.0, "z": 0.0},
        "angular": {"x": 0.0, "y": 0.0, "z": 0.0},
    },
    "reference_frame": "base_link",
    "confidence": 0.0,
}
# Upstream's answer to a request without image: nothing to do.
UPSTREAM_NO_OP_ANSWER = {
    **UPSTREAM_EXAMPLE_ANSWER,
    "has_eef_target": False,
    "eef_target_pose": {"position": {"x": 0.0, "y": 0.0, "z": 0.0},
                        "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}},
    "gripper_command": 0.0,
    "gripper_active": False,
}  # fmt: skip
VECTOR = [0.01, -0.02, 0.005, 0.1, -0.05, 0.2, -0.6]  # a [-1, 1] gripper: -0.6 -> 0.2


@pytest.fixture
def upstream_server():
    with ScriptedPolicyServer() as server:
        yield server


def ask(server: ScriptedPolicyServer, answer: dict):
    server.raw_answer = (200, json.dumps(answer).encode())
    settings = RemoteSettings(url=server.url, timeout_sec=5.0, retry_attempts=0)
    client = RemoteClient(settings)
    try:
        return client.infer({"reference_frame": "base_link"})
    finally:
        client.close()


def test_upstream_answers_keep_their_meaning(upstream_server):
    result = ask(upstream_server, UPSTREAM_EXAMPLE_ANSWER)
    assert result.ok, result.failure
    action = result.action
    assert action.gripper_command == 0.5 and action.confidence == 0.0
    assert (action.eef_target.position.x, action.eef_target.position.z) == (0.3, 0.3)
    assert action.eef_target_mode.value == "delta"  # what upstream's answers are
    assert ask(upstream_server, UPSTREAM_NO_OP_ANSWER).action.is_hold
    # The documented example moves 0.42 m in one step: over the robot's default step
    # limit, so the guard cuts it to 0.1 m in the same direction (never a surprise leap),
    # and lets it through once the limit allows.
    cut = SafetyGuard(GuardLimits()).check(action, GuardContext(0.0)).action.eef_target
    assert (cut.position.x, cut.position.y, cut.position.z) == pytest.approx(
        (0.1 / math.sqrt(2), 0.0, 0.1 / math.sqrt(2)))
    wide = SafetyGuard(GuardLimits(max_eef_step_m=0.5)).check(action, GuardContext(0.0))
    assert wide.action == action and not wide.clamped


def expected_from_vector(vector, frame="base_link"):
    return convert_action_vector(vector, Observation(reference_frame=frame)).action


@pytest.mark.parametrize(
    "answer",
    [
        {"action": VECTOR},
        {"actions": [VECTOR]},
        {"action_values": VECTOR + [0.0]},  # longer: the first seven
        {"openvla_action": {"data": VECTOR}},
        {"result": {"action": VECTOR}},
        {"result": {"actions": {"values": [VECTOR]}}},
    ],
    ids=["action", "actions-nested", "action_values-long", "openvla_action-data",
         "result-action", "result-actions-values"],
)  # fmt: skip
def test_raw_action_vector_answers_become_the_same_delta_as_the_server_makes(
    upstream_server, answer
):
    result = ask(upstream_server, answer)
    assert result.ok, result.failure
    want = expected_from_vector(VECTOR)
    assert result.action == want
    assert result.action.gripper_command == pytest.approx(0.2)  # upstream: (-0.6 + 1) / 2
    assert result.action.confidence == 1.0 and result.action.eef_target_mode.value == "delta"


def test_no_op_fields_beside_a_vector_keep_their_values(upstream_server):
    # As upstream: the vector gives the target; the answer's own gripper and confidence stay.
    action = ask(upstream_server, {**UPSTREAM_NO_OP_ANSWER, "action": VECTOR}).action
    assert action.eef_target == expected_from_vector(VECTOR).eef_target
    assert action.gripper_command is None and action.confidence == 0.0


def test_answers_own_gripper_and_confidence_win_over_the_vectors(upstream_server):
    answer = {"action": VECTOR, "gripper_command": 0.75, "confidence": 0.4,
              "reference_frame": "base_link"}  # fmt: skip
    action = ask(upstream_server, answer).action
    assert action.gripper_command == 0.75 and action.confidence == 0.4
    assert action.reference_frame == "base_link"
    assert action.eef_target == expected_from_vector(VECTOR, "base_link").eef_target
    # Unlike upstream, the robot keeps its own frame: an answer in another one is refused.
    refused = ask(upstream_server, {**answer, "reference_frame": "arm"})
    assert not refused.ok and "reference_frame" in refused.failure


@pytest.mark.parametrize(
    "answer",
    [{"action": VECTOR[:6]}, {"action": [*VECTOR[:6], "1"]}, {"action": [*VECTOR[:6], True]},
     {"result": [VECTOR]}, {"action": {"action": {"action": {"action": {"action": {
         "action": VECTOR}}}}}}],
)  # fmt: skip
def test_unusable_vectors_never_become_motion(answer):
    assert canonical_answer(answer) is answer
    with_nan = json.loads('{"action": [0, 0, 0, 0, 0, NaN, 1]}')
    assert "has_eef_target" not in canonical_answer(with_nan)


def test_a_named_target_wins_over_a_vector():
    answer = {**UPSTREAM_EXAMPLE_ANSWER, "action": VECTOR}
    assert canonical_answer(answer) is answer
    # Absolute joint targets are a named target too: never overridden by a vector.
    joints = {"has_joint_positions": True, "joint_positions": [0.1, 0.2], "action": VECTOR}
    assert canonical_answer(joints) is joints


def test_remote_node_publishes_upstream_vector_with_upstreams_gripper_meaning(upstream_server):
    with Rig() as rig:
        upstream_server.raw_answer = (200, json.dumps({"action": VECTOR}).encode())
        rig.add(RemotePolicyNode(**rig.node_kwargs(remote_url=upstream_server.url,
                                                   inference_rate=20.0)))  # fmt: skip
        rig.stream_joint_states()
        rig.stream_camera(sample_image())
        outputs = rig.wait_for_outputs(1)
    assert outputs
    msg = outputs[0]
    assert msg.gripper_active and msg.gripper_command == pytest.approx(0.2)  # 0.2: mostly closed
    assert msg.has_eef_target and msg.eef_target_pose.position.y == pytest.approx(-0.02)
    assert policy_output_to_action(msg) == expected_from_vector(VECTOR)


def test_remote_node_sends_upstreams_openvla_parameters_and_applies_them_to_vectors(
    upstream_server,
):
    settings = {"openvla_xyz_scaling": 10.0, "openvla_clip_actions": True,
                "openvla_position_bounds": [-0.15, 0.15], "openvla_gripper_bounds": [0.0, 0.9]}
    with Rig() as rig:
        # A 10x step is over the default bound on a delta (0.1 m): this robot allows more.
        node = rig.add(RemotePolicyNode(**rig.node_kwargs(
            remote_url=upstream_server.url, inference_rate=20.0, max_eef_step_m=0.5,
            **settings)))  # fmt: skip
        rig.stream_joint_states()
        rig.stream_camera(sample_image())
        # The server is sent the settings with every request ...
        assert wait_until(lambda: upstream_server.observations())
        overrides = upstream_server.observations()[-1].action_overrides
        assert overrides == ActionOverrides(position_scale=10.0, clip_actions=True,
                                            position_bounds=(-0.15, 0.15),
                                            gripper_bounds=(0.0, 0.9))  # fmt: skip
        # ... and a raw vector in the answer is converted with them, as upstream's client does.
        upstream_server.raw_answer = (200, json.dumps({"action": [0.01, -0.02, 0.5, 0, 0, 0,
                                                                 1.0]}).encode())  # fmt: skip
        assert wait_until(lambda: any(o.has_eef_target and o.eef_target_pose.position.z > 0.1
                                      for o in rig.outputs()))  # fmt: skip
        msg = next(o for o in rig.outputs() if o.eef_target_pose.position.z > 0.1)
        p = msg.eef_target_pose.position
        assert (p.x, p.y, p.z) == pytest.approx((0.1, -0.15, 0.15))  # 10x, then clamped
        assert msg.gripper_command == pytest.approx(0.9)  # raw 1.0 clamped to 0.9, then mapped
        assert node.action_source.client.settings.raw_action_options.clip_actions


@pytest.mark.parametrize(
    "settings, field",
    [({"openvla_xyz_scaling": 0.0}, "openvla_xyz_scaling"),
     ({"openvla_rotation_scaling": 1000.0}, "openvla_rotation_scaling"),
     ({"openvla_clip_actions": "true"}, "openvla_clip_actions"),
     ({"openvla_position_bounds": [0.1, -0.1]}, "openvla_position_bounds"),
     ({"openvla_rotation_bounds": [0.1]}, "openvla_rotation_bounds")],
)  # fmt: skip
def test_bad_upstream_openvla_parameters_are_refused_at_start(settings, field):
    with pytest.raises(ValueError, match=field):
        upstream_action_fields(settings)


# ====================================================== upstream node parameters


def test_upstream_parameter_names_resolve_with_notes():
    resolved = resolve_upstream_parameters(
        {"task_prompt": " wipe the table ", "task_prompt_topic": "/manipulation/task_prompt",
         "use_remote": True}, remote=True)  # fmt: skip
    assert resolved.defaults == {
        "instruction": "wipe the table",
        "instruction_topic": "/manipulation/task_prompt",
        "wait_for_task": True,
        "max_steps": 50,  # upstream's default per task
    }
    assert resolved.task_given and len(resolved.notes) == 3
    assert all("deprecated" in note for note in resolved.notes)
    waiting = resolve_upstream_parameters({"task_prompt": ""}, remote=True)
    # Without task_prompt_topic, upstream's node reads tasks where its task_prompt_cli
    # publishes them: so does this one.
    assert waiting.defaults == {"wait_for_task": True, "max_steps": 50,
                                "instruction_topic": "/manipulation/task_prompt"}  # fmt: skip
    assert not waiting.task_given
    assert resolve_upstream_parameters({"use_remote": False}, remote=False).defaults[
        "instruction_topic"] == "/manipulation/task_prompt"
    assert resolve_upstream_parameters({}, remote=False).defaults == {}
    with pytest.raises(ValueError, match="remote_policy_node"):
        resolve_upstream_parameters({"use_remote": True}, remote=False)
    with pytest.raises(ValueError, match="task_prompt_topic"):
        resolve_upstream_parameters({"task_prompt_topic": "has space"}, remote=True)
    with pytest.raises(ValueError, match="use_remote expected bool"):
        resolve_upstream_parameters({"use_remote": "yes"}, remote=True)


def test_remote_node_with_upstream_names_waits_for_a_task_and_stops_after_max_steps(
    upstream_server,
):
    with Rig() as rig:
        task_topic = rig.topics["instruction_topic"]
        overrides = [p for p in rig.parameters(remote_url=upstream_server.url, inference_rate=20.0,
                                               max_steps=3)
                     if p.name != "instruction_topic"]  # fmt: skip
        overrides += [Parameter("task_prompt_topic", value=task_topic),
                      Parameter("use_remote", value=True)]  # fmt: skip
        node = rig.add(RemotePolicyNode(context=rig.context, namespace=rig.namespace,
                                        parameter_overrides=overrides))  # fmt: skip
        assert node.get_parameter("instruction_topic").value == task_topic
        assert node.get_parameter("wait_for_task").value is True
        rig.stream_joint_states()
        rig.stream_camera(sample_image())
        # Frames flow, but without a task nothing is asked or published (upstream's behaviour).
        assert not wait_until(lambda: upstream_server.request_count() > 0, timeout=1.5)
        assert not rig.outputs() and not node.task_active

        rig.instruction_pub.publish(String(data="put the cup in the sink"))
        assert wait_until(lambda: len(rig.outputs()) >= 3)
        assert wait_until(lambda: not node.task_active)
        count = upstream_server.request_count()
        assert not wait_until(lambda: upstream_server.request_count() > count, timeout=1.0)
        assert len(rig.outputs()) == 3
        assert all(o.instruction == "put the cup in the sink"
                   for o in upstream_server.observations())  # fmt: skip

        # A new task runs again; an empty one clears it at once (upstream's stop).
        node.set_parameters([Parameter("max_steps", value=-1)])  # upstream's "continuous"
        rig.instruction_pub.publish(String(data="open the drawer"))
        assert wait_until(lambda: len(rig.outputs()) >= 5)
        rig.instruction_pub.publish(String(data=""))
        assert wait_until(lambda: not node.task_active)


def test_policy_node_refuses_use_remote_instead_of_loading_a_model_here():
    with Rig() as rig, pytest.raises(ValueError, match="remote_policy_node"):
        PolicyNode(backend=StubBackend(), **rig.node_kwargs(use_remote=True))
