"""The wire contract's several cameras, state and robot id (request), and absolute joint
targets with joint names (every action object): round trips and errors naming the field."""

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from manipulation_policy.core.contract import (
    MAX_CAMERAS,
    InferResponse,
    action_to_response,
    action_to_wire,
    chunk_to_response,
    observation_to_request,
    parse_request,
    parse_response,
    request_to_observation,
    response_to_chunk,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.core.policy_types import (
    ActionChunk,
    JointStateData,
    Observation,
    PolicyAction,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def jpeg_b64(width: int = 8, height: int = 6, red: int = 0) -> str:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = red
    return b64(encode_jpeg(rgb))


def png_b64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (0, 90, 0)).save(buffer, format="PNG")
    return b64(buffer.getvalue())


def field_of(payload) -> str:
    with pytest.raises(InputError) as caught:
        parse_request(payload)
    return caught.value.field


def decode_field_of(payload, max_pixels: int = 4096 * 4096) -> str:
    request = parse_request(payload)
    with pytest.raises(InputError) as caught:
        request_to_observation(request, max_pixels)
    return caught.value.field


# ---------------------------------------------------------------- request: images


def test_several_cameras_round_trip_with_state_and_robot_id():
    wrist = np.zeros((24, 32, 3), np.uint8)
    wrist[..., 2] = 220
    front = np.zeros((48, 64, 3), np.uint8)
    front[..., 1] = 180
    scene = np.zeros((10, 12, 3), np.uint8)
    observation = Observation(
        joint_state=JointStateData(("j1",), (0.5,)),
        image=scene,
        images={"wrist": wrist, "front.left": front},
        state=(0.5, -1.25, 3.0),
        robot_id="/arm/remote_policy_node",
    )
    body = observation_to_request(observation, jpeg_quality=90)
    assert set(body["images"]) == {"wrist", "front.left"}
    for name, rgb in (("wrist", wrist), ("front.left", front)):
        camera = body["images"][name]
        assert camera["image_encoding"] == "jpeg"
        assert (camera["image_width"], camera["image_height"]) == (rgb.shape[1], rgb.shape[0])
        assert base64.b64decode(camera["image"])[:3] == b"\xff\xd8\xff"  # a real JPEG
    assert body["state"] == [0.5, -1.25, 3.0]
    assert body["robot_id"] == "/arm/remote_policy_node"

    decoded = request_to_observation(parse_request(body))
    assert list(decoded.images) == ["wrist", "front.left"]
    assert decoded.images["wrist"].shape == (24, 32, 3)
    assert decoded.images["front.left"].shape == (48, 64, 3)
    assert abs(int(decoded.images["wrist"][..., 2].mean()) - 220) <= 3  # JPEG is lossy
    assert abs(int(decoded.images["front.left"][..., 1].mean()) - 180) <= 3
    assert decoded.image.shape == (10, 12, 3)  # image keeps its meaning beside images
    assert decoded.state == (0.5, -1.25, 3.0)
    assert decoded.robot_id == "/arm/remote_policy_node"


def test_the_jpeg_quality_applies_to_every_camera():
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    low = observation_to_request(Observation(image=noisy, images={"w": noisy}), jpeg_quality=20)
    high = observation_to_request(Observation(image=noisy, images={"w": noisy}), jpeg_quality=95)
    assert low["images"]["w"]["image"] == low["image"]
    assert len(low["images"]["w"]["image"]) < len(high["images"]["w"]["image"])


def test_a_request_without_the_new_fields_has_none_of_them():
    body = observation_to_request(Observation())
    assert not {"images", "state", "robot_id"} & body.keys()
    decoded = request_to_observation(parse_request(body))
    assert decoded.images == {} and decoded.state is None and decoded.robot_id == ""


def test_a_png_camera_and_an_undeclared_encoding_are_read():
    payload = {"images": {"a": {"image": png_b64(5, 4), "image_encoding": "png"},
                          "b": {"image": png_b64(3, 2)}}}
    decoded = request_to_observation(parse_request(payload))
    assert decoded.images["a"].shape == (4, 5, 3)
    assert decoded.images["b"].shape == (2, 3, 3)
    assert decoded.images["b"][0, 0].tolist() == [0, 90, 0]


@pytest.mark.parametrize(
    "images, field",
    [
        ({"bad name": {"image": "x"}}, "images.bad name"),
        ({"-front": {"image": "x"}}, "images.-front"),
        ({"": {"image": "x"}}, "images.''"),
        ({"w" * 65: {"image": "x"}}, "images." + "w" * 65),
        ({f"cam{i}": {"image": "x"} for i in range(MAX_CAMERAS + 1)}, "images"),
        ([], "images"),
        ("wrist", "images"),
        ({"wrist": "abc"}, "images.wrist"),
        ({"wrist": {}}, "images.wrist.image"),
        ({"wrist": {"image": 5}}, "images.wrist.image"),
        ({"wrist": {"image": "x", "image_encoding": 1}}, "images.wrist.image_encoding"),
        ({"wrist": {"image": "x", "image_width": 0}}, "images.wrist.image_width"),
        ({"wrist": {"image": "x", "image_height": 8193}}, "images.wrist.image_height"),
        ({"wrist": {"image": "x", "image_width": "640"}}, "images.wrist.image_width"),
    ],
)
def test_bad_images_are_named(images, field):
    assert field_of({"images": images}) == field


def test_at_most_the_camera_bound_is_accepted():
    images = {f"cam{i}": {"image": jpeg_b64()} for i in range(MAX_CAMERAS)}
    assert len(request_to_observation(parse_request({"images": images})).images) == MAX_CAMERAS


def test_a_long_unprintable_camera_name_is_named_shortly():
    field = field_of({"images": {"\x00" + "x" * 500: {"image": "x"}}})
    assert field.startswith("images.") and len(field) <= 7 + 80


@pytest.mark.parametrize(
    "camera, field",
    [
        ({"image": "not base64!"}, "images.wrist.image"),
        ({"image": ""}, "images.wrist.image"),
        ({"image": b64(b"neither jpeg nor png")}, "images.wrist.image"),
        ({"image": jpeg_b64(), "image_encoding": "png"}, "images.wrist.image"),
        ({"image": jpeg_b64(), "image_encoding": "bmp"}, "images.wrist.image_encoding"),
        ({"image": jpeg_b64(8, 6), "image_width": 9}, "images.wrist.image_width"),
        ({"image": jpeg_b64(8, 6), "image_height": 5}, "images.wrist.image_height"),
        ({"image": b64(base64.b64decode(jpeg_b64())[:40])}, "images.wrist.image"),
    ],
)
def test_undecodable_cameras_are_named(camera, field):
    payload = {"image": jpeg_b64(), "images": {"front": {"image": jpeg_b64()}, "wrist": camera}}
    assert decode_field_of(payload) == field


def test_the_pixel_bound_holds_for_each_camera():
    payload = {"images": {"front": {"image": png_b64(10, 10)}, "wrist": {"image": png_b64(20, 10)}}}
    assert decode_field_of(payload, max_pixels=150) == "images.wrist.image"
    assert request_to_observation(parse_request(payload), 200).images["wrist"].shape == (10, 20, 3)


# ---------------------------------------------------------------- request: state, robot_id


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"state": [0.1, math.nan]}, "state[1]"),
        ({"state": [math.inf]}, "state[0]"),
        ({"state": [0.1, "0.2"]}, "state[1]"),
        ({"state": [True]}, "state[0]"),
        ({"state": 0.5}, "state"),
        ({"state": [0.0] * 257}, "state"),
        ({"robot_id": 7}, "robot_id"),
        ({"robot_id": "r" * 129}, "robot_id"),
    ],
)
def test_bad_state_and_robot_id_are_named(payload, field):
    assert field_of(payload) == field


