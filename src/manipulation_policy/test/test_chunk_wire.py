"""Action chunks between backend and wire, without a server: the models, the composition
of deltas, the server's check of a backend's chunk, the robot's check of an answer."""

from __future__ import annotations

import json
import math

import pytest
from hostile_servers import good_answer
from server_test_backends import (
    BAD_CHUNKS,
    CHUNK_PERIOD_SEC,
    ChunkedBackend,
    chunk_step,
    chunk_steps,
    forged_chunk,
)

from manipulation_policy.backends import batch_predictor, predictor
from manipulation_policy.core.contract import (
    MAX_ACTION_PERIOD_SEC,
    MAX_PENDING_DELAY_SEC,
    action_to_response,
    action_to_wire,
    chunk_to_response,
    observation_to_request,
    parse_request,
    parse_response,
    request_to_observation,
    response_to_action,
    response_to_chunk,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_types import (
    MAX_CHUNK_LENGTH,
    SINGLE_ACTION_PERIOD_SEC,
    ActionChunk,
    EefTargetMode,
    JointStateData,
    Observation,
    PolicyAction,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.core.pose_math import apply_delta
from manipulation_policy.robot.remote_client import decode_answer
from manipulation_policy.robot.response_validation import (
    Expectation,
    ForeignAnswer,
    validate_chunk,
)
from manipulation_policy.server.answer import BackendAnswerError, checked_response

CURRENT = Pose(Vector3(0.35, 0.05, 0.25), Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))
JOINTS = JointStateData(("j1", "j2"), (0.1, -0.2))


# ------------------------------------------------------------------ models


def test_a_chunk_answer_carries_its_first_action_at_the_top_and_round_trips():
    chunk = chunk_steps(3, "odom", joint_count=2)
    body = chunk_to_response(chunk, request_id="r-7", inference_time_ms=2.0)
    assert body["actions"] == [action_to_wire(action) for action in chunk.actions]
    assert action_to_wire(chunk.actions[0]).items() <= body.items()  # the top level
    assert body["action_period_sec"] == CHUNK_PERIOD_SEC and body["request_id"] == "r-7"
    response = parse_response(json.loads(json.dumps(body)))
    assert response_to_chunk(response) == chunk
    assert response_to_action(response) == chunk.actions[0]


def test_a_single_action_answer_is_a_chunk_of_one():
    action = chunk_step(0, "base_link", 1)
    body = action_to_response(action)
    assert body["actions"] == [action_to_wire(action)]
    assert body["action_period_sec"] == SINGLE_ACTION_PERIOD_SEC
    assert response_to_chunk(parse_response(body)) == ActionChunk.of(action)


def test_an_answer_without_chunk_fields_is_a_chunk_of_one():
    response = parse_response(good_answer(2))
    chunk = response_to_chunk(response)
    assert len(chunk) == 1 and chunk.actions[0] == response_to_action(response)


def chunk_body(length: int = 3, **changes) -> dict:
    body = chunk_to_response(chunk_steps(length, joint_count=3))
    body.update(changes)
    return json.loads(json.dumps(body))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"actions": []}, "actions"),
        ({"actions": chunk_body(1)["actions"] * (MAX_CHUNK_LENGTH + 1)}, "actions"),
        ({"action_period_sec": 0.0}, "action_period_sec"),
        ({"action_period_sec": -0.1}, "action_period_sec"),
        ({"action_period_sec": MAX_ACTION_PERIOD_SEC + 0.5}, "action_period_sec"),
        ({"action_period_sec": "0.1"}, "action_period_sec"),
        ({"action_period_sec": None}, "action_period_sec"),  # actions without a period
        ({"actions": None}, "actions"),  # a period without actions
        ({"actions": [{"confidence": 2.0}]}, "actions[0].confidence"),
        ({"actions": [{}, {"joint_deltas": [0.1, "x"]}]}, "actions[1].joint_deltas[1]"),
        ({"actions": [{}, {}, {"eef_target_pose": {"position": {"x": "far"}}}]},
         "actions[2].eef_target_pose.position.x"),
    ],
)  # fmt: skip
def test_chunk_fields_are_bounded_and_named(changes, field):
    with pytest.raises(InputError) as caught:
        parse_response(chunk_body(**changes))
    assert caught.value.field == field


