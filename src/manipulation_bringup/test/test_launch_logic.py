"""The decisions of core_launch.py: which node, which parameters, which values are refused."""

import ast
from pathlib import Path

import pytest
import yaml

from manipulation_bringup import launch_logic
from manipulation_bringup.launch_logic import (
    LOCAL_NODE,
    NODE_PARAMETERS,
    REMOTE_NODE,
    LaunchArgumentError,
    ParamsFileError,
    plan_policy_node,
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PARAMS_FILE = PACKAGE_DIR / "config" / "policy_params.yaml"
LAUNCH_FILE = PACKAGE_DIR / "launch" / "core_launch.py"

# The defaults of COMMON.md's shared names, which the nodes declare too.
SHARED_DEFAULTS = {
    "camera_topic": "/camera/color/image_raw",
    "image_transport": "raw",
    # Several cameras and the state (their arrays are empty by default: not in the file).
    "camera_sync_tolerance_sec": 0.05,
    "state_eef_pose": False,
    "joint_states_topic": "/joint_states",
    "instruction_topic": "/manipulation/instruction",
    "eef_pose_topic": "/manipulation/eef_pose",
    "observation_topic": "/manipulation/observation",
    "output_topic": "/manipulation/policy_output",
    "inference_rate": 5.0,
    "instruction": "pick up the object",
    "reference_frame": "base_link",
    "max_observation_age_sec": 0.5,
    "use_observation": True,
    "observation_timeout_sec": 0.5,
    "wait_for_task": False,
    "max_steps": 0,
    "chunk_topic": "/manipulation/policy_chunk",
    "chunk_merge": "replace",
    "chunk_ensemble_weight": 0.01,
    "crossfade_steps": 4,
    "refill_horizon_sec": -1.0,
    "autostart": True,
    "dry_run": False,
    "preview_topic": "/manipulation/policy_output_preview",
    "chunk_preview_topic": "/manipulation/policy_chunk_preview",
    "estop_topic": "/manipulation/estop",
    "input_timeout_sec": 1.0,
    # The safety guard's (the per-joint arrays are empty by default: not in the file).
    "workspace_min": (-1.5, -1.5, -1.5),
    "workspace_max": (1.5, 1.5, 1.5),
    "max_eef_step_m": 0.1,
    "max_eef_step_rad": 0.5,
    "max_joint_delta": 0.25,
    "max_gripper_rate": 10.0,
    "max_base_linear_speed": 0.5,
    "max_base_angular_speed": 1.0,
    "min_confidence": 0.0,
}
LOCAL_DEFAULTS = {
    "backend": "openvla",
    "model": "openvla/openvla-7b",
    "unnorm_key": "",
    "device": "auto",
    "dtype": "auto",
    "quantization": "none",
    "lora_adapter": "",
    "attn_implementation": "auto",
    "gripper_convention": "open_is_one",
    "position_scale": 1.0,
    "rotation_scale": 1.0,
    "clip_actions": False,
    "position_bounds": "-1.0,1.0",
    "rotation_bounds": "-3.141592653589793,3.141592653589793",
    "gripper_bounds": "0.0,1.0",
    "max_position_step": 0.0,
    "max_rotation_step": 0.0,
    "action_layout": "",
    "gripper_closed": 0.0,
    "gripper_open": 1.0,
    "fps": 0.0,
    "seed": "",
}
REMOTE_DEFAULTS = {
    "remote_url": "http://localhost:5000",
    "remote_timeout_sec": 1.0,
    "remote_retry_attempts": 3,
    "remote_max_in_flight": 1,
    "remote_fallback_on_failure": True,
    "remote_api_key": "",
    "remote_api_key_file": "",
    "remote_max_response_bytes": 262144,
    "remote_retry_after_max_sec": 30.0,
    "image_width": 224,
    "image_height": 224,
    "jpeg_quality": 90,
}


def plan(**arguments):
    return plan_policy_node(arguments, default_params_file=PARAMS_FILE)


def write_params(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------ the two modes


def test_default_starts_the_local_node_with_the_yaml_defaults():
    result = plan()
    assert (result.package, result.executable, result.name) == (
        "manipulation_policy",
        LOCAL_NODE,
        LOCAL_NODE,
    )
    assert result.parameters == {**SHARED_DEFAULTS, **LOCAL_DEFAULTS}
    assert result.ignored_arguments == ()
    assert result.params_file == str(PARAMS_FILE)


def test_remote_mode_starts_the_remote_node_with_the_yaml_defaults():
    result = plan(use_remote_policy="true")
    assert (result.package, result.executable, result.name) == (
        "manipulation_policy",
        REMOTE_NODE,
        REMOTE_NODE,
    )
    assert result.parameters == {**SHARED_DEFAULTS, **REMOTE_DEFAULTS}
    assert "http://localhost:5000" in result.summary()


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", "yes", "YES", " yes "])
def test_every_true_spelling_chooses_the_remote_node(text):
    assert plan(use_remote_policy=text).name == REMOTE_NODE


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "No", ""])
def test_every_false_spelling_or_unset_chooses_the_local_node(text):
    assert plan(use_remote_policy=text).name == LOCAL_NODE


