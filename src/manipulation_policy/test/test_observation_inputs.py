"""Choosing between the aggregated observation and the raw topics, with a fake clock.

No ROS, no sleeps: the node clock is a number the tests move.
"""

from __future__ import annotations

import math

import pytest

from manipulation_policy.core.policy_types import JointStateData, Pose, Quaternion, Vector3
from manipulation_policy.robot.observation_inputs import (
    AggregatedObservation,
    Inputs,
    ObservationSettings,
    Source,
    eef_pose_from_transform,
    is_fresh,
    observation_age_ns,
    select_inputs,
)
from manipulation_policy.robot.scheduling import (
    EefUse,
    FrameInfo,
    FrameScheduler,
    ScheduleSettings,
    StampedPose,
    Verdict,
    first_usable_eef,
)

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC
ON = ObservationSettings(use_observation=True, timeout_sec=0.5)

RAW_FRAME = "raw camera frame"
AGG_FRAME = "aggregated rgb_image"
RAW_JOINTS = JointStateData(name=("a", "b"), position=(0.1, 0.2))
AGG_JOINTS = JointStateData(name=("a", "b"), position=(0.3, 0.4))
RAW_EEF = StampedPose(Pose(Vector3(0.1, 0.0, 0.2)), T0, "base_link")
AGG_EEF = StampedPose(Pose(Vector3(0.4, -0.1, 0.3)), T0, "base_link")
RAW = Inputs(RAW_FRAME, RAW_JOINTS, RAW_EEF)


def aggregated(age_sec: float = 0.0, frame=AGG_FRAME, joints=AGG_JOINTS, eef=AGG_EEF,
               stamp_ns=None) -> AggregatedObservation:  # fmt: skip
    stamp = T0 - round(age_sec * SEC) if stamp_ns is None else stamp_ns
    return AggregatedObservation(stamp, Inputs(frame, joints, eef))


def test_a_fresh_aggregated_observation_gives_every_part():
    selection = select_inputs(aggregated(0.2), RAW, T0, ON)
    assert selection.source is Source.AGGREGATED
    assert selection.frame == AGG_FRAME and selection.joint_state == AGG_JOINTS
    # base_to_ee first; the eef_pose topic's pose stays a second choice.
    assert selection.eef_candidates == (AGG_EEF, RAW_EEF)
    assert selection.observation_age_ns == round(0.2 * SEC)


@pytest.mark.parametrize(
    ("missing", "frame", "joints", "eef_candidates"),
    [("frame", RAW_FRAME, AGG_JOINTS, (AGG_EEF, RAW_EEF)),
     ("joints", AGG_FRAME, RAW_JOINTS, (AGG_EEF, RAW_EEF)),
     ("eef", AGG_FRAME, AGG_JOINTS, (RAW_EEF,))],
)  # fmt: skip
def test_parts_the_aggregated_observation_lacks_come_from_the_raw_topics(
    missing, frame, joints, eef_candidates
):
    selection = select_inputs(aggregated(**{missing: None}), RAW, T0, ON)
    assert selection.source is Source.AGGREGATED
    assert (selection.frame, selection.joint_state) == (frame, joints)
    assert selection.eef_candidates == eef_candidates


@pytest.mark.parametrize(
    ("age_sec", "fresh"),
    [(0.0, True), (0.5, True), (0.5001, False), (3.0, False), (-0.5, True), (-0.6, False)],
)
def test_stale_means_further_than_the_timeout_from_the_node_clock_either_way(age_sec, fresh):
    selection = select_inputs(aggregated(age_sec), RAW, T0, ON)
    assert (selection.source is Source.AGGREGATED) is fresh
    if not fresh:
        assert selection.source is Source.RAW_STALE
        assert (selection.frame, selection.joint_state) == (RAW_FRAME, RAW_JOINTS)
        assert selection.eef_candidates == (RAW_EEF,)  # never the stale base_to_ee
        assert selection.observation_age_ns == round(age_sec * SEC)


def test_the_timeout_is_the_settings_one_and_never_past_the_image_age_limit():
    observation = aggregated(1.5)
    assert select_inputs(observation, RAW, T0, ON).source is Source.RAW_STALE
    longer = ObservationSettings(use_observation=True, timeout_sec=2.0)
    assert select_inputs(observation, RAW, T0, longer).source is Source.AGGREGATED
    # Within observation_timeout_sec but past max_observation_age_sec: its image would not
    # be used (no command from a stale image), so the raw topics take over at once.
    capped = ObservationSettings(use_observation=True, timeout_sec=2.0, max_image_age_sec=1.0)
    assert capped.fresh_within_sec == 1.0
    assert select_inputs(observation, RAW, T0, capped).source is Source.RAW_STALE
    assert select_inputs(aggregated(0.9), RAW, T0, capped).source is Source.AGGREGATED