def test_an_empty_state_is_a_state_of_none_values():
    assert request_to_observation(parse_request({"state": []})).state == ()
    assert len(parse_request({"state": [1.0] * 256}).state) == 256


# ---------------------------------------------------------------- actions: joint targets


def test_joint_positions_and_names_round_trip_through_an_answer():
    first = PolicyAction(joint_positions=(0.1, -0.2), joint_names=("shoulder", "elbow"),
                         gripper_command=1.0)
    second = PolicyAction(joint_positions=(0.3, 0.4, 0.5), joint_deltas=(0.0, 0.01, 0.02),
                          joint_names=("a", "b", "c"))
    third = PolicyAction(joint_positions=(1.0,))  # the observation's joint order
    body = chunk_to_response(ActionChunk((first, second, third), 0.05))
    assert body["has_joint_positions"] is True
    assert body["joint_positions"] == [0.1, -0.2]
    assert body["joint_names"] == ["shoulder", "elbow"]
    assert body["actions"][2]["joint_names"] == []
    chunk = response_to_chunk(parse_response(body))
    assert chunk.actions == (first, second, third)


def test_an_action_without_joint_targets_says_so():
    wire = action_to_wire(PolicyAction(joint_deltas=(0.1,)))
    assert wire["has_joint_positions"] is False
    assert wire["joint_positions"] == [] and wire["joint_names"] == []
    action = response_to_chunk(parse_response(action_to_response(PolicyAction()))).actions[0]
    assert action.joint_positions is None and action.joint_names is None
    # Values without their flag are not read (as joint_deltas without has_joint_deltas).
    ignored = parse_response({"joint_positions": [1.0, 2.0]})
    assert response_to_chunk(ignored).actions[0].joint_positions is None