# ----------------------------------------------------------------- overrides


def test_remote_overrides_are_typed_and_win_over_the_yaml():
    result = plan(
        use_remote_policy="yes",
        remote_url="https://gpu-host.example:8443/v1",
        remote_timeout_sec="2.5",
        remote_retry_attempts="0",
        remote_max_in_flight="2",
        remote_fallback_on_failure="no",
        camera_topic="/head_camera/image_raw",
        joint_states_topic="arm/joint_states",
        instruction="put the cup in the sink",
        inference_rate="10",
        chunk_merge="temporal_ensemble",
        refill_horizon_sec="0",
    )
    params = result.parameters
    assert params["chunk_merge"] == "temporal_ensemble"
    assert params["refill_horizon_sec"] == 0.0 and type(params["refill_horizon_sec"]) is float
    assert params["remote_url"] == "https://gpu-host.example:8443/v1"
    assert params["remote_timeout_sec"] == 2.5
    assert params["remote_retry_attempts"] == 0
    assert type(params["remote_retry_attempts"]) is int
    assert params["remote_max_in_flight"] == 2 and type(params["remote_max_in_flight"]) is int
    assert params["remote_fallback_on_failure"] is False
    assert params["camera_topic"] == "/head_camera/image_raw"
    assert params["joint_states_topic"] == "arm/joint_states"
    assert params["instruction"] == "put the cup in the sink"
    # "10" arrives as 10.0, so the parameter is declared a double, as its default is.
    assert params["inference_rate"] == 10.0 and type(params["inference_rate"]) is float
    # Untouched ones keep the yaml value.
    assert params["jpeg_quality"] == 90
    assert params["output_topic"] == "/manipulation/policy_output"


@pytest.mark.parametrize("mode", ["true", "false"])
def test_observation_and_task_topic_arguments_override_the_yaml(mode):
    result = plan(
        use_remote_policy=mode,
        use_observation="false",
        observation_topic="/robot1/manipulation/observation",
        observation_timeout_sec="2",
        instruction_topic="/manipulation/task_prompt",
    )
    params = result.parameters
    assert params["use_observation"] is False
    assert params["observation_topic"] == "/robot1/manipulation/observation"
    assert params["observation_timeout_sec"] == 2.0
    assert type(params["observation_timeout_sec"]) is float
    assert params["instruction_topic"] == "/manipulation/task_prompt"
    assert result.ignored_arguments == ()


def test_local_model_options_override_the_yaml():
    result = plan(
        backend="stub",
        model="/models/openvla-finetuned",
        unnorm_key="bridge_orig",
        device="cuda:1",
        quantization="4bit",
        lora_adapter="/models/lora/pick_cup",
        image_transport="compressed",
    )
    params = result.parameters
    assert result.name == LOCAL_NODE
    assert params["backend"] == "stub"
    assert params["model"] == "/models/openvla-finetuned"
    assert params["unnorm_key"] == "bridge_orig"
    assert params["device"] == "cuda:1"
    assert params["quantization"] == "4bit"
    assert params["lora_adapter"] == "/models/lora/pick_cup"
    assert params["image_transport"] == "compressed"
    assert params["dtype"] == "auto"