def test_the_longest_chunk_is_valid():
    assert len(response_to_chunk(parse_response(chunk_body(MAX_CHUNK_LENGTH)))) == 256


PENDING = (
    PolicyAction(
        eef_target=Pose(Vector3(0.3, 0.0, 0.2)),
        eef_target_mode=EefTargetMode.ABSOLUTE,
        joint_deltas=(0.01, 0.02),
        gripper_command=1.0,
        confidence=0.7,
    ),
    PolicyAction(confidence=0.0),
)


def test_pending_actions_travel_from_observation_to_the_servers_observation():
    observation = Observation(joint_state=JOINTS, pending_actions=PENDING, pending_delay_sec=0.25)
    body = observation_to_request(observation)
    assert len(body["pending_actions"]) == 2 and body["pending_delay_sec"] == 0.25
    decoded = request_to_observation(parse_request(json.loads(json.dumps(body))))
    assert decoded.pending_actions == PENDING and decoded.pending_delay_sec == 0.25


def test_a_request_without_pending_fields_has_none():
    body = observation_to_request(Observation(joint_state=JOINTS))
    assert "pending_actions" not in body and "pending_delay_sec" not in body
    decoded = request_to_observation(parse_request(body))
    assert decoded.pending_actions == () and decoded.pending_delay_sec is None


def test_pending_actions_take_the_requests_frame():
    body = {"reference_frame": "odom", "pending_actions": [{"confidence": 0.5}]}
    (action,) = request_to_observation(parse_request(body)).pending_actions
    assert action.reference_frame == "odom"


def request_with_pending(index: int = 0, **fields) -> dict:
    pending = [action_to_wire(PENDING[1]) for _ in range(3)]
    pending[index] = {**action_to_wire(PENDING[0]), **fields}
    return {
        "joint_states": {"name": ["j1", "j2"], "position": [0.1, -0.2]},
        "pending_actions": pending,
        "pending_delay_sec": 0.1,
    }


ZERO_Q = {"x": 0.0, "y": 0.0, "z": 0.0, "w": 0.0}
ORIGIN = {"x": 0.0, "y": 0.0, "z": 0.0}


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        (request_with_pending(2, eef_target_pose={"position": {"x": "a"}}),
         "pending_actions[2].eef_target_pose.position.x"),
        (request_with_pending(1, confidence=1.5), "pending_actions[1].confidence"),
        (request_with_pending(0, gripper_command=-0.1), "pending_actions[0].gripper_command"),
        (request_with_pending(0, joint_deltas=[0.1]), "pending_actions[0].joint_deltas"),
        (request_with_pending(1, reference_frame="odom"), "pending_actions[1].reference_frame"),
        (request_with_pending(0, eef_target_pose={"position": ORIGIN, "orientation": ZERO_Q}),
         "pending_actions[0].eef_target_pose.orientation"),
        (request_with_pending(2, eef_target_mode="sideways"), "pending_actions[2].eef_target_mode"),
        ({"pending_actions": [{"has_eef_target": True}]}, "pending_actions[0].eef_target_pose"),
        ({"pending_actions": [{}] * (MAX_CHUNK_LENGTH + 1)}, "pending_actions"),
        ({"pending_actions": {"confidence": 0.5}}, "pending_actions"),
        ({"pending_delay_sec": -0.01}, "pending_delay_sec"),
        ({"pending_delay_sec": MAX_PENDING_DELAY_SEC + 1}, "pending_delay_sec"),
        ({"pending_delay_sec": "0.1"}, "pending_delay_sec"),
    ],
)  # fmt: skip
def test_bad_pending_fields_are_refused_naming_the_field(request_body, field):
    with pytest.raises(InputError) as caught:
        parse_request(request_body)
    assert caught.value.field == field


