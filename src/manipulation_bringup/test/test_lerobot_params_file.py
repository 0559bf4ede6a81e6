"""config/lerobot_two_camera_arm.yaml, the README's complete params file for a
LeRobot-trained two-camera arm: core_launch.py's planning accepts it for both nodes
(every name a parameter of that node, every value one it takes, cameras and names that
agree), and its action layout fits the arm it describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from manipulation_bringup.launch_logic import (
    LOCAL_NODE,
    REMOTE_NODE,
    ParamsFileError,
    plan_policy_node,
)
from manipulation_policy.backends.lerobot_options import OPTIONS_BY_NAME
from manipulation_policy.core.action_layout import parse_action_layout

CONFIG = Path(__file__).resolve().parents[1] / "config"
ARM_FILE = CONFIG / "lerobot_two_camera_arm.yaml"
DEFAULTS = CONFIG / "policy_params.yaml"


@pytest.mark.parametrize("remote, node", [("false", LOCAL_NODE), ("true", REMOTE_NODE)])
def test_core_launch_plans_each_node_with_it(remote, node):
    plan = plan_policy_node({"params_file": str(ARM_FILE), "use_remote_policy": remote},
                            default_params_file=DEFAULTS)
    assert plan.name == node
    parameters = plan.file_parameters
    assert tuple(parameters["camera_names"]) == ("wrist", "front")
    assert len(parameters["camera_topics"]) == 2
    assert parameters["state_joints"][-1] == "gripper"


def test_a_bad_layout_in_such_a_file_is_refused_naming_it(tmp_path):
    broken = tmp_path / "arm.yaml"
    broken.write_text(ARM_FILE.read_text().replace("wrist_roll,gripper", "wrist_roll,wheel:x"))
    with pytest.raises(ParamsFileError, match="action_layout.*unknown kind 'wheel'"):
        plan_policy_node({"params_file": str(broken)}, default_params_file=DEFAULTS)


def test_the_in_process_node_serves_a_lerobot_checkpoint_with_a_layout_that_fits():
    section = yaml.safe_load(ARM_FILE.read_text())[f"/**/{LOCAL_NODE}"]["ros__parameters"]
    assert section["backend"] == "lerobot"
    for name in ("action_layout", "gripper_closed", "gripper_open", "fps"):
        assert OPTIONS_BY_NAME[name].problem(section[name]) is None, name
    layout = parse_action_layout(section["action_layout"])
    # One action value per state value: the five joints' targets, then the gripper.
    assert len(layout) == len(section["state_joints"])
    assert layout.names_of("joint_position") == tuple(section["state_joints"][:5])
    assert [e.kind for e in layout.entries][-1] == "gripper"