def test_empty_strings_are_not_set_and_keep_the_yaml_values():
    result = plan(use_remote_policy="true", remote_url="", remote_timeout_sec="", instruction="  ")
    assert result.parameters == {**SHARED_DEFAULTS, **REMOTE_DEFAULTS}


def test_arguments_of_the_other_mode_are_reported_not_passed():
    local = plan(remote_url="http://gpu:5000", remote_retry_attempts="5")
    assert local.name == LOCAL_NODE
    assert set(local.ignored_arguments) == {"remote_url", "remote_retry_attempts"}
    assert "remote_url" not in local.parameters

    remote = plan(use_remote_policy="1", model="openvla/openvla-7b", quantization="8bit")
    assert set(remote.ignored_arguments) == {"model", "quantization"}
    assert "model" not in remote.parameters and "quantization" not in remote.parameters


def test_params_file_argument_replaces_the_default_file(tmp_path):
    custom = write_params(
        tmp_path,
        "remote_policy_node:\n  ros__parameters:\n"
        "    remote_url: http://10.0.0.7:5000\n    remote_timeout_sec: 3\n",
    )
    result = plan(use_remote_policy="true", params_file=str(custom))
    # Only what the file holds: the node declares the rest with its own defaults.
    assert result.parameters == {"remote_url": "http://10.0.0.7:5000", "remote_timeout_sec": 3.0}
    assert type(result.parameters["remote_timeout_sec"]) is float
    assert result.params_file == str(custom)


def test_wildcard_section_applies_and_the_node_section_wins(tmp_path):
    custom = write_params(
        tmp_path,
        "/**:\n  ros__parameters:\n    use_sim_time: true\n    inference_rate: 2.0\n"
        "    some_other_nodes_parameter: 7\n"
        "/policy_node:\n  ros__parameters:\n    inference_rate: 4.0\n",
    )
    result = plan(params_file=str(custom))
    assert result.parameters == {"use_sim_time": True, "inference_rate": 4.0}


def test_launch_arguments_override_a_custom_params_file(tmp_path):
    custom = write_params(tmp_path, "policy_node:\n  ros__parameters:\n    backend: openvla\n")
    result = plan(params_file=str(custom), backend="stub")
    assert result.parameters == {"backend": "stub"}
    # The file goes to the node as it is, the argument after it (the later one wins in rcl).
    assert result.launch_parameters() == [str(custom), {"backend": "stub"}]


def test_without_arguments_the_node_gets_the_params_file_alone():
    assert plan().launch_parameters() == [str(PARAMS_FILE)]
    assert plan().overrides == {}


# ------------------------------------------------- namespaces and sections


@pytest.mark.parametrize(
    ("section", "namespace", "applies"),
    [
        ("policy_node", "", True),
        ("/policy_node", "", True),
        ("policy_node", "/robot1", False),
        ("/robot1/policy_node", "/robot1", True),
        ("robot1/policy_node", "/robot1", True),
        ("/robot1/policy_node", "", False),
        ("/robot2/policy_node", "/robot1", False),
        ("/**/policy_node", "", True),
        ("/**/policy_node", "/robot1", True),
        ("/**/policy_node", "/fleet/robot1", True),
        ("/*/policy_node", "/robot1", True),
        ("/*/policy_node", "", False),
        ("/*/policy_node", "/fleet/robot1", False),
        ("/**", "/fleet/robot1", True),
        ("/**/remote_policy_node", "/robot1", False),
    ],
)
def test_sections_apply_as_rcl_applies_them(section, namespace, applies, tmp_path):
    node_fqn = launch_logic.fully_qualified_name(namespace, LOCAL_NODE)
    assert launch_logic.section_applies(section, node_fqn) is applies
    # And real rcl agrees: the node gets the section's parameter exactly when it applies.
    rclpy = pytest.importorskip("rclpy")
    params = write_params(tmp_path, f"{section}:\n  ros__parameters:\n    probe: 1.0\n")
    context = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(params)], context=context)
    try:
        node = rclpy.create_node(
            LOCAL_NODE,
            namespace=namespace or None,
            context=context,
            automatically_declare_parameters_from_overrides=True,
        )
        assert node.has_parameter("probe") is applies
        node.destroy_node()
    finally:
        context.try_shutdown()


