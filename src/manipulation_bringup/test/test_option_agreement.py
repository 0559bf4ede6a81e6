"""Each backend option is declared once, by its backend (OpenVLA's:
manipulation_policy.backends.openvla_options, LeRobot's: lerobot_options, both
sharing model_options' model, device and dtype), and every exposure is derived from that
declaration: the policy server's flag and OPENVLA_* variables, the policy node's
parameter (its descriptor's range), the launch argument, the params-file check and the
backend's argument. These tests prove each derivation reads the declaration: same
default, same good values, same refusals. The shipped params YAML is checked against
it. (A plugin backend's options: test_backend_declarations.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from manipulation_bringup import launch_logic
from manipulation_policy import policy_server
from manipulation_policy.backends import (
    lerobot_options,
    model_options,
    openvla_options,
    registered_options,
)
from manipulation_policy.core import api_key, contract, options
from manipulation_policy.core.options import Bounds, Option
from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    POLICY_NODE_PARAMETERS,
    parameter_backend_arguments,
    specs_by_name,
)
from manipulation_policy.server import auth as server_auth

# Every registered backend's options, each once (the node's and the server's set).
OPTIONS = registered_options()
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}
PARAMS_FILE = Path(__file__).resolve().parents[1] / "config" / "policy_params.yaml"
NODE_SPECS = specs_by_name(POLICY_NODE_PARAMETERS)
LAUNCH_ARGUMENTS = {argument.name: argument for argument in launch_logic.LAUNCH_ARGUMENTS}
LAUNCH_SPECS = launch_logic.NODE_PARAMETERS[launch_logic.LOCAL_NODE]

# name -> (text, typed value) of a good value other than the default.
GOOD = {
    "model": ("/models/finetuned", "/models/finetuned"),
    "unnorm_key": ("bridge_orig", "bridge_orig"),
    "device": ("cuda:1", "cuda:1"),
    "dtype": ("BF16", "BF16"),
    "quantization": ("8bit", "8bit"),
    "lora_adapter": ("/adapters/pick", "/adapters/pick"),
    "attn_implementation": ("sdpa", "sdpa"),
    "gripper_convention": ("close_is_one", "close_is_one"),
    "position_scale": ("2.5", 2.5),
    "rotation_scale": ("0.5", 0.5),
    "max_position_step": ("0.05", 0.05),
    "max_rotation_step": ("0.2", 0.2),
    "clip_actions": ("true", True),
    "position_bounds": ("-0.1, 0.1", (-0.1, 0.1)),
    "rotation_bounds": ("-0.35,0.35", (-0.35, 0.35)),
    "gripper_bounds": ("-0.5,0.9", (-0.5, 0.9)),
    "action_layout": ("joint_position:a, gripper", "joint_position:a, gripper"),
    "gripper_closed": ("100", 100.0),
    "gripper_open": ("-2.5", -2.5),
    "fps": ("30", 30.0),
    "seed": ("42", "42"),
}
# name -> texts every form refuses.
BAD = {
    "model": ["", "   ", "x" * 1025],
    "unnorm_key": ["k" * 257],
    "device": ["mps", "gpu0", "cuda:x", ""],
    "dtype": ["int8", ""],
    "quantization": ["3bit"],
    "lora_adapter": ["a" * 1025],
    "attn_implementation": ["xformers", ""],
    "gripper_convention": ["sideways"],
    "position_scale": ["0", "-1", "nan", "inf", "101", "fast", ""],
    "rotation_scale": ["0", "-0.5", "1e9"],
    "max_position_step": ["-0.1", "inf", "1001", "far"],
    "max_rotation_step": ["-1", "nan"],
    "clip_actions": ["maybe", "2"],
    "position_bounds": ["1,-1", "0,nan", "1", "a,b", "-1,0,1"],
    "rotation_bounds": ["-inf,1", "3,2"],
    "gripper_bounds": ["0;1", "1,0"],
    "action_layout": ["wheel:left", "gripper,gripper", "joint_position:a,joint_delta:b"],
    "gripper_closed": ["nan", "open", "1e7"],
    "gripper_open": ["-inf", ""],
    "fps": ["-1", "1001", "nan"],
    "seed": ["-1", "4294967296", "1.5", "seven"],
}


def test_the_tables_cover_every_option():
    assert set(GOOD) == set(BAD) == set(OPTIONS_BY_NAME)
    # The stub declares none: the registered options are OpenVLA's, then LeRobot's own
    # (model, device and dtype are the same objects in both).
    shared = (model_options.MODEL, model_options.DEVICE, model_options.DTYPE)
    lerobot_own = tuple(o for o in lerobot_options.OPTIONS if o not in shared)
    assert registered_options() == openvla_options.OPTIONS + lerobot_own
    for option in shared:
        assert option in openvla_options.OPTIONS and option in lerobot_options.OPTIONS


def _parameter_form(option, text):
    """What a params file or `ros2 param set` gives the node for ``text``."""
    try:
        if option.kind is float:
            return float(text)
        if option.kind is bool:
            return options.parse_bool(text)
    except ValueError:
        return text  # a string for a double or bool parameter: refused by its type
    return text


# LeRobot's own options are its backend's: the server reads their variables, and the
# node hands them over, when that backend is chosen.
LEROBOT_ONLY = {o.name for o in lerobot_options.OPTIONS} - {o.name for o in openvla_options.OPTIONS}


def _backend(name: str) -> str:
    return "lerobot" if name in LEROBOT_ONLY else "openvla"


def _server_parse(argv, backend="openvla"):
    return policy_server.build_parser().parse_args(["--backend", backend, *argv])


# ------------------------------------------------------------------ defaults


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_one_default_everywhere(option):
    spec = NODE_SPECS[option.name]
    assert spec.default == option.parameter_default
    assert spec.description == option.help and spec.live is option.live is False
    assert spec.problem(spec.default) is None
    # A number option's range is the node's: `ros2 param describe` shows it.
    if option.kind is float:
        assert isinstance(option.check, options.NumberRange)
        assert spec.number_range is option.check
    # The server passes on only what was set; the backend's default is the definition's.
    args = _server_parse([], _backend(option.name))
    assert getattr(args, option.name, None) is None
    assert policy_server.backend_arguments(args, {}) == {}
    assert options.resolve(OPTIONS, {})[option.name] == option.resolve(option.default)
    node_defaults = {n: s.default for n, s in NODE_SPECS.items()}
    node_defaults["backend"] = _backend(option.name)
    assert parameter_backend_arguments(node_defaults)[option.name] == (
        option.resolve(option.default))
    actions = policy_server.build_parser()._actions
    action = next(a for a in actions if option.flag in a.option_strings)
    assert repr(option.parameter_default) in action.help
    assert all(name in action.help for name in option.env)


def test_the_yaml_holds_every_node_option_with_its_default():
    section = yaml.safe_load(PARAMS_FILE.read_text())["/**/policy_node"]["ros__parameters"]
    for option in OPTIONS:
        assert option.node_parameter, option.name
        assert section[option.name] == option.parameter_default, option.name
    assert "mps" not in PARAMS_FILE.read_text()


def test_launch_arguments_are_the_declared_options_with_their_help():
    for option in OPTIONS:
        argument = LAUNCH_ARGUMENTS.get(option.name)
        assert (argument is not None) is option.launch_argument, option.name
        if argument is not None:
            assert argument.description.startswith(option.help) and argument.default == ""
    # The safety caps can be set from the command line.
    assert {"max_position_step", "max_rotation_step", "device", "model"} <= set(LAUNCH_ARGUMENTS)


def test_the_backend_declares_the_options_the_registry_lists():
    openvla = pytest.importorskip("manipulation_policy.backends.openvla")
    assert openvla.OpenVLABackend.OPTIONS is openvla_options.OPTIONS
    # Its resolution tables speak the same vocabulary.
    assert set(openvla.DTYPE_NAMES) | {"auto"} == set(openvla_options.DTYPES)
    assert set(openvla.QUANTIZATION_CHOICES) | {"none"} == set(openvla_options.QUANTIZATIONS)
    assert set(openvla.ATTN_IMPLEMENTATIONS) | {"auto"} == set(
        openvla_options.ATTN_IMPLEMENTATIONS)


# ---------------------------------------------------------------- good values


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_a_good_value_means_the_same_everywhere(option):
    text, typed = GOOD[option.name]
    # Server flag.
    backend = _backend(option.name)
    assert policy_server.backend_arguments(_server_parse([option.flag, text], backend), {}) == {
        option.name: typed}
    # Each environment variable, upstream's names included.
    for env_name in option.env:
        args = _server_parse([], _backend(option.name))
        assert policy_server.backend_arguments(args, {env_name: text}) == {option.name: typed}
    # Node parameter, then what the node hands the backend.
    value = _parameter_form(option, text)
    assert NODE_SPECS[option.name].problem(value) is None
    defaults = {n: s.default for n, s in NODE_SPECS.items()}
    defaults["backend"] = _backend(option.name)
    assert parameter_backend_arguments({**defaults, option.name: value})[option.name] == typed
    # Launch argument.
    if option.launch_argument:
        spec = LAUNCH_SPECS[option.name]
        assert launch_logic.parse_argument(spec, text) == value
    # Backend argument, typed or as text.
    assert options.resolve(OPTIONS, {option.name: typed})[option.name] == typed


# ----------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("option", "text"),
    [(OPTIONS_BY_NAME[name], text) for name, texts in BAD.items() for text in texts],
    ids=lambda v: v.name if isinstance(v, Option) else repr(v)[:12],
)
def test_a_bad_value_is_refused_everywhere_in_the_same_words(option, text, capsys):
    reason = option.problem(text if option.kind is not float else _parameter_form(option, text))
    assert reason is not None
    # Server flag: the real argparse parser, one line naming the flag, before any loading.
    with pytest.raises(SystemExit) as exited:
        _server_parse([option.flag, text], _backend(option.name))
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert option.flag in line and line.startswith("policy_server: error: argument")
    # Environment variables (an empty one counts as not set).
    if text.strip():
        for env_name in option.env:
            with pytest.raises(policy_server.StartupError, match=env_name):
                policy_server.backend_arguments(
                    _server_parse([], _backend(option.name)), {env_name: text})
    # Node parameter (`ros2 param set` and the params file).
    value = _parameter_form(option, text)
    refused = NODE_SPECS[option.name].problem(value)
    assert refused is not None
    if isinstance(value, type(NODE_SPECS[option.name].default)):
        assert refused == reason  # the same words as the definition's check
    # Launch argument.
    if option.launch_argument:
        with pytest.raises(launch_logic.LaunchArgumentError, match=option.name):
            launch_logic.plan_policy_node(
                {option.name: text}, default_params_file=PARAMS_FILE
            ) if text.strip() else launch_logic.parse_argument(
                LAUNCH_SPECS[option.name], text)
    # Backend argument: the same check, before anything is loaded.
    with pytest.raises(ValueError, match=f"^{option.name} "):
        options.resolve(OPTIONS, {option.name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("position_scale", 0), ("rotation_scale", 0.0), ("device", "mps"),
     ("max_position_step", -0.1), ("position_bounds", (1.0, -1.0)), ("clip_actions", "maybe"),
     ("model", "")],
)
def test_the_openvla_backend_itself_refuses_before_loading(name, value):
    openvla = pytest.importorskip("manipulation_policy.backends.openvla")
    from manipulation_policy.core.errors import BackendStartupError

    # No such checkpoint: a refusal naming the option proves the check ran first.
    with pytest.raises(BackendStartupError, match=f"^{name} "):
        openvla.OpenVLABackend(**{"model": "/nonexistent/checkpoint", name: value})


# --------------------------------------------------------- the shared rules


def test_unset_is_one_rule():
    for text in ("", "  ", "none", "None", " NONE "):
        assert options.is_unset(text)
    assert options.is_unset(None) and not options.is_unset("nonex")
    unset_ok = {o.name for o in OPTIONS if o.unset_ok}
    assert unset_ok == {"unnorm_key", "lora_adapter", "quantization",
                        "max_position_step", "max_rotation_step", "action_layout", "fps",
                        "seed"}
    for name in unset_ok:
        option = OPTIONS_BY_NAME[name]
        assert option.parse("none") is None and option.parse("") is None
        backend = _backend(name)
        assert policy_server.backend_arguments(
            _server_parse([option.flag, "None"], backend), {}) == {}
        assert policy_server.backend_arguments(
            _server_parse([], backend), {option.env[0]: "none"}) == {}


def test_zero_step_cap_is_no_cap_and_zero_scale_is_refused():
    assert OPTIONS_BY_NAME["max_position_step"].resolve(0.0) == 0.0
    assert OPTIONS_BY_NAME["position_scale"].problem(0.0) is not None
    # The per-request gain has the same range as the server's own scale.
    assert OPTIONS_BY_NAME["position_scale"].check == options.NumberRange(
        0.0, contract.MAX_REQUEST_SCALE, low_open=True)
    assert options.scale(contract.MAX_REQUEST_SCALE) is None
    assert options.scale(math.nextafter(contract.MAX_REQUEST_SCALE, math.inf)) is not None


def test_bounds_are_written_lower_comma_upper_everywhere():
    for option in OPTIONS:
        if option.kind is Bounds:
            assert option.parse(option.parameter_default) == option.resolve(option.default)


def test_the_instruction_limit_and_the_api_key_variable_are_defined_once():
    instruction = specs_by_name(COMMON_PARAMETERS)["instruction"]
    limit = contract.MAX_INSTRUCTION_CHARS
    assert instruction.problem("x" * limit) is None
    assert f"at most {limit}" in instruction.problem("x" * (limit + 1))
    with pytest.raises(ValueError):
        contract.parse_request({"instruction": "x" * (limit + 1)})
    # Server and robot read the key through one reader: the same variable, the same rules.
    environ = {api_key.API_KEY_ENV: "s3cret"}
    assert server_auth.load_api_key(None, environ) == "s3cret"
    assert api_key.read_api_key("", environ) == "s3cret"
    for bad in ("two words", "clé"):
        with pytest.raises(api_key.ApiKeyUnusable):
            server_auth.load_api_key(None, {api_key.API_KEY_ENV: bad})


# ------------------------------------------------ a plugin backend's own option

PLUGIN_SOURCE = '''
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.options import NumberRange, Option


class GripperForceBackend(StubBackend):
    OPTIONS = (
        Option("grip_force", float, 5.0, "Grip force, N.",
               NumberRange(0.0, 40.0, low_open=True), launch_argument=True),
    )
'''


def test_a_plugins_option_is_a_launch_argument_and_a_params_file_entry(tmp_path, monkeypatch):
    module = f"launch_grip_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = f"{module}:GripperForceBackend"
    [argument] = [a for a in launch_logic.launch_arguments(plugin) if a.name == "grip_force"]
    assert argument.description.startswith("Grip force, N.")
    assert "grip_force" not in LAUNCH_ARGUMENTS  # only with that backend
    plan = launch_logic.plan_policy_node(
        {"backend": plugin, "grip_force": "12"}, default_params_file=PARAMS_FILE)
    assert plan.overrides == {"backend": plugin, "grip_force": 12.0}
    with pytest.raises(launch_logic.LaunchArgumentError, match="grip_force"):
        launch_logic.plan_policy_node(
            {"backend": plugin, "grip_force": "41"}, default_params_file=PARAMS_FILE)
    with pytest.raises(launch_logic.LaunchArgumentError, match="grip_force"):
        launch_logic.plan_policy_node({"grip_force": "12"}, default_params_file=PARAMS_FILE)
    # core_launch.py takes it from the command line (it is declared by no one).
    given = {"backend": plugin, "grip_force": "12", "model": "m", "other": "x"}
    assert launch_logic.plugin_arguments(plugin, given) == {"grip_force": "12"}
    # A params file naming the plugin may set its option.
    params = tmp_path / "params.yaml"
    params.write_text(
        f"/**/policy_node:\n  ros__parameters:\n    backend: {plugin}\n    grip_force: 7.5\n")
    view = launch_logic.node_parameters_from_file(params, launch_logic.LOCAL_NODE)
    assert view.parameters["grip_force"] == 7.5
    params.write_text(
        f"/**/policy_node:\n  ros__parameters:\n    backend: {plugin}\n    grip_force: 0.0\n")
    with pytest.raises(launch_logic.ParamsFileError, match="grip_force"):
        launch_logic.node_parameters_from_file(params, launch_logic.LOCAL_NODE)
