"""Several cameras and the state vector (robot/camera_inputs): pure, no ROS."""

from __future__ import annotations

import math

import pytest

from manipulation_policy.core.policy_types import (
    JointStateData,
    PolicyInputs,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.robot.camera_inputs import (
    CameraSpec,
    StateLayout,
    camera_name_problem,
    camera_parameters_problem,
    camera_specs,
    camera_topics_problem,
    configuration_problem,
    pair_cameras,
    state_joints_problem,
    state_vector,
)

NAMES = ("wrist", "front", "side")


def pair(newest, tolerance=0.05, names=NAMES):
    # Frames are (label, stamp_ns) here: the pairing only reads a stamp.
    return pair_cameras(names, newest, lambda frame: frame[1], tolerance)


# ---------------------------------------------------------------- pairing


def test_a_set_is_ready_when_every_camera_is_within_the_tolerance_of_the_first():
    newest = {"wrist": ("w", 1_000_000_000), "front": ("f", 1_040_000_000),
              "side": ("s", 960_000_000)}
    camera_set = pair(newest)
    assert camera_set.ready and camera_set.problem is None
    assert dict(camera_set.frames) == newest
    assert list(camera_set.frames) == list(NAMES)  # in the configured order


def test_a_missing_camera_is_named():
    camera_set = pair({"wrist": ("w", 1), "side": ("s", 1)})
    assert not camera_set.ready
    assert camera_set.problem == "camera front: no frame yet"
    assert pair({"front": ("f", 1)}).problem == "camera wrist: no frame yet"


def test_a_stale_camera_is_named_with_how_far_off_it_is():
    newest = {"wrist": ("w", 2_000_000_000), "front": ("f", 2_000_000_000),
              "side": ("s", 1_800_000_000)}
    camera_set = pair(newest)
    assert not camera_set.ready
    assert camera_set.problem == (
        "camera side: newest frame is 0.200 s before wrist's (camera_sync_tolerance_sec=0.05)"
    )
    newest["side"] = ("s", 2_060_000_000)
    assert "0.060 s after wrist's" in pair(newest).problem


def test_the_tolerance_is_inclusive_and_zero_needs_equal_stamps():
    newest = {"wrist": ("w", 1_000_000_000), "front": ("f", 1_050_000_000),
              "side": ("s", 950_000_000)}
    assert pair(newest, 0.05).ready
    assert not pair(newest, 0.049).ready
    same = {name: (name, 7) for name in NAMES}
    assert pair(same, 0.0).ready
    assert not pair({**same, "side": ("s", 8)}, 0.0).ready


def test_one_camera_is_a_set_of_its_own():
    assert pair({"wrist": ("w", 5)}, names=("wrist",)).ready


# ---------------------------------------------------------------- configuration


def test_camera_specs_follow_image_transport_unless_a_topic_says_compressed():
    specs = camera_specs(["/a/image_raw", "/b/image_raw/compressed"], ["a", "b"], "raw")
    assert specs == (CameraSpec("a", "/a/image_raw", False),
                     CameraSpec("b", "/b/image_raw/compressed", True))
    specs = camera_specs(["/a/image_raw/", "/b/compressed"], ["a", "b"], "Compressed")
    assert specs == (CameraSpec("a", "/a/image_raw/compressed", True),
                     CameraSpec("b", "/b/compressed", True))
    assert camera_specs([], [], "raw") == ()


@pytest.mark.parametrize("names, problem", [
    (["wrist", "front"], None),
    (["observation.images_top", "cam-2", "_x"], None),
    (["wrist", "wrist"], "must not name a camera twice"),
    ([""], "[0] '' is not a camera name"),
    (["ok", "-dash"], "[1] '-dash' is not a camera name"),
    (["has space"], "[0] 'has space' is not a camera name"),
    (["x" * 65], "is not a camera name"),
    ([f"c{i}" for i in range(9)], "must hold at most 8 names, got 9"),
])
def test_camera_names_match_the_wire_pattern(names, problem):
    found = camera_name_problem(names)
    assert (found is None) if problem is None else (problem in found)


def test_camera_topics_and_their_agreement_with_the_names():
    assert camera_topics_problem(["/a", "/b"]) is None
    assert "twice" in camera_topics_problem(["/a", "/a"])
    assert "[1] must be a non-empty topic" in camera_topics_problem(["/a", ""])
    assert "at most 8 topics" in camera_topics_problem([f"/t{i}" for i in range(9)])
    assert camera_parameters_problem({"camera_topics": (), "camera_names": ()}) is None
    assert camera_parameters_problem({"camera_topics": ("/a",), "camera_names": ("a",)}) is None
    problem = camera_parameters_problem({"camera_topics": ("/a", "/b"), "camera_names": ("a",)})
    assert problem.startswith("camera_names must name each of camera_topics")
    assert "1 names for 2 topics" in problem


def test_state_joints_are_checked():
    assert state_joints_problem(("a", "b")) is None
    assert state_joints_problem(("a", "a")) == "must not name a joint twice"
    assert state_joints_problem(("a", " ")) == "must not hold an empty name"
    assert "at most 249" in state_joints_problem(tuple(f"j{i}" for i in range(250)))


def test_state_layout_length():
    assert StateLayout().length is None
    assert StateLayout(("a", "b")).length == 2
    assert StateLayout((), True).length == 7
    assert StateLayout(("a",), True).length == 8
    values = {"state_joints": ("a", "b"), "state_eef_pose": True}
    assert StateLayout.from_values(values) == StateLayout(("a", "b"), True)


def test_configuration_problem_names_the_missing_camera_or_the_state_length():
    required = PolicyInputs(("wrist", "front"), 6, 6)
    layout = StateLayout(tuple("abcdef"))
    assert configuration_problem(required, ["front", "wrist", "extra"], layout) is None
    problem = configuration_problem(required, ["wrist", "top"], layout)
    assert problem.startswith("the policy does not fit this robot: images.front is missing")
    assert "\n" not in problem and "(camera_names)" in problem
    problem = configuration_problem(required, ["wrist", "front"], StateLayout(("a",), True))
    assert problem == ("the policy does not fit this robot: state has 8 values, but the "
                       "policy reads 6 (state_joints has 1 + 7 with state_eef_pose)")
    problem = configuration_problem(required, ["wrist", "front"], StateLayout())
    assert problem.startswith("the policy does not fit this robot: state is missing")


def test_a_one_camera_robot_fits_a_one_camera_policy_through_its_image():
    assert configuration_problem(PolicyInputs(("front",)), [], StateLayout()) is None
    assert "images.front" in configuration_problem(
        PolicyInputs(("front", "wrist")), [], StateLayout()
    )
    assert configuration_problem(PolicyInputs(), ["a", "b"], StateLayout(("x",))) is None


# ---------------------------------------------------------------- the state vector

JOINTS = JointStateData(("elbow", "shoulder", "wrist"), (0.2, -0.1, 1.5))
POSE = Pose(Vector3(0.4, -0.1, 0.3), Quaternion(0.0, 0.0, 0.7071, 0.7071))


def test_the_state_is_the_configured_joints_in_their_order_then_the_pose():
    assert state_vector(StateLayout(("shoulder", "wrist", "elbow")), JOINTS, None).values == (
        -0.1, 1.5, 0.2
    )
    result = state_vector(StateLayout(("wrist",), True), JOINTS, POSE)
    assert result.values == (1.5, 0.4, -0.1, 0.3, 0.0, 0.0, 0.7071, 0.7071)
    assert result.problem is None
    assert state_vector(StateLayout((), True), JointStateData(), POSE).values == (
        0.4, -0.1, 0.3, 0.0, 0.0, 0.7071, 0.7071
    )


def test_no_state_configured_is_no_state_and_no_problem():
    result = state_vector(StateLayout(), JointStateData(), None)
    assert result.values is None and result.problem is None


def test_a_missing_or_unknown_joint_sends_nothing_and_says_why():
    result = state_vector(StateLayout(("shoulder", "gripper")), JOINTS, None)
    assert result.values is None
    assert result.problem == ("state: joint 'gripper' is not in the joint states "
                              "(elbow, shoulder, wrist)")
    assert "none received" in state_vector(
        StateLayout(("a",)), JointStateData(), None
    ).problem
    unknown = JointStateData(("a", "b"), (0.0, math.nan))
    result = state_vector(StateLayout(("a", "b")), unknown, None)
    assert result.values is None and result.problem == "state: joint 'b' position is unknown (nan)"


def test_no_usable_pose_sends_nothing_when_the_state_ends_with_it():
    result = state_vector(StateLayout(("elbow",), True), JOINTS, None)
    assert result.values is None and "no usable end-effector pose" in result.problem
    bad = Pose(Vector3(math.inf, 0.0, 0.0))
    assert "not finite" in state_vector(StateLayout((), True), JOINTS, bad).problem


def test_the_replay_takes_several_cameras_and_a_state_but_not_unnamed_cameras():
    from manipulation_policy.replay.errors import ReplayInputError
    from manipulation_policy.replay.node_settings import node_values

    assert node_values("remote_policy_node")["camera_topics"] == ()
    for overrides in ({"camera_topics": ["/a"], "camera_names": ["a"]},
                      {"state_joints": ["elbow"]}, {"state_eef_pose": True}):
        values = node_values("remote_policy_node", overrides=overrides)
        assert all(values[name] == tuple(value) if isinstance(value, list) else value
                   for name, value in overrides.items())
    with pytest.raises(ReplayInputError, match="camera_names must name each of camera_topics"):
        node_values("remote_policy_node",
                    overrides={"camera_topics": ["/a", "/b"], "camera_names": ["a"]})