def test_a_namespaced_section_gives_the_node_in_that_namespace_its_values(tmp_path):
    custom = write_params(
        tmp_path,
        "/robot1/policy_node:\n  ros__parameters:\n    inference_rate: 2.0\n"
        "/robot2/policy_node:\n  ros__parameters:\n    inference_rate: 3.0\n",
    )
    robot1 = plan(params_file=str(custom), namespace="robot1")
    assert robot1.parameters == {"inference_rate": 2.0}
    assert robot1.namespace == "/robot1" and robot1.fully_qualified_name == "/robot1/policy_node"
    assert robot1.warnings == ()
    assert plan(params_file=str(custom), namespace="/robot2/").parameters == {
        "inference_rate": 3.0
    }


def test_a_namespace_pushed_by_an_including_launch_file_counts(tmp_path):
    custom = write_params(
        tmp_path, "/fleet/robot1/policy_node:\n  ros__parameters:\n    inference_rate: 2.0\n"
    )
    result = plan_policy_node(
        {"params_file": str(custom), "namespace": "robot1"}, outer_namespace="/fleet"
    )
    assert result.parameters == {"inference_rate": 2.0}
    assert result.namespace == "/robot1"  # launch_ros itself puts /fleet before it
    assert result.fully_qualified_name == "/fleet/robot1/policy_node"


def test_a_file_with_no_section_for_the_node_is_reported(tmp_path):
    custom = write_params(
        tmp_path, "/robot1/policy_node:\n  ros__parameters:\n    inference_rate: 2.0\n"
    )
    result = plan(params_file=str(custom))
    assert result.parameters == {}
    (warning,) = result.warnings
    assert "no section for /policy_node" in warning and "built-in defaults" in warning
    assert plan().warnings == ()


def test_later_sections_win_as_in_rcl(tmp_path):
    custom = write_params(
        tmp_path,
        "/robot1/policy_node:\n  ros__parameters:\n    inference_rate: 8.0\n"
        "/**:\n  ros__parameters:\n    inference_rate: 7.0\n",
    )
    assert plan(params_file=str(custom), namespace="robot1").parameters == {"inference_rate": 7.0}


def test_values_in_a_section_for_another_node_are_not_judged(tmp_path):
    custom = write_params(
        tmp_path,
        "/robot2/policy_node:\n  ros__parameters:\n    not_a_parameter: 1\n"
        "/**/policy_node:\n  ros__parameters:\n    backend: stub\n",
    )
    assert plan(params_file=str(custom), namespace="robot1").parameters == {"backend": "stub"}


@pytest.mark.parametrize("text", ["robot 1", "1robot", "robot1/-x", "a//b?"])
def test_bad_namespaces_are_refused(text):
    with pytest.raises(LaunchArgumentError, match="namespace"):
        plan(namespace=text)


# ------------------------------------------------------------ refused values