def test_an_observation_turns_stale_as_the_clock_moves_on():
    observation = aggregated(0.0)
    now = T0
    sources = []
    for _ in range(4):
        sources.append(select_inputs(observation, RAW, now, ON).source)
        now += round(0.2 * SEC)
    assert sources == [Source.AGGREGATED, Source.AGGREGATED, Source.AGGREGATED, Source.RAW_STALE]


def test_a_zero_stamp_is_unknown_time_so_stale():
    # Upstream's node took a zero stamp as fresh; here data of unknown age drives nothing.
    selection = select_inputs(aggregated(stamp_ns=0), RAW, T0, ON)
    assert selection.source is Source.RAW_STALE and selection.observation_age_ns is None
    assert observation_age_ns(0, T0) is None and not is_fresh(0, T0, 1e9)


def test_off_or_absent_means_the_raw_topics():
    off = ObservationSettings(use_observation=False, timeout_sec=0.5)
    selection = select_inputs(aggregated(0.0), RAW, T0, off)
    assert selection.source is Source.RAW_OFF and selection.frame == RAW_FRAME
    selection = select_inputs(None, RAW, T0, ON)
    assert selection.source is Source.RAW_NONE
    assert (selection.frame, selection.joint_state, selection.eef_candidates) == (
        RAW_FRAME, RAW_JOINTS, (RAW_EEF,))
    # Nothing received on any topic yet: no frame, empty joints, no pose.
    nothing = select_inputs(None, Inputs(), T0, ON)
    assert (nothing.frame, nothing.joint_state, nothing.eef_candidates) == (
        None, JointStateData(), ())


def test_settings_come_from_parameter_values():
    values = {"use_observation": False, "observation_timeout_sec": 2,
              "max_observation_age_sec": 0.5}  # fmt: skip
    assert ObservationSettings.from_values(values) == ObservationSettings(False, 2.0, 0.5)


# ------------------------------------------------------------ base_to_ee


def test_base_to_ee_is_the_end_effector_pose_in_the_base_frame():
    rotation = Quaternion(0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5))
    pose = eef_pose_from_transform(Vector3(0.35, -0.05, 0.22), rotation, "base_link",
                                   "odom", T0)  # fmt: skip
    assert pose == StampedPose(Pose(Vector3(0.35, -0.05, 0.22), rotation), T0, "base_link")
    # No parent frame on the transform: the observation's base_frame.
    assert eef_pose_from_transform(Vector3(), Quaternion(), "", "arm_base", 5).frame_id == (
        "arm_base")


@pytest.mark.parametrize(
    ("translation", "rotation"),
    [(Vector3(math.nan, 0.0, 0.0), Quaternion()),
     (Vector3(0.0, math.inf, 0.0), Quaternion()),
     (Vector3(), Quaternion(0.0, 0.0, 0.0, 0.0)),
     (Vector3(), Quaternion(0.0, 0.0, 0.0, math.nan)),
     (Vector3(), Quaternion(1e200, 1e200, 0.0, 0.0))],
)  # fmt: skip
def test_a_transform_that_cannot_be_a_pose_gives_none(translation, rotation):
    assert eef_pose_from_transform(translation, rotation, "base_link", "", T0) is None


# ------------------------------------------------------------ with the scheduler


SETTINGS = ScheduleSettings(inference_rate=10.0, max_observation_age_sec=0.5,
                            reference_frame="base_link")  # fmt: skip


def test_the_first_usable_pose_goes_else_the_first_ones_reason():
    wrong_frame = StampedPose(AGG_EEF.pose, T0, "tool0")
    stale = StampedPose(AGG_EEF.pose, T0 - 2 * SEC, "base_link")
    assert first_usable_eef((AGG_EEF, RAW_EEF), T0, SETTINGS) == (
        EefUse.USED, AGG_EEF.pose, "base_link")
    assert first_usable_eef((wrong_frame, RAW_EEF), T0, SETTINGS) == (
        EefUse.USED, RAW_EEF.pose, "base_link")
    assert first_usable_eef((stale, RAW_EEF), T0, SETTINGS)[:2] == (EefUse.USED, RAW_EEF.pose)
    assert first_usable_eef((wrong_frame, stale), T0, SETTINGS) == (
        EefUse.WRONG_FRAME, None, "tool0")
    assert first_usable_eef((), T0, SETTINGS) == (EefUse.ABSENT, None, "")
    assert first_usable_eef(None, T0, SETTINGS) == (EefUse.ABSENT, None, "")
    assert first_usable_eef(RAW_EEF, T0, SETTINGS)[0] is EefUse.USED  # one pose, as before


def test_the_scheduler_hands_over_the_selected_frame_with_base_to_ee():
    node_clock = [T0]
    scheduler = FrameScheduler(lambda: 0, lambda: node_clock[0])
    frame = FrameInfo(sequence=7, stamp_ns=T0 - round(0.1 * SEC))
    selection = select_inputs(aggregated(0.1, frame=frame), RAW, T0, ON)
    decision = scheduler.decide(selection.frame, selection.eef_candidates, SETTINGS)
    assert decision.verdict is Verdict.HAND_OVER and decision.eef_pose == AGG_EEF.pose
