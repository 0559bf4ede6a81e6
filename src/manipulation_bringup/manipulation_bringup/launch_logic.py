"""The decisions behind launch/core_launch.py, in plain Python (no `launch` import).

The launch file hands over its argument strings; this module says which one of
the two policy nodes to start, in which namespace, and with which parameters:
the params file as it is (rcl applies its sections, namespaced and wildcard
ones too) and, on top, the launch arguments the user set. Both are checked
first with the nodes' own parameter specs, so a value the node would refuse
stops the launch with the same reason, before anything starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from manipulation_policy.backends import is_plugin, options_with
from manipulation_policy.robot.camera_inputs import camera_parameters_problem
from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    GUARD_PARAMETER_NAMES,
    REMOTE_NODE_PARAMETERS,
    ParameterSpec,
    guard_values_problem,
    policy_node_parameters,
    specs_by_name,
)

POLICY_PACKAGE = "manipulation_policy"
LOCAL_NODE = "policy_node"
REMOTE_NODE = "remote_policy_node"


class LaunchArgumentError(ValueError):
    """A launch argument has a value the stack cannot use."""

    def __init__(self, argument: str, value: Any, reason: str) -> None:
        super().__init__(f"launch argument {argument}:={value!r} is invalid: {reason}")
        self.argument = argument
        self.value = value
        self.reason = reason


class ParamsFileError(ValueError):
    """The params file is missing, not YAML, or holds a bad parameter."""

    def __init__(self, path: Union[str, Path], reason: str) -> None:
        super().__init__(f"params_file {str(path)!r}: {reason}")
        self.path = str(path)
        self.reason = reason


# --------------------------------------------------------------- parameters
# Names, types (those of the defaults) and checks are the nodes' own, from
# manipulation_policy.robot.node_parameters: what the launch file accepts is exactly
# what the node accepts.

# Parameters every ROS 2 node has, which a params file may set too.
STANDARD_PARAMETERS: dict[str, ParameterSpec] = {
    "use_sim_time": ParameterSpec("use_sim_time", False, "Use the /clock topic as time."),
}
# policy_node's include the options of the backends (of a plugin backend too:
# node_parameters_for), derived from their declarations.


def node_parameters_for(backend: str = "") -> dict[str, dict[str, ParameterSpec]]:
    """Each node's parameter specs; policy_node's with ``backend``'s options when it is
    a module.path:ClassName plugin."""
    return {
        LOCAL_NODE: specs_by_name(COMMON_PARAMETERS, policy_node_parameters(backend)),
        REMOTE_NODE: specs_by_name(COMMON_PARAMETERS, REMOTE_NODE_PARAMETERS),
    }


NODE_PARAMETERS = node_parameters_for()


# ---------------------------------------------------- parsing launch strings

_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})


def parse_bool(argument: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise LaunchArgumentError(argument, text, "expected true/false (or 1/0, yes/no)")


def parse_float(argument: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise LaunchArgumentError(argument, text, "expected a number") from None
    if not math.isfinite(value):
        raise LaunchArgumentError(argument, text, "expected a finite number")
    return value


def parse_int(argument: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise LaunchArgumentError(argument, text, "expected a whole number") from None


_PARSERS: dict[type, Callable[[str, str], Any]] = {
    bool: parse_bool,
    float: parse_float,
    int: parse_int,
    str: lambda _argument, text: text,
}


def parse_list(argument: str, text: str, item_type: type) -> list[Any]:
    """An array argument: ``[a, b, c]`` or ``a,b,c`` (items parsed as ``item_type``)."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = [item.strip() for item in body.split(",")] if body.strip() else []
    return [_PARSERS[item_type](argument, item) for item in items]


def parse_argument(spec: ParameterSpec, text: str) -> Any:
    """The typed, checked value of a launch-argument string for parameter ``spec``."""
    if spec.item_type is not None:
        value = parse_list(spec.name, text, spec.item_type)
    else:
        value = _PARSERS[type(spec.default)](spec.name, text)
    problem = spec.problem(value)
    if problem is not None:
        raise LaunchArgumentError(spec.name, text, problem)
    return spec.normalized(value)