def test_the_longest_pending_list_is_valid():
    assert len(parse_request({"pending_actions": [{}] * MAX_CHUNK_LENGTH}).pending_actions) == 256


# ------------------------------------------------------------------ predictor


def test_predictor_composes_chunk_deltas_each_on_the_target_before():
    chunk = predictor(ChunkedBackend())(
        Observation(joint_state=JOINTS, instruction="chunk 4", eef_pose=CURRENT)
    )
    steps = chunk_steps(4, joint_count=2).actions
    running = CURRENT
    for step, action in zip(steps, chunk.actions, strict=True):
        running = apply_delta(running, step.eef_target)
        assert action.eef_target_mode is EefTargetMode.ABSOLUTE
        assert action.eef_target == running
        assert action.joint_deltas == step.joint_deltas  # only the pose is composed
    # Not each delta on the observation's pose: the last target is 4 steps away.
    assert chunk.actions[3].eef_target != apply_delta(CURRENT, steps[3].eef_target)
    assert chunk.actions[3].eef_target.position.x == pytest.approx(CURRENT.position.x + 0.04)
    assert chunk.action_period_sec == CHUNK_PERIOD_SEC


def test_predictor_leaves_deltas_without_the_current_pose():
    chunk = predictor(ChunkedBackend())(Observation(instruction="chunk 3"))
    assert chunk == chunk_steps(3)


def test_predictor_answers_a_single_action_as_a_chunk_of_one():
    backend = ChunkedBackend()
    chunk = predictor(backend)(Observation(joint_state=JOINTS, eef_pose=CURRENT))
    single = backend.predict(Observation(joint_state=JOINTS))
    assert len(chunk) == 1 and chunk.action_period_sec == SINGLE_ACTION_PERIOD_SEC
    assert chunk.actions[0].eef_target == apply_delta(CURRENT, single.eef_target)


def test_batch_predictor_gives_each_observation_its_own_chunk():
    observations = [
        Observation(instruction="chunk 2", eef_pose=CURRENT),
        Observation(instruction="chunk 5"),
        Observation(instruction="raise"),
        Observation(),
    ]
    answers = batch_predictor(ChunkedBackend())(observations)
    assert [len(a) for a in (answers[0], answers[1], answers[3])] == [2, 5, 1]
    assert answers[0] == predictor(ChunkedBackend())(observations[0])
    assert answers[1] == chunk_steps(5)
    assert isinstance(answers[2], RuntimeError)  # a failed observation's own answer


@pytest.mark.parametrize("answer", ["text", None, {"confidence": 1.0}, RuntimeError("x")])
def test_predictor_passes_what_is_not_an_answer_on_for_the_check(answer):
    class Odd:
        def predict(self, observation):
            return answer

    assert predictor(Odd())(Observation(eef_pose=CURRENT)) is answer


def test_a_forged_chunk_is_passed_on_uncomposed_for_the_check():
    broken = BAD_CHUNKS["later-not-an-action"][0](chunk_steps(6))

    class Forging:
        def predict(self, observation):
            return broken

    assert predictor(Forging())(Observation(eef_pose=CURRENT)) is broken


# ------------------------------------------------------------------ the server's check


@pytest.mark.parametrize("kind", sorted(BAD_CHUNKS))
def test_a_broken_chunk_is_refused_naming_the_field(kind):
    make, field = BAD_CHUNKS[kind]
    with pytest.raises(BackendAnswerError) as caught:
        checked_response(make(chunk_steps(6, joint_count=2)))
    assert caught.value.field == field


def test_a_good_chunk_passes_with_every_action():
    chunk = chunk_steps(MAX_CHUNK_LENGTH, joint_count=2)
    body = checked_response(chunk, request_id="r", inference_time_ms=1.0)
    assert len(body["actions"]) == MAX_CHUNK_LENGTH
    assert response_to_chunk(parse_response(body)) == chunk