def test_pending_actions_carry_joint_targets_and_names():
    pending = PolicyAction(joint_positions=(0.5, 0.6), joint_deltas=(0.0, 0.1),
                           joint_names=("x", "y"))
    observation = Observation(joint_state=JointStateData(("j1", "j2", "j3"), (0.0, 0.0, 0.0)),
                              pending_actions=(pending,))
    body = observation_to_request(observation)
    assert body["pending_actions"][0]["joint_names"] == ["x", "y"]
    assert request_to_observation(parse_request(body)).pending_actions == (pending,)


def action_field_of(action: dict, where: str) -> str:
    if where == "top":
        with pytest.raises(InputError) as caught:
            parse_response(action)
    elif where == "actions":
        with pytest.raises(InputError) as caught:
            parse_response({"actions": [{}, action], "action_period_sec": 0.1})
    else:
        with pytest.raises(InputError) as caught:
            parse_request({"pending_actions": [{}, action]})
    return caught.value.field


PREFIX = {"top": "", "actions": "actions[1].", "pending_actions": "pending_actions[1]."}


@pytest.mark.parametrize("where", sorted(PREFIX))
@pytest.mark.parametrize(
    "action, field",
    [
        ({"has_joint_positions": "yes", "joint_positions": [1.0]}, "has_joint_positions"),
        ({"has_joint_positions": True, "joint_positions": [0.1, math.nan]},
         "joint_positions[1]"),
        ({"has_joint_positions": True, "joint_positions": ["0.1"]}, "joint_positions[0]"),
        ({"has_joint_positions": True, "joint_positions": [0.0] * 257}, "joint_positions"),
        ({"joint_names": ["a"] * 2}, "joint_names"),
        ({"joint_names": ["a", ""]}, "joint_names"),
        ({"joint_names": [1]}, "joint_names[0]"),
        ({"joint_names": "a"}, "joint_names"),
        ({"joint_names": [f"j{i}" for i in range(257)]}, "joint_names"),
        ({"has_joint_positions": True, "joint_positions": [0.1], "joint_names": ["a", "b"]},
         "joint_positions"),
        ({"has_joint_deltas": True, "joint_deltas": [0.1, 0.2, 0.3], "joint_names": ["a", "b"]},
         "joint_deltas"),
    ],
)
def test_bad_joint_targets_are_named_wherever_the_action_is(action, field, where):
    assert action_field_of(action, where) == PREFIX[where] + field


def test_announced_pending_joint_positions_must_be_there():
    # (An answer's announced parts are checked by robot/response_validation.)
    field = field_of({"pending_actions": [{"has_joint_positions": True}]})
    assert field == "pending_actions[0].joint_positions"


def test_named_pending_deltas_need_not_match_the_request_joint_count():
    # joint_names says which joints the deltas move; without it they follow joint_states.
    joints = {"name": ["j1", "j2", "j3"], "position": [0.0, 0.0, 0.0]}
    named = {"has_joint_deltas": True, "joint_deltas": [0.1], "joint_names": ["j2"]}
    request = parse_request({"joint_states": joints, "pending_actions": [named]})
    assert request_to_observation(request).pending_actions[0].joint_names == ("j2",)
    unnamed = {"has_joint_deltas": True, "joint_deltas": [0.1]}
    assert field_of({"joint_states": joints, "pending_actions": [unnamed]}) == (
        "pending_actions[0].joint_deltas"
    )
    unnamed_targets = {"has_joint_positions": True, "joint_positions": [0.1, 0.2]}
    assert field_of({"joint_states": joints, "pending_actions": [unnamed_targets]}) == (
        "pending_actions[0].joint_positions"
    )


def test_joint_names_that_do_not_fit_never_reach_the_wire():
    with pytest.raises(ValueError, match="joint_positions has 1 value for 2 joint names"):
        action_to_response(PolicyAction(joint_positions=(0.1,), joint_names=("a", "b")))
    with pytest.raises(ValueError, match="joint_deltas has 3 values"):
        action_to_response(PolicyAction(joint_deltas=(0.1, 0.2, 0.3), joint_names=("a", "b")))
    with pytest.raises(ValueError, match="twice"):
        action_to_response(PolicyAction(joint_positions=(0.1, 0.2), joint_names=("a", "a")))
    with pytest.raises(ValueError, match=r"field joint_positions\[1\]$"):
        action_to_response(PolicyAction(joint_positions=(0.0, math.inf)))


def test_the_answer_schema_describes_the_joint_targets():
    properties = InferResponse.model_json_schema()["$defs"]["ActionModel"]["properties"]
    assert {"has_joint_positions", "joint_positions", "joint_names"} <= properties.keys()
    assert "never deltas" in properties["joint_positions"]["description"]