# ------------------------------------------------------------ launch arguments


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    description: str
    default: str = ""  # "" = not set: the params file decides


_FIXED_ARGUMENTS = (
    LaunchArgument(
        "use_remote_policy",
        "true: start remote_policy_node (HTTP client of a policy server); "
        "false: start policy_node (model in-process)",
        "false",
    ),
    LaunchArgument(
        "params_file",
        "ROS 2 params file handed to the node as it is (sections /policy_node, "
        "/robot1/remote_policy_node, /**, ...; default: the installed config/policy_params.yaml)",
    ),
    LaunchArgument(
        "namespace",
        "ROS namespace of the node, e.g. robot1 (its params-file section is then "
        "/robot1/<node>; default: none)",
    ),
    LaunchArgument("remote_url", "policy server URL, e.g. http://gpu-host:5000 (remote mode)"),
    LaunchArgument("remote_timeout_sec", "HTTP timeout per attempt, seconds > 0 (remote mode)"),
    LaunchArgument("remote_retry_attempts", "retries after a failed request, >= 0 (remote mode)"),
    LaunchArgument(
        "remote_max_in_flight",
        "observations awaiting an answer at once, 1-4 (remote mode; 1: one at a time)",
    ),
    LaunchArgument(
        "remote_fallback_on_failure",
        "true: publish a safe hold output when the server fails (remote mode)",
    ),
    LaunchArgument("camera_topic", "sensor_msgs/Image topic of the camera"),
    LaunchArgument("image_transport", "raw or compressed (subscribes to camera_topic/compressed)"),
    LaunchArgument("joint_states_topic", "sensor_msgs/JointState topic"),
    LaunchArgument(
        "instruction_topic",
        "std_msgs/String task topic (upstream's task_prompt_cli publishes on "
        "/manipulation/task_prompt)",
    ),
    LaunchArgument(
        "use_observation",
        "true: use the aggregated manipulation_msgs/Observation of a perception node while "
        "it is fresh, else the raw topics; false: the raw topics only",
    ),
    LaunchArgument("observation_topic", "manipulation_msgs/Observation topic"),
    LaunchArgument(
        "observation_timeout_sec",
        "an aggregated observation older than this (seconds) is stale: the raw topics are used",
    ),
    LaunchArgument("instruction", "task text, e.g. 'pick up the red cup'"),
    LaunchArgument("inference_rate", "policy outputs per second, > 0"),
    LaunchArgument(
        "chunk_merge",
        "how overlapping action chunks meet: replace, temporal_ensemble or crossfade",
    ),
    LaunchArgument(
        "refill_horizon_sec",
        "send the next observation when the action timeline has this many seconds left "
        "(< 0: automatic, from the measured latency)",
    ),
    LaunchArgument(
        "dry_run",
        "true: everything runs but commands go to /manipulation/policy_output_preview "
        "(and chunks to /manipulation/policy_chunk_preview); the robot gets nothing",
    ),
    LaunchArgument(
        "autostart",
        "true: the node configures and activates itself; false: it waits unconfigured "
        "for `ros2 lifecycle set` or a lifecycle manager",
    ),
    LaunchArgument(
        "input_timeout_sec",
        "input watchdog: no camera frame or joint state for this many seconds means a hold",
    ),
    LaunchArgument("backend", "openvla, stub or module.path:ClassName (local mode)"),
    # The safety guard's limits (both modes); per-joint limits go in the params file.
    LaunchArgument("workspace_min",
                   "lower corner x,y,z (m, reference_frame) of the box absolute end-effector "
                   "targets are clamped into, e.g. '[-0.5, -0.8, 0.0]'"),
    LaunchArgument("workspace_max", "upper corner x,y,z (m) of the workspace box"),
    LaunchArgument("max_eef_step_m", "longest end-effector translation per step, m"),
    LaunchArgument("max_eef_step_rad", "largest end-effector rotation per step, rad"),
    LaunchArgument("max_joint_delta", "largest joint delta per step, rad (or m)"),
    LaunchArgument("max_gripper_rate",
                   "fastest gripper command change, full range per second (0: no limit)"),
    LaunchArgument("max_base_linear_speed", "fastest base velocity hint, m/s"),
    LaunchArgument("max_base_angular_speed", "fastest base turn hint, rad/s"),
    LaunchArgument("min_confidence", "actions with a lower confidence are refused (a hold)"),
)