def test_a_forged_but_valid_chunk_passes():
    chunk = chunk_steps(3)
    assert checked_response(forged_chunk(chunk.actions, CHUNK_PERIOD_SEC)) == checked_response(
        chunk
    )


# ------------------------------------------------------------------ the robot's check


EXPECT = Expectation(reference_frame="base_link", joint_count=3, request_id="req-1")


def answer_of(chunk: ActionChunk, request_id="req-1", **changes) -> dict:
    body = chunk_to_response(chunk, request_id=request_id)
    body.update(changes)
    return json.loads(json.dumps(body))


def refusal(payload: dict, expect: Expectation = EXPECT) -> InputError:
    with pytest.raises(InputError) as caught:
        decode_answer(json.dumps(payload).encode(), expect)
    return caught.value


def test_the_robot_takes_a_valid_chunk():
    chunk = chunk_steps(6, joint_count=3)
    assert decode_answer(json.dumps(answer_of(chunk)).encode(), EXPECT) == chunk


def with_action(body: dict, index: int, **fields) -> dict:
    body["actions"][index].update(fields)
    if index == 0:
        body.update(fields)
    return body


FAR = {"position": {"x": 0.2, "y": 0.0, "z": 0.0},
       "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda b: with_action(b, 1, joint_deltas=[0.0]), "actions[1].joint_deltas"),
        (lambda b: with_action(b, 5, reference_frame="odom"), "actions[5].reference_frame"),
        (lambda b: with_action(b, 2, eef_target_pose={**FAR, "position": {"x": 0.0}}),
         "actions[2].eef_target_pose.position.y"),  # announced, but not all there
        (lambda b: with_action(b, 1, eef_target_pose={
            "position": {"x": 0.0, "y": 0.0, "z": 0.0},
            "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 0.5}}),
         "actions[1].eef_target_pose.orientation"),
        (lambda b: with_action(b, 0, eef_target_pose={**FAR, "orientation": {
            "x": 0.0, "y": 0.0, "z": 0.0, "w": 0.5}}), "eef_target_pose.orientation"),
        (lambda b: {**b, "confidence": 0.9}, "actions[0]"),  # the top level is not actions[0]
        (lambda b: {**b, "request_id": "req-0"}, "request_id"),
    ],
)  # fmt: skip
def test_the_robots_form_checks_apply_to_every_action(edit, field):
    assert refusal(edit(answer_of(chunk_steps(6, joint_count=3)))).field == field


def test_an_answer_to_another_request_is_refused_as_foreign():
    caught = refusal(answer_of(chunk_steps(2, joint_count=3), request_id="earlier-1"))
    assert isinstance(caught, ForeignAnswer)
    assert "answers request 'earlier-1', not 'req-1'" in str(caught)


@pytest.mark.parametrize("request_id", [None, "absent"])
def test_an_answer_naming_no_request_is_taken(request_id):
    # Upstream's server echoes nothing: the connection handling keeps late answers out.
    payload = answer_of(chunk_steps(2, joint_count=3), request_id=None)
    if request_id == "absent":
        del payload["request_id"]
    assert len(validate_chunk(payload, EXPECT)) == 2


@pytest.mark.parametrize("vector", [[[0.0] * 7], [0.0] * 7, [], "none"])
def test_upstreams_actions_field_is_not_a_chunk(vector):
    # Upstream puts a raw action vector under "actions": a chunk of one, as before.
    chunk = decode_answer(json.dumps({"actions": vector}).encode(), EXPECT)
    assert len(chunk) == 1 and chunk.action_period_sec == SINGLE_ACTION_PERIOD_SEC


def test_a_vector_beside_a_period_is_refused_not_guessed():
    caught = refusal({"actions": [[0.0] * 7], "action_period_sec": 0.1})
    assert caught.field == "actions[0]"
