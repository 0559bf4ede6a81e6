"""The plain Vector3/Quaternion/Pose/Twist are the one pose/twist type: the wire models
and geometry_msgs are converted to and from them by one field description, so their
field names must agree, and every conversion must round-trip exactly."""

from __future__ import annotations

import json
import math

import pytest
from geometry_msgs.msg import Point as PointMsg
from geometry_msgs.msg import Pose as PoseMsg
from geometry_msgs.msg import Quaternion as QuaternionMsg
from geometry_msgs.msg import Twist as TwistMsg
from geometry_msgs.msg import Vector3 as Vector3Msg

from manipulation_policy.core.contract import (
    PointModel,
    PoseModel,
    QuaternionModel,
    TwistModel,
    pose_from_wire,
    pose_to_wire,
    twist_from_wire,
    twist_to_wire,
)
from manipulation_policy.core.policy_types import (
    Pose,
    Quaternion,
    Twist,
    Vector3,
    geometry_parts,
)
from manipulation_policy.nodes.ros_conversion import (
    pose_from_msg,
    pose_to_msg,
    twist_from_msg,
    twist_to_msg,
)

POSE = Pose(Vector3(0.1, -2.5, 1e-9), Quaternion(0.0, math.sqrt(0.5), 0.0, math.sqrt(0.5)))
TWIST = Twist(Vector3(0.3, 0.0, -0.1), Vector3(0.0, 0.0, 1.25))


@pytest.mark.parametrize(
    "plain, model, message",
    [
        (Vector3, PointModel, PointMsg),
        (Vector3, PointModel, Vector3Msg),
        (Quaternion, QuaternionModel, QuaternionMsg),
        (Pose, PoseModel, PoseMsg),
        (Twist, TwistModel, TwistMsg),
    ],
)
def test_the_plain_type_the_wire_model_and_the_message_share_their_fields(plain, model, message):
    names = [name for name, _part in geometry_parts(plain)]
    assert names == list(model.model_fields)
    assert names == list(message.get_fields_and_field_types())


def test_wire_json_is_the_guides_nested_objects_in_field_order():
    assert json.dumps(pose_to_wire(POSE)) == json.dumps(
        {
            "position": {"x": 0.1, "y": -2.5, "z": 1e-9},
            "orientation": {"x": 0.0, "y": math.sqrt(0.5), "z": 0.0, "w": math.sqrt(0.5)},
        }
    )
    assert list(twist_to_wire(TWIST)) == ["linear", "angular"]


def test_wire_round_trip_is_exact():
    assert pose_from_wire(PoseModel.model_validate(pose_to_wire(POSE))) == POSE
    assert twist_from_wire(TwistModel.model_validate(twist_to_wire(TWIST))) == TWIST


def test_message_round_trip_is_exact():
    assert pose_from_msg(pose_to_msg(POSE)) == POSE
    assert twist_from_msg(twist_to_msg(TWIST)) == TWIST
    msg = twist_to_msg(TWIST)
    assert (msg.linear.x, msg.angular.z) == (0.3, 1.25)