def launch_arguments(backend: str = "") -> tuple[LaunchArgument, ...]:
    """The launch arguments: the fixed ones, then the backend options declared as launch
    arguments (the registered backends', and ``backend``'s when it is a plugin),
    described by their declarations."""
    return (
        *_FIXED_ARGUMENTS,
        *(
            LaunchArgument(option.name, f"{option.help} (local mode)")
            for option in options_with(backend)
            if option.launch_argument
        ),
    )


def plugin_arguments(backend: str, given: Mapping[str, str]) -> dict[str, str]:
    """The launch arguments in ``given`` that are options of ``backend``, a plugin's
    (none for a registered backend, or a plugin that cannot be imported:
    plan_policy_node says why)."""
    if not is_plugin(backend.strip()):
        return {}
    try:
        names = {argument.name for argument in launch_arguments(backend.strip())}
    except (ValueError, ImportError):
        return {}
    names -= set(LAUNCH_ARGUMENT_NAMES)
    return {name: text for name, text in given.items() if name in names}


LAUNCH_ARGUMENTS = launch_arguments()
LAUNCH_ARGUMENT_NAMES = tuple(argument.name for argument in LAUNCH_ARGUMENTS)
# Launch arguments that choose things rather than set one node parameter.
_CONTROL_ARGUMENTS = ("use_remote_policy", "params_file", "namespace")


# ------------------------------------------------------------- params file
# The file itself goes to the node (launch_ros passes it as --params-file, rcl
# applies it); it is read here only to check it first, with the rules rcl uses
# to pick the sections that apply to a node, so what is checked is what the
# node will get.

_NAME_TOKEN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _section_pattern(section: str) -> re.Pattern:
    """rcl's matching of a params-file section against a fully qualified node name.

    A section without a leading slash is rooted; ``*`` stands for one name
    token, ``**`` for any number of them (none included).
    """
    tokens = section.strip("/").split("/") if section.strip("/") else []
    pattern = ""
    for token in tokens:
        if token == "**":
            pattern += "(?:/[^/]+)*"
        elif token == "*":
            pattern += "/[^/]+"
        else:
            pattern += "/" + re.escape(token)
    return re.compile("^" + (pattern or "/") + "$")


def section_applies(section: str, node_fqn: str) -> bool:
    return _section_pattern(section).match(node_fqn) is not None


def fully_qualified_name(namespace: str, node: str) -> str:
    namespace = namespace.strip("/")
    return f"/{namespace}/{node}" if namespace else f"/{node}"


def join_namespaces(outer: str, inner: str) -> str:
    joined = "/".join(part.strip("/") for part in (outer, inner) if part.strip("/"))
    return "/" + joined if joined else ""


def check_namespace(text: str) -> str:
    """A launch-argument namespace ("", "robot1", "/fleet/robot1") in its rooted form."""
    stripped = text.strip().strip("/")
    if not stripped:
        return ""
    for token in stripped.split("/"):
        if not _NAME_TOKEN.match(token):
            raise LaunchArgumentError(
                "namespace",
                text,
                "each part must start with a letter or _ and hold only letters, digits and _",
            )
    return "/" + stripped