@pytest.mark.parametrize(
    ("argument", "text", "reason"),
    [
        ("use_remote_policy", "maybe", "true/false"),
        ("use_remote_policy", "2", "true/false"),
        ("remote_url", "ftp://gpu-host:5000", "http:// or https://"),
        ("remote_url", "gpu-host:5000", "http:// or https://"),
        ("remote_url", "http://", "no host"),
        ("remote_url", "http://:5000", "no host"),
        ("remote_url", "http://gpu-host:99999", "not a valid URL"),
        ("remote_url", "http://gpu-host:abc", "not a valid URL"),
        ("remote_timeout_sec", "0", "> 0"),
        ("remote_timeout_sec", "-1.5", "> 0"),
        ("remote_timeout_sec", "1e9", "at most"),
        ("remote_timeout_sec", "fast", "a number"),
        ("remote_timeout_sec", "nan", "finite"),
        ("remote_timeout_sec", "inf", "finite"),
        ("remote_retry_attempts", "-1", "between 0 and"),
        ("remote_retry_attempts", "1.5", "whole number"),
        ("remote_retry_attempts", "three", "whole number"),
        ("remote_max_in_flight", "0", "between 1 and 4"),
        ("remote_max_in_flight", "5", "between 1 and 4"),
        ("remote_fallback_on_failure", "sometimes", "true/false"),
        ("camera_topic", "camera image", "topic name"),
        ("joint_states_topic", "joint states", "topic name"),
        ("image_transport", "jpeg", "raw, compressed"),
        ("inference_rate", "0", "> 0"),
        ("use_observation", "perhaps", "true/false"),
        ("observation_topic", "/manipulation/my observation", "topic name"),
        ("observation_timeout_sec", "0", "> 0"),
        ("observation_timeout_sec", "soon", "a number"),
        ("instruction_topic", "task prompt", "topic name"),
        ("backend", "gpt", "openvla"),
        ("device", "gpu", "cuda"),
        ("quantization", "16bit", "8bit"),
        ("chunk_merge", "average", "temporal_ensemble"),
        ("refill_horizon_sec", "-2", ">= -1"),
        ("refill_horizon_sec", "soon", "a number"),
    ],
)
@pytest.mark.parametrize("mode", ["true", "false"])
def test_bad_values_are_refused_naming_the_argument_and_value(argument, text, reason, mode):
    # Checked in both modes: a typo in an argument the chosen node ignores is still a typo.
    arguments = {"use_remote_policy": mode, argument: text}
    with pytest.raises(LaunchArgumentError) as caught:
        plan(**arguments)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert caught.value.argument == argument
    assert f"{argument}:={text!r}" in message
    assert reason in message


def test_unknown_launch_argument_is_refused():
    with pytest.raises(LaunchArgumentError, match="remote_uri"):
        plan(remote_uri="http://gpu:5000")


def test_missing_params_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ParamsFileError, match="params_file .*nope.yaml.*cannot be read"):
        plan(params_file=str(missing))


def test_no_params_file_at_all_is_refused():
    with pytest.raises(LaunchArgumentError, match="params_file"):
        plan_policy_node({})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("policy_node: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "top level"),
        ("policy_node:\n  inference_rate: 5.0\n", "no ros__parameters"),
        ("policy_node:\n  ros__parameters:\n    inference_rte: 5.0\n", "'inference_rte'"),
        ("policy_node:\n  ros__parameters:\n    remote_url: http://x:5000\n", "'remote_url'"),
        ("policy_node:\n  ros__parameters:\n    camera:\n      topic: /c\n", "'camera.topic'"),
        ("policy_node:\n  ros__parameters:\n    inference_rate: fast\n", "inference_rate"),
        ("policy_node:\n  ros__parameters:\n    inference_rate: .nan\n", "finite"),
        ("policy_node:\n  ros__parameters:\n    inference_rate: -1.0\n", "> 0"),
        ("policy_node:\n  ros__parameters:\n    inference_rate: true\n", "float"),
        ("policy_node:\n  ros__parameters:\n    quantization: 8\n", "str"),
        ("/**:\n  ros__parameters:\n    device: tpu\n", "device"),
    ],
)
def test_bad_params_files_are_refused_with_the_reason(tmp_path, text, reason):
    custom = write_params(tmp_path, text)
    with pytest.raises(ParamsFileError) as caught:
        plan(params_file=str(custom))
    assert isinstance(caught.value, ValueError)
    assert str(custom) in str(caught.value)
    assert reason in str(caught.value)


