"""core/policy_inputs: what a robot sends against what a policy reads."""

import numpy as np
import pytest

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.policy_inputs import (
    check_observation,
    inputs_from_wire,
    inputs_problem,
    inputs_to_wire,
    named_images,
)
from manipulation_policy.core.policy_types import Observation, PolicyInputs

TWO_CAMERAS = PolicyInputs(("wrist", "front"), state_length=6, action_length=7)


def frame(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_the_cameras_and_state_a_policy_reads_fit():
    assert inputs_problem(TWO_CAMERAS, ["front", "wrist"], 6) is None
    # A robot may send more cameras than a policy reads.
    assert inputs_problem(TWO_CAMERAS, ["front", "wrist", "top"], 6) is None
    # A policy that reads nothing takes anything.
    assert inputs_problem(PolicyInputs(), ["a"], 3) is None
    assert inputs_problem(PolicyInputs(), [], None) is None


def test_a_missing_camera_is_named_with_both_lists():
    problem = inputs_problem(TWO_CAMERAS, ["wrist", "top"], 6)
    assert problem.field == "images.front"
    assert "front, wrist" in problem.message and "top, wrist" in problem.message
    assert inputs_problem(TWO_CAMERAS, [], 6).field == "images.wrist"  # the first missing
    assert "sends none" in inputs_problem(TWO_CAMERAS, [], 6).message


def test_the_state_must_be_there_with_its_length():
    missing = inputs_problem(TWO_CAMERAS, ["wrist", "front"], None)
    assert missing.field == "state" and "6" in missing.message
    wrong = inputs_problem(TWO_CAMERAS, ["wrist", "front"], 5)
    assert wrong.field == "state" and "5" in wrong.message and "6" in wrong.message
    assert inputs_problem(PolicyInputs(state_length=0), [], 0) is None


def test_a_lone_image_is_the_only_camera_of_a_one_camera_policy():
    one = PolicyInputs(("front",))
    assert inputs_problem(one, [], None, has_single_image=True) is None
    assert inputs_problem(one, [], None).field == "images.front"
    # Not for a policy of two cameras, nor when named cameras are sent (they must name it).
    assert inputs_problem(TWO_CAMERAS, [], 6, has_single_image=True).field == "images.wrist"
    assert inputs_problem(one, ["wrist"], None, has_single_image=True).field == "images.front"


def test_check_observation_raises_the_problem():
    good = Observation(images={"wrist": frame(1), "front": frame(2)}, state=(0.0,) * 6)
    check_observation(TWO_CAMERAS, good)
    with pytest.raises(InputError) as caught:
        check_observation(TWO_CAMERAS, Observation(images={"wrist": frame(1)}, state=(0.0,) * 6))
    assert caught.value.field == "images.front"
    with pytest.raises(InputError) as caught:
        check_observation(TWO_CAMERAS, Observation(images=good.images, state=(0.0,) * 7))
    assert caught.value.field == "state"
    check_observation(PolicyInputs(("front",)), Observation(image=frame(3)))


def test_named_images_in_the_policys_order():
    observation = Observation(
        images={"top": frame(9), "front": frame(2), "wrist": frame(1)}, state=(0.0,) * 6
    )
    images = named_images(TWO_CAMERAS, observation)
    assert list(images) == ["wrist", "front"]  # the policy's order, the extra camera left out
    assert images["front"] is observation.images["front"]
    lone = Observation(image=frame(5))
    assert named_images(PolicyInputs(("front",)), lone)["front"] is lone.image
    assert dict(named_images(PolicyInputs(), lone)) == {}


def test_inputs_round_trip_through_their_json():
    wire = inputs_to_wire(TWO_CAMERAS)
    assert wire == {"image_names": ["wrist", "front"], "state_length": 6, "action_length": 7}
    assert inputs_from_wire(wire) == TWO_CAMERAS
    assert inputs_from_wire(inputs_to_wire(PolicyInputs())) == PolicyInputs()
    assert inputs_from_wire({}) == PolicyInputs()  # every part optional


@pytest.mark.parametrize(
    "payload, words",
    [
        ([], "inputs must be an object"),
        ({"image_names": "wrist"}, "inputs.image_names"),
        ({"image_names": ["wrist", 3]}, "inputs.image_names"),
        ({"state_length": -1}, "inputs.state_length"),
        ({"state_length": True}, "inputs.state_length"),
        ({"action_length": 7.0}, "inputs.action_length"),
        ({"action_length": "7"}, "inputs.action_length"),
    ],
)
def test_bad_inputs_json_is_refused_by_name(payload, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        inputs_from_wire(payload)