def _flatten(parameters: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """ROS params files may nest names: {a: {b: 1}} is the parameter a.b."""
    flat: dict[str, Any] = {}
    for key, value in parameters.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _file_value(path: Union[str, Path], spec: ParameterSpec, value: Any) -> Any:
    problem = spec.problem(value)
    if problem is None and isinstance(spec.default, float) and not math.isfinite(value):
        problem = f"must be a finite number, got {value!r}"
    if problem is not None:
        raise ParamsFileError(path, f"{spec.name} {problem}")
    return spec.normalized(value)


def read_params_file(path: Union[str, Path]) -> dict[str, dict[str, Any]]:
    """Section name -> its ros__parameters, flattened, in file order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ParamsFileError(path, "is not UTF-8 text") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsFileError(path, f"is not valid YAML ({exc})") from None
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ParamsFileError(path, "top level must map node names to ros__parameters")
    sections: dict[str, dict[str, Any]] = {}
    for section, body in document.items():
        parameters = body.get("ros__parameters") if isinstance(body, Mapping) else None
        if not isinstance(parameters, Mapping):
            raise ParamsFileError(path, f"section {section!r} has no ros__parameters mapping")
        sections[str(section)] = _flatten(parameters)
    return sections


def _is_wildcard(section: str) -> bool:
    return "*" in section


@dataclass(frozen=True)
class ParamsFileView:
    """What a params file gives one node, as rcl will apply it."""

    parameters: dict[str, Any]
    sections: tuple[str, ...]  # the sections that apply, in file order


def node_parameters_from_file(
    path: Union[str, Path], node: str, namespace: str = "", backend: str = ""
) -> ParamsFileView:
    """Check what the params file gives ``node`` (in ``namespace``) and return it.

    Sections apply in file order, a later one winning, as in rcl. A wildcard
    section may hold parameters of other nodes (not ours to judge); a section
    naming this node must name only parameters it has. policy_node's are those of
    ``backend`` (a launch argument), else of the backend the file names for it.
    """
    fqn = fully_qualified_name(namespace, node)
    sections = read_params_file(path)
    if node == LOCAL_NODE and not backend:
        named = [v.get("backend") for s, v in sections.items() if section_applies(s, fqn)]
        backend = next((b for b in reversed(named) if isinstance(b, str) and b), "")
    try:
        node_specs = node_parameters_for(backend)[node]
    except (ValueError, ImportError) as exc:  # a plugin backend that cannot be imported
        raise ParamsFileError(path, str(exc)) from None
    specs = {**STANDARD_PARAMETERS, **node_specs}
    parameters: dict[str, Any] = {}
    applied = []
    for section, values in sections.items():
        if not section_applies(section, fqn):
            continue
        applied.append(section)
        for name, value in values.items():
            if name not in specs:
                if _is_wildcard(section):
                    continue
                raise ParamsFileError(path, f"{node} has no parameter {name!r}")
            parameters[name] = _file_value(path, specs[name], value)
    return ParamsFileView(parameters, tuple(applied))


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class PolicyNodePlan:
    """The one node core_launch.py starts.

    The node gets ``params_file`` as it is, then ``overrides`` (the launch
    arguments that were set) on top: ``launch_parameters()`` is what goes to
    launch_ros's Node(parameters=...).
    """

    package: str
    executable: str
    name: str
    namespace: str  # the namespace argument; launch_ros puts a pushed namespace before it
    params_file: str
    overrides: dict[str, Any]
    # What the params file gives this node (checked), for the summary and tests.
    file_parameters: dict[str, Any] = field(default_factory=dict)
    # Set launch arguments that the chosen node has no use for (e.g. remote_url in local mode).
    ignored_arguments: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    outer_namespace: str = ""  # pushed by an including launch file (PushRosNamespace)

    @property
    def fully_qualified_name(self) -> str:
        namespace = join_namespaces(self.outer_namespace, self.namespace)
        return fully_qualified_name(namespace, self.name)

    @property
    def parameters(self) -> dict[str, Any]:
        """The values the node starts with, where the file or an argument sets one."""
        return {**self.file_parameters, **self.overrides}

    def launch_parameters(self) -> list[Any]:
        # launch_ros takes arrays as lists.
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
        return [self.params_file, overrides] if overrides else [self.params_file]

    def summary(self) -> str:
        parameters = self.parameters
        if self.name == REMOTE_NODE:
            shown: tuple[str, ...] = ("remote_url",)
        elif parameters.get("backend") == "stub":
            shown = ("backend",)  # no model to name
        else:
            shown = ("backend", "model", "device")
        details = ", ".join(f"{key}={parameters[key]}" for key in shown if key in parameters)
        return (
            f"starting {self.fully_qualified_name} ({details}) "
            f"with parameters from {self.params_file}"
        )


def _check_guard_limits(
    specs: Mapping[str, ParameterSpec],
    file_parameters: Mapping[str, Any],
    overrides: Mapping[str, Any],
    given: Mapping[str, str],
    params_file: Union[str, Path],
) -> None:
    """The safety guard's limits must agree with each other (workspace_min below
    workspace_max, per-joint arrays as long as joint_limit_names) as the node will
    get them: defaults, then the file, then the launch arguments."""
    values = {name: spec.default for name, spec in specs.items()}
    problem = guard_values_problem({**values, **file_parameters, **overrides})
    if problem is None:
        return
    named = [name for name in overrides if name in GUARD_PARAMETER_NAMES]
    if named:
        raise LaunchArgumentError(named[0], given[named[0]], problem)
    raise ParamsFileError(params_file, problem)


def _check_cameras(
    specs: Mapping[str, ParameterSpec],
    file_parameters: Mapping[str, Any],
    params_file: Union[str, Path],
) -> None:
    """camera_topics and camera_names (params-file matters) must agree, as the node
    will check at start."""
    values = {name: spec.default for name, spec in specs.items()}
    problem = camera_parameters_problem({**values, **file_parameters})
    if problem is not None:
        raise ParamsFileError(params_file, problem)


def plan_policy_node(
    arguments: Mapping[str, str],
    default_params_file: Union[str, Path, None] = None,
    outer_namespace: str = "",
) -> PolicyNodePlan:
    """Which node to start and its parameters, from the launch-argument strings.

    ``arguments`` maps launch-argument names to their strings; missing or empty
    ones are not set. Every set argument is checked, including those the chosen
    node ignores, so a typo never passes silently. ``outer_namespace`` is one
    an including launch file pushed (it counts when matching params-file sections).
    """
    given = {name: text for name, text in arguments.items() if text.strip() != ""}
    backend = given.get("backend", "").strip()
    known = LAUNCH_ARGUMENT_NAMES
    if is_plugin(backend):
        try:
            known = tuple(argument.name for argument in launch_arguments(backend))
        except (ValueError, ImportError) as exc:  # UnknownBackendError, or its own imports
            raise LaunchArgumentError("backend", backend, str(exc)) from None
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise LaunchArgumentError(
            unknown[0], arguments[unknown[0]], f"unknown; known: {', '.join(known)}"
        )

    use_remote = parse_bool("use_remote_policy", given.get("use_remote_policy", "false"))
    node = REMOTE_NODE if use_remote else LOCAL_NODE
    namespace = check_namespace(given.get("namespace", ""))
    params_file = given.get("params_file") or default_params_file
    if not params_file:
        raise LaunchArgumentError("params_file", "", "no params file given and no default")

    full_namespace = join_namespaces(outer_namespace, namespace)
    from_file = node_parameters_from_file(params_file, node, full_namespace, backend)
    warnings = []
    if not from_file.sections:
        warnings.append(
            f"params_file {str(params_file)!r} has no section for "
            f"{fully_qualified_name(full_namespace, node)} (nor a wildcard one such as /** "
            f"or /**/{node}): the node starts on its built-in defaults"
        )
    node_specs = node_parameters_for(backend)
    all_specs = {**node_specs[REMOTE_NODE], **node_specs[LOCAL_NODE]}
    overrides = {}
    ignored = []
    for name, text in given.items():
        if name in _CONTROL_ARGUMENTS:
            continue
        value = parse_argument(all_specs[name], text)
        if name in node_specs[node]:
            overrides[name] = value
        else:
            ignored.append(name)
    _check_guard_limits(node_specs[node], from_file.parameters, overrides, given, params_file)
    _check_cameras(node_specs[node], from_file.parameters, params_file)
    return PolicyNodePlan(
        package=POLICY_PACKAGE,
        executable=node,
        name=node,
        namespace=namespace,
        params_file=str(params_file),
        overrides=overrides,
        file_parameters=from_file.parameters,
        ignored_arguments=tuple(ignored),
        warnings=tuple(warnings),
        outer_namespace=outer_namespace,
    )