def test_bad_remote_values_in_a_params_file_are_refused(tmp_path):
    custom = write_params(
        tmp_path,
        "remote_policy_node:\n  ros__parameters:\n    remote_retry_attempts: 2.0\n",
    )
    with pytest.raises(ParamsFileError, match=r"remote_retry_attempts .*int.*2\.0"):
        plan(use_remote_policy="true", params_file=str(custom))


def test_a_params_file_cannot_hold_the_api_key_and_the_refusal_does_not_show_it(tmp_path):
    custom = write_params(
        tmp_path,
        "remote_policy_node:\n  ros__parameters:\n    remote_api_key: s3cret-token\n",
    )
    with pytest.raises(launch_logic.ParamsFileError) as refused:
        plan(use_remote_policy="true", params_file=str(custom))
    assert "remote_api_key_file" in str(refused.value)
    assert "s3cret-token" not in str(refused.value)


# ------------------------------------------------- the shipped params file


def test_the_yaml_names_only_parameters_the_nodes_have_and_all_of_them():
    document = yaml.safe_load(PARAMS_FILE.read_text())
    # Sections that apply in any namespace, so a namespaced robot gets them too.
    assert set(document) == {f"/**/{LOCAL_NODE}", f"/**/{REMOTE_NODE}"}
    for node, specs in NODE_PARAMETERS.items():
        in_yaml = set(document[f"/**/{node}"]["ros__parameters"])
        # Empty arrays are examples in comments: rcl reads a YAML [] as not set.
        commented = {name for name, spec in specs.items()
                     if spec.item_type is not None and not spec.default}
        assert in_yaml == set(specs) - {"use_sim_time"} - commented, node
        assert all(f"# {name}: [" in PARAMS_FILE.read_text() for name in commented)


def test_the_yaml_defaults_are_the_shared_names_defaults():
    assert launch_logic.node_parameters_from_file(PARAMS_FILE, LOCAL_NODE).parameters == {
        **SHARED_DEFAULTS,
        **LOCAL_DEFAULTS,
    }
    assert launch_logic.node_parameters_from_file(PARAMS_FILE, REMOTE_NODE).parameters == {
        **SHARED_DEFAULTS,
        **REMOTE_DEFAULTS,
    }


def test_the_yaml_defaults_are_the_defaults_the_nodes_declare():
    for node, specs in NODE_PARAMETERS.items():
        # Empty arrays are left out (rcl reads a YAML [] as not set).
        declared = {
            name: spec.default for name, spec in specs.items()
            if spec.item_type is None or spec.default
        }
        from_file = launch_logic.node_parameters_from_file(PARAMS_FILE, node)
        assert from_file.parameters == declared, node


def test_the_installed_params_file_is_the_one_in_the_repo():
    packages = pytest.importorskip("ament_index_python.packages")
    try:
        share = Path(packages.get_package_share_directory("manipulation_bringup"))
    except packages.PackageNotFoundError:
        pytest.skip("workspace not built (make build)")
    installed = share / "config" / "policy_params.yaml"
    assert installed.read_text() == PARAMS_FILE.read_text()
    assert (share / "launch" / "core_launch.py").read_text() == LAUNCH_FILE.read_text()


# --------------------------------------------------------- launch arguments


def test_launch_arguments_cover_the_issue_and_map_to_parameters():
    names = set(launch_logic.LAUNCH_ARGUMENT_NAMES)
    assert {
        "use_remote_policy",
        "remote_url",
        "remote_timeout_sec",
        "remote_retry_attempts",
        "remote_fallback_on_failure",
        "camera_topic",
        "joint_states_topic",
        "instruction",
        "params_file",
        "backend",
        "model",
        "unnorm_key",
        "device",
        "quantization",
        "lora_adapter",
    } <= names
    every_parameter = set(NODE_PARAMETERS[LOCAL_NODE]) | set(NODE_PARAMETERS[REMOTE_NODE])
    assert names - {"use_remote_policy", "params_file", "namespace"} <= every_parameter
    defaults = {a.name: a.default for a in launch_logic.LAUNCH_ARGUMENTS}
    assert defaults.pop("use_remote_policy") == "false"
    # Everything else defers to the params file.
    assert set(defaults.values()) == {""}
    assert all(a.description for a in launch_logic.LAUNCH_ARGUMENTS)


def test_launch_file_parses_and_delegates_to_launch_logic():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert {
        "launch.LaunchDescription",
        "launch.actions.DeclareLaunchArgument",
        "launch.actions.OpaqueFunction",
        "launch.substitutions.LaunchConfiguration",
        "launch_ros.actions.Node",
        "ament_index_python.packages.get_package_share_directory",
        "manipulation_bringup.launch_logic",
    } <= imported
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert "plan_policy_node" in calls


# ------------------------------------------------------------------ the safety guard


def test_guard_limits_are_launch_arguments_in_both_modes():
    for mode in ("false", "true"):
        result = plan(use_remote_policy=mode, workspace_min="[-0.5, -0.8, 0]",
                      workspace_max="1.0,0.8,1.2", min_confidence="0.2")
        assert result.overrides["workspace_min"] == (-0.5, -0.8, 0.0)
        assert result.overrides["min_confidence"] == 0.2
        # launch_ros takes arrays as lists.
        assert result.launch_parameters()[1]["workspace_max"] == [1.0, 0.8, 1.2]


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"workspace_min": "0,0,2"}, "workspace_min[2]=2 must be below workspace_max[2]=1.5"),
        ({"workspace_max": "1,1"}, "must hold 3 numbers"),
        ({"workspace_max": "1,x,1"}, "expected a number"),
        ({"max_eef_step_rad": "4"}, "at most 3.14159"),
        ({"min_confidence": "-0.1"}, "must be a finite number >= 0"),
    ],
)
def test_guard_launch_arguments_are_checked_alone_and_together(arguments, words):
    with pytest.raises(LaunchArgumentError) as caught:
        plan(**arguments)
    assert words in str(caught.value)


def test_guard_limits_in_a_params_file_must_agree(tmp_path):
    path = write_params(tmp_path, (
        "/**/policy_node:\n  ros__parameters:\n    joint_limit_names: [elbow]\n"
        "    joint_max_deltas: [0.1, 0.2]\n"
    ))
    with pytest.raises(ParamsFileError, match="joint_max_deltas must be empty or hold one"):
        plan(params_file=str(path))
    path = write_params(tmp_path, (
        "/**/policy_node:\n  ros__parameters:\n    joint_limit_names: [elbow]\n"
        "    joint_max_deltas: [0.1]\n"
    ))
    assert plan(params_file=str(path)).parameters["joint_max_deltas"] == (0.1,)


def test_cameras_and_state_in_a_params_file_are_checked_alone_and_together(tmp_path):
    section = "/**/remote_policy_node:\n  ros__parameters:\n"
    path = write_params(tmp_path, section + (
        "    camera_topics: [/wrist/image_raw, /front/image_raw/compressed]\n"
        "    camera_names: [wrist]\n"
    ))
    with pytest.raises(ParamsFileError, match="camera_names must name each of camera_topics"):
        plan(params_file=str(path), use_remote_policy="true")
    path = write_params(tmp_path, section + (
        "    camera_topics: [/wrist/image_raw]\n    camera_names: [wrist cam]\n"
    ))
    with pytest.raises(ParamsFileError, match="'wrist cam' is not a camera name"):
        plan(params_file=str(path), use_remote_policy="true")
    path = write_params(tmp_path, section + (
        "    camera_topics: [/wrist/image_raw, /front/image_raw/compressed]\n"
        "    camera_names: [wrist, front]\n    state_joints: [shoulder, elbow]\n"
        "    state_eef_pose: true\n"
    ))
    parameters = plan(params_file=str(path), use_remote_policy="true").parameters
    assert parameters["camera_names"] == ("wrist", "front")
    assert parameters["state_joints"] == ("shoulder", "elbow")
    assert parameters["state_eef_pose"] is True
