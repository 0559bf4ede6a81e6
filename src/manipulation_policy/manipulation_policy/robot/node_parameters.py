"""The parameters of the two policy nodes: names, defaults, descriptions, validation.

Pure code (no ROS): each check takes a value and returns ``None`` when it is
acceptable, else the reason it is refused. The nodes turn these specs into
declared parameters and answer ``ros2 param set`` with the reasons.
Parameters marked ``live=False`` are read once at start (topics, model
loading); the nodes declare them read-only. A numeric check is a
``NumberRange``: the same bounds refuse values here and are shown as the
parameter's range in its descriptor (``ros2 param describe``).
"""

from __future__ import annotations

import array
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from manipulation_policy import backends
from manipulation_policy.backends import BACKEND_MODULES
from manipulation_policy.core.api_key import API_KEY_ENV, ApiKeyUnusable, read_api_key
from manipulation_policy.core.contract import MAX_IMAGE_SIDE, MAX_INSTRUCTION_CHARS
from manipulation_policy.core.options import NumberRange, Option, scale, text_up_to
from manipulation_policy.core.policy_types import MAX_CHUNK_LENGTH
from manipulation_policy.robot.camera_inputs import (
    MAX_CAMERAS,
    camera_name_problem,
    camera_topics_problem,
    state_joints_problem,
)
from manipulation_policy.robot.executor_settings import (
    DEFAULT_CROSSFADE_STEPS,
    DEFAULT_ENSEMBLE_WEIGHT,
    ChunkMerge,
    ExecutorSettings,
    setting_problem,
)
from manipulation_policy.robot.remote_client import DEFAULT_MAX_RESPONSE_BYTES
from manipulation_policy.robot.response_validation import frame_id_problem
from manipulation_policy.robot.safety_guard import GuardLimits

Check = Callable[[Any], Optional[str]]

MAX_INFERENCE_RATE_HZ = 1000.0
MAX_TIMEOUT_SEC = 300.0
MAX_RETRY_ATTEMPTS = 20
MAX_IN_FLIGHT = 4  # remote_max_in_flight: observations awaiting an answer at once
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_RETRY_AFTER_SEC = 3600.0
MAX_BOUND = 1000.0  # upper end of the answer bounds: they must stay finite numbers
MAX_STEPS = 1_000_000_000
AUTOMATIC_REFILL_HORIZON = -1.0

IMAGE_TRANSPORTS = ("raw", "compressed")
PLUGIN_BACKEND_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any
    description: str
    check: Optional[Check] = None
    live: bool = True  # False: read once at start, read-only afterwards
    secret: bool = False  # a refusal never shows the value (it may be a key)
    # An array parameter: the type of its items (float or str); its default is a tuple.
    item_type: Optional[type] = None

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is refused for this parameter; None if fine."""
        if self.item_type is not None:
            problem = _array_problem(self.item_type, value)
            if problem is not None:
                return problem
            return self.check(self.normalized(value)) if self.check is not None else None
        expected = type(self.default)
        # bool is an int subclass: keep the two apart; an int is a fine float.
        if isinstance(value, bool) != (expected is bool) or not (
            isinstance(value, expected) or (expected is float and isinstance(value, int))
        ):
            shown = "a value (not shown)" if self.secret else repr(value)
            return f"expected {expected.__name__}, got {type(value).__name__} {shown}"
        return self.check(value) if self.check is not None else None

    def normalized(self, value: Any) -> Any:
        """An accepted value in the default's type (an int given for a float becomes a
        float; an array, a tuple of its item type)."""
        if self.item_type is not None:
            return tuple(self.item_type(v) for v in value)
        if isinstance(self.default, float) and isinstance(value, int) and not isinstance(
            value, bool
        ):
            return float(value)
        return value

    @property
    def number_range(self) -> Optional[NumberRange]:
        """The bounds of a numeric parameter, when its check is one."""
        return self.check if isinstance(self.check, NumberRange) else None


def _array_problem(item_type: type, value: Any) -> Optional[str]:
    # rclpy hands arrays over as lists, tuples or array.array (doubles).
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, array.array)):
        return f"expected a list of {item_type.__name__}, got {type(value).__name__} {value!r}"
    for index, item in enumerate(value):
        if isinstance(item, bool) or not (
            isinstance(item, item_type) or (item_type is float and isinstance(item, int))
        ):
            return (f"expected a list of {item_type.__name__}, got {type(item).__name__} "
                    f"{item!r} at [{index}]")
    return None


# ---------------------------------------------------------------- checks


def positive_number(upper: float) -> NumberRange:
    return NumberRange(0.0, upper, low_open=True)


def integer_in(low: int, high: int) -> NumberRange:
    return NumberRange(low, high, integer=True)


def one_of(choices: Sequence[str]) -> Check:
    """Case-insensitive, as the backends read these."""

    def check(value: str) -> Optional[str]:
        if value.strip().lower() not in choices:
            return f"must be one of {', '.join(choices)}; got {value!r}"
        return None

    return check


def topic_name(value: str) -> Optional[str]:
    if not value or any(ch.isspace() for ch in value):
        return f"must be a non-empty topic name without spaces, got {value!r}"
    return None


def http_url(value: str) -> Optional[str]:
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        return f"is not a valid URL ({exc}): {value!r}"
    if parts.scheme not in ("http", "https"):
        return f"must start with http:// or https://, got {value!r}"
    if not parts.hostname:
        return f"has no host name: {value!r}"
    if port == 0:
        return f"has port 0: {value!r}"
    if parts.query or parts.fragment:
        return f"must not carry a query or fragment: {value!r}"
    return None


def backend_name(value: str) -> Optional[str]:
    if value in BACKEND_MODULES or PLUGIN_BACKEND_PATTERN.match(value):
        return None
    return (
        f"must be one of {', '.join(sorted(BACKEND_MODULES))} or a module.path:ClassName; "
        f"got {value!r}"
    )


def no_secret_here(value: str) -> Optional[str]:
    if value:
        return (
            "must stay empty: any ROS peer can read a parameter; put the key in a file named "
            f"by remote_api_key_file, or in the {API_KEY_ENV} environment variable"
        )
    return None


def usable_api_key_file(value: str) -> Optional[str]:
    try:
        read_api_key(value, environ={})
    except ApiKeyUnusable as exc:
        return str(exc)
    return None


def frame_id(value: str) -> Optional[str]:
    return frame_id_problem(value)


# ---------------------------------------------------------------- the parameters


# The action-chunk executor's parameters (both nodes), checked by the executor's own
# setting_problem; refill_horizon_sec below 0 means automatic (from measured latency).
CHUNK_MERGES = tuple(m.value for m in ChunkMerge)
MAX_REFILL_HORIZON_SEC = 60.0


def _executor_setting(name: str) -> Check:
    def check(value: Any) -> Optional[str]:
        return setting_problem(name, value.strip().lower() if isinstance(value, str) else value)

    return check


EXECUTOR_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("chunk_topic", "/manipulation/policy_chunk",
                  "manipulation_msgs/PolicyActionChunk topic: each accepted action chunk, "
                  "whole, for controllers that take a trajectory.",
                  topic_name, live=False),
    ParameterSpec("chunk_merge", ChunkMerge.REPLACE.value,
                  "How a new action chunk meets the not yet due steps of older ones: "
                  "replace (the new one wins), temporal_ensemble (weighted average, "
                  "chunk_ensemble_weight) or crossfade (over crossfade_steps steps).",
                  _executor_setting("chunk_merge")),
    ParameterSpec("chunk_ensemble_weight", DEFAULT_ENSEMBLE_WEIGHT,
                  "temporal_ensemble: the i-th oldest prediction weighs exp(-weight * i) "
                  "(0: plain average).",
                  NumberRange(0.0, MAX_BOUND)),
    ParameterSpec("crossfade_steps", DEFAULT_CROSSFADE_STEPS,
                  "crossfade: steps over which a new chunk fades in.",
                  integer_in(1, MAX_CHUNK_LENGTH)),
    ParameterSpec("refill_horizon_sec", AUTOMATIC_REFILL_HORIZON,
                  "Send the next observation when the action timeline has this many seconds "
                  "left (inference overlaps execution); below 0: automatic, 1.5 x the "
                  "slowest recent round trip.",
                  NumberRange(AUTOMATIC_REFILL_HORIZON, MAX_REFILL_HORIZON_SEC)),
)


MAX_INPUT_TIMEOUT_SEC = 60.0

# Stop, dry run, watchdog and managed start-up (both nodes): robot/safety_stops.py.
SAFETY_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("autostart", True,
                  "true: configure and activate at start, as a plain node would (ros2 launch, "
                  "ros2 run); false: wait in the unconfigured state for a lifecycle manager "
                  "or `ros2 lifecycle set`.", live=False),
    ParameterSpec("dry_run", False,
                  "true: everything runs (inference, guard, executor) but commands go to "
                  "preview_topic and chunks to chunk_preview_topic; output_topic and "
                  "chunk_topic get nothing. Recommended for a policy's first runs on a robot.",
                  ),
    ParameterSpec("preview_topic", "/manipulation/policy_output_preview",
                  "manipulation_msgs/PolicyOutput topic of the commands while dry_run is true.",
                  topic_name, live=False),
    ParameterSpec("chunk_preview_topic", "/manipulation/policy_chunk_preview",
                  "manipulation_msgs/PolicyActionChunk topic of the chunks while dry_run is "
                  "true.", topic_name, live=False),
    ParameterSpec("estop_topic", "/manipulation/estop",
                  "std_msgs/Bool emergency stop (reliable, transient local: a stop latched "
                  "before the node starts holds). true: only holds are published and no "
                  "inference starts, until an explicit false.", topic_name, live=False),
    ParameterSpec("input_timeout_sec", 1.0,
                  "Input watchdog: no camera frame or no joint state (each once its first "
                  "arrived) received within this many seconds: the planned steps are dropped, "
                  "one hold is published and no inference starts until inputs come back.",
                  positive_number(MAX_INPUT_TIMEOUT_SEC)),
)


def executor_settings(values: Mapping[str, Any]) -> ExecutorSettings:
    """The executor's settings from the node's parameter values."""
    horizon = float(values["refill_horizon_sec"])
    return ExecutorSettings(
        chunk_merge=ChunkMerge(values["chunk_merge"].strip().lower()),
        ensemble_weight=float(values["chunk_ensemble_weight"]),
        crossfade_steps=int(values["crossfade_steps"]),
        refill_horizon_sec=None if horizon < 0 else horizon,
    )


# The safety guard's limits (both nodes): one parameter per GuardLimits field, its
# default the field's (robot/safety_guard.py says what each limit clamps or refuses).
GUARD_DEFAULTS = GuardLimits()
MAX_WORKSPACE_M = 100.0


def numbers_within(low: float, high: float, count: Optional[int] = None) -> Check:
    """Each item finite and within [low, high]; exactly ``count`` items when given."""

    def check(values: tuple[float, ...]) -> Optional[str]:
        if count is not None and len(values) != count:
            return f"must hold {count} numbers, got {len(values)}"
        for index, value in enumerate(values):
            if not (math.isfinite(value) and low <= value <= high):
                return (f"[{index}] must be a finite number within [{low:g}, {high:g}], "
                        f"got {value!r}")
        return None

    return check


def joint_names(values: tuple[str, ...]) -> Optional[str]:
    if any(not name.strip() for name in values):
        return "must not hold an empty name"
    if len(set(values)) != len(values):
        return "must not name a joint twice"
    return None


def _guard_spec(name: str, description: str, check: Check, item_type: Optional[type] = None):
    return ParameterSpec(name, getattr(GUARD_DEFAULTS, name), description, check,
                         item_type=item_type)


GUARD_PARAMETERS: tuple[ParameterSpec, ...] = (
    _guard_spec("workspace_min",
                "Lower corner (x, y, z, m, reference_frame) of the box absolute end-effector "
                "targets are clamped into; each below workspace_max.",
                numbers_within(-MAX_WORKSPACE_M, MAX_WORKSPACE_M, 3), float),
    _guard_spec("workspace_max",
                "Upper corner (x, y, z, m) of the workspace box.",
                numbers_within(-MAX_WORKSPACE_M, MAX_WORKSPACE_M, 3), float),
    _guard_spec("max_eef_step_m",
                "Longest end-effector translation per step (m): a delta's, or an absolute "
                "target's from the last target (or the current pose, when observed after "
                "it); longer ones are scaled down.", positive_number(MAX_BOUND)),
    _guard_spec("max_eef_step_rad",
                "Largest end-effector rotation per step (rad); larger ones are cut to it.",
                NumberRange(0.0, math.pi, low_open=True)),
    _guard_spec("max_joint_delta",
                "Largest joint delta per step (rad, or m for prismatic joints), for joints "
                "without their own joint_max_deltas entry; larger ones are clamped.",
                positive_number(MAX_BOUND)),
    _guard_spec("joint_limit_names",
                "Joints (joint_states names) with their own limits in joint_max_deltas, "
                "joint_position_min and joint_position_max (same order).",
                joint_names, str),
    _guard_spec("joint_max_deltas",
                "Per joint of joint_limit_names: its largest delta per step (empty: "
                "max_joint_delta for all).", numbers_within(1e-9, MAX_BOUND), float),
    _guard_spec("joint_position_min",
                "Per joint of joint_limit_names: lowest position a delta may lead to "
                "(empty: none).", numbers_within(-MAX_BOUND, MAX_BOUND), float),
    _guard_spec("joint_position_max",
                "Per joint of joint_limit_names: highest position a delta may lead to "
                "(empty: none).", numbers_within(-MAX_BOUND, MAX_BOUND), float),
    _guard_spec("max_gripper_rate",
                "Fastest gripper command change (full range per second, between due times); "
                "faster changes are slowed (0: no limit).", NumberRange(0.0, MAX_BOUND)),
    _guard_spec("max_base_linear_speed",
                "Fastest base velocity hint (m/s); faster ones are scaled down.",
                positive_number(MAX_BOUND)),
    _guard_spec("max_base_angular_speed",
                "Fastest base turn hint (rad/s); faster ones are scaled down.",
                positive_number(MAX_BOUND)),
    _guard_spec("min_confidence",
                "Actions with a lower confidence are refused: a hold instead.",
                NumberRange(0.0, 1.0)),
)
GUARD_PARAMETER_NAMES = frozenset(spec.name for spec in GUARD_PARAMETERS)


def guard_values_problem(values: Mapping[str, Any]) -> Optional[str]:
    """What makes the guard parameters in ``values`` inconsistent together (lengths,
    min below max), naming the field; None when consistent or not all there yet."""
    if not GUARD_PARAMETER_NAMES <= set(values):
        return None
    try:
        GuardLimits.from_values(values)
    except ValueError as exc:
        return str(exc)
    return None


COMMON_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("camera_topic", "/camera/color/image_raw",
                  "Camera topic (sensor_msgs/Image; with image_transport=compressed, "
                  "sensor_msgs/CompressedImage on <camera_topic>/compressed).",
                  topic_name, live=False),
    ParameterSpec("image_transport", "raw",
                  "How the camera is received: raw or compressed.",
                  one_of(IMAGE_TRANSPORTS), live=False),
    ParameterSpec("camera_topics", (),
                  f"Several cameras (at most {MAX_CAMERAS}), first camera first: their "
                  "topics, each named by camera_names; empty: the one camera_topic. A topic "
                  "ending in /compressed is a sensor_msgs/CompressedImage topic; the others "
                  "follow image_transport. A set of frames goes to the policy when every "
                  "camera has one within camera_sync_tolerance_sec of the first camera's.",
                  camera_topics_problem, live=False, item_type=str),
    ParameterSpec("camera_names", (),
                  "The policy's image feature name of each of camera_topics, same order "
                  "(wrist for observation.images.wrist): letters, digits, _ . -.",
                  camera_name_problem, live=False, item_type=str),
    ParameterSpec("camera_sync_tolerance_sec", 0.05,
                  "With camera_topics: the newest frames of the cameras form a set only "
                  "when each is stamped within this of the first camera's frame; else "
                  "nothing is sent until they are.",
                  NumberRange(0.0, 60.0)),
    ParameterSpec("state_joints", (),
                  "The robot's state vector for a policy that reads one: the positions of "
                  "these joints (joint_states names) in this order; empty: no state (unless "
                  "state_eef_pose). A joint missing or unknown (NaN): nothing is sent.",
                  state_joints_problem, live=False, item_type=str),
    ParameterSpec("state_eef_pose", False,
                  "true: the state vector ends with the end-effector pose x, y, z, qx, qy, "
                  "qz, qw (eef_pose_topic or the aggregated observation's base_to_ee); "
                  "without a usable pose nothing is sent.", live=False),
    ParameterSpec("joint_states_topic", "/joint_states", "sensor_msgs/JointState topic.",
                  topic_name, live=False),
    ParameterSpec("instruction_topic", "/manipulation/instruction",
                  "std_msgs/String topic; a message replaces the instruction parameter.",
                  topic_name, live=False),
    ParameterSpec("eef_pose_topic", "/manipulation/eef_pose",
                  "geometry_msgs/PoseStamped current end-effector pose in reference_frame; "
                  "lets a delta-predicting policy answer with an absolute target.",
                  topic_name, live=False),
    ParameterSpec("observation_topic", "/manipulation/observation",
                  "manipulation_msgs/Observation topic (the aggregated observation upstream's "
                  "perception node publishes); read while use_observation is true.",
                  topic_name, live=False),
    ParameterSpec("output_topic", "/manipulation/policy_output",
                  "manipulation_msgs/PolicyOutput topic the decisions are published on.",
                  topic_name, live=False),
    ParameterSpec("inference_rate", 5.0,
                  "Decisions per second (Hz). When inference is slower, frames are skipped.",
                  positive_number(MAX_INFERENCE_RATE_HZ)),
    ParameterSpec("instruction", "pick up the object",
                  "Task text given to the policy.", text_up_to(MAX_INSTRUCTION_CHARS)),
    ParameterSpec("reference_frame", "base_link",
                  "Frame of the end-effector targets (PolicyOutput header.frame_id).",
                  frame_id),
    ParameterSpec("max_observation_age_sec", 0.5,
                  "Images older than this (node clock minus image stamp) are not used.",
                  positive_number(3600.0)),
    ParameterSpec("use_observation", True,
                  "true: while the aggregated observation on observation_topic is fresh, its "
                  "image, joint states and base_to_ee (the current end-effector pose) are the "
                  "inputs, and the raw topics fill in the parts it lacks; when it is stale or "
                  "absent, the raw topics are. false: the raw topics only."),
    ParameterSpec("observation_timeout_sec", 0.5,
                  "An aggregated observation whose stamp is further than this (or than "
                  "max_observation_age_sec) from the node clock, or stamped zero, is stale: "
                  "the raw topics are used instead.",
                  positive_number(3600.0)),
    ParameterSpec("wait_for_task", False,
                  "true: act only once a task (a message on instruction_topic) has arrived, "
                  "as the upstream MobileManipulationCore node does; false: the instruction "
                  "parameter is a task from the start.", live=False),
    ParameterSpec("max_steps", 0,
                  "Decisions published per task, then wait for the next task "
                  "(0 or less: until an empty message on instruction_topic clears it).",
                  integer_in(-MAX_STEPS, MAX_STEPS)),
) + EXECUTOR_PARAMETERS + SAFETY_PARAMETERS + GUARD_PARAMETERS

BACKEND_PARAMETER = ParameterSpec(
    "backend", "openvla",
    "Policy backend: " + ", ".join(sorted(BACKEND_MODULES))
    + ", or module.path:ClassName of another backend class.",
    backend_name, live=False,
)


def option_parameters(options: Sequence[Option]) -> tuple[ParameterSpec, ...]:
    """The node parameters of backend options, from their declarations."""
    return tuple(
        # A number option's check is its NumberRange itself: the descriptor shows it.
        ParameterSpec(option.name, option.parameter_default, option.help,
                      option.check if option.kind is float else option.problem,
                      live=option.live)
        for option in options
        if option.node_parameter
    )


def policy_node_parameters(backend: str = "") -> tuple[ParameterSpec, ...]:
    """policy_node's own parameters: ``backend`` and the options of every registered
    backend, and, when ``backend`` is a module.path:ClassName plugin, its options too."""
    return (BACKEND_PARAMETER, *option_parameters(backends.options_with(backend)))


def __getattr__(name: str) -> Any:
    # POLICY_NODE_PARAMETERS is derived when first asked for, so that the remote node,
    # which never asks, reads no backend's declaration (no model's code on its robot).
    if name == "POLICY_NODE_PARAMETERS":
        return policy_node_parameters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


REMOTE_NODE_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("remote_url", "http://localhost:5000",
                  "Base URL of the policy server (http:// or https://).", http_url),
    ParameterSpec("remote_timeout_sec", 1.0,
                  "Deadline in seconds for one whole attempt (connect, send, receive, decode), "
                  "however slowly the server answers.",
                  positive_number(MAX_TIMEOUT_SEC)),
    ParameterSpec("remote_retry_attempts", 3,
                  "Extra attempts after a failed one (0: try once).",
                  integer_in(0, MAX_RETRY_ATTEMPTS)),
    ParameterSpec("remote_max_in_flight", 1,
                  "Observations awaiting an answer at once (1: the next is sent after the "
                  "answer; more: sent while the timeline projected with the requests in "
                  "flight has no more than the refill horizon left; a server with as many "
                  "model instances answers them at once).",
                  integer_in(1, MAX_IN_FLIGHT)),
    ParameterSpec("remote_fallback_on_failure", True,
                  "After the retries fail: true publishes a safe hold (nothing to move, "
                  "confidence 0), false publishes nothing."),
    ParameterSpec("remote_api_key", "",
                  "Must stay empty: any ROS peer can read a parameter. The key comes from "
                  f"remote_api_key_file or the {API_KEY_ENV} environment variable.",
                  no_secret_here, secret=True),
    ParameterSpec("remote_api_key_file", "",
                  f"File holding the server's bearer key (empty: the {API_KEY_ENV} "
                  "environment variable, else no key).", usable_api_key_file),
    ParameterSpec("remote_max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES,
                  "Largest answer accepted, in bytes, on the wire and after decompression.",
                  integer_in(1024, MAX_RESPONSE_BYTES)),
    ParameterSpec("remote_retry_after_max_sec", 30.0,
                  "Longest quiet time a server's Retry-After (503, 429) can ask for, seconds.",
                  positive_number(MAX_RETRY_AFTER_SEC)),
    ParameterSpec("image_width", 224, "Width the image is resized to before sending.",
                  integer_in(1, MAX_IMAGE_SIDE)),
    ParameterSpec("image_height", 224, "Height the image is resized to before sending.",
                  integer_in(1, MAX_IMAGE_SIDE)),
    ParameterSpec("jpeg_quality", 90, "JPEG quality of the sent image (1-100).",
                  integer_in(1, 100)),
)


def specs_by_name(*groups: Sequence[ParameterSpec]) -> dict[str, ParameterSpec]:
    return {spec.name: spec for group in groups for spec in group}


def changes_problem(
    specs: Mapping[str, ParameterSpec],
    values: Mapping[str, Any],
    current: Optional[Mapping[str, Any]] = None,
) -> Optional[str]:
    """The problem with the first refused one of ``values`` ("name: problem"), or None.

    Names without a spec (use_sim_time, ...) are not ours to judge. With ``current``
    (the values in force), limits that must agree with each other (the guard's) are
    checked together as they would be after the change.
    """
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            continue
        problem = spec.problem(value)
        if problem is not None:
            return f"{name} {problem}"
    if current is not None and GUARD_PARAMETER_NAMES.intersection(values):
        return guard_values_problem({**current, **values})
    return None


def parameter_backend_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """create_backend keyword arguments from the policy node's parameter values: each
    option the chosen backend declares, typed (None: unset), as its declaration reads
    it. A backend without an ``OPTIONS`` declaration gets every registered option."""
    name = values["backend"]
    declared = backends.declared_options(name)
    if not declared and not backends.declares_options(name):
        declared = backends.registered_options()
    return {
        option.name: option.from_parameter(values[option.name])
        for option in declared
        if option.node_parameter and option.name in values
    }


# ---------------------------------------------------------------- upstream names

# Parameter names of the upstream MobileManipulationCore policy node that this
# project spells differently. Accepted (read at start) with a deprecation note.
UPSTREAM_ALIASES = {"task_prompt": "instruction", "task_prompt_topic": "instruction_topic"}
UPSTREAM_SWITCHES = ("use_remote",)
UPSTREAM_PARAMETER_NAMES = (*UPSTREAM_ALIASES, *UPSTREAM_SWITCHES)
UPSTREAM_MAX_STEPS = 50  # upstream's node default: decisions per task
# Where upstream's node reads tasks and its task_prompt_cli publishes them by default.
UPSTREAM_TASK_TOPIC = "/manipulation/task_prompt"


@dataclass(frozen=True)
class UpstreamParameters:
    """What upstream-named parameters given to a node mean here."""

    defaults: dict[str, Any]  # canonical name -> value to declare it with
    task_given: bool  # upstream's task_prompt was non-empty: a task from the start
    notes: tuple[str, ...]  # deprecation notes to log


def resolve_upstream_parameters(given: Mapping[str, Any], remote: bool) -> UpstreamParameters:
    """``given``: the upstream-named parameters that were set (name -> value).

    Raises ValueError for a value of the wrong type, or for ``use_remote:=true``
    given to the in-process node (it would load the model here instead).
    Upstream's node waits for a task before acting, runs 50 decisions per task
    and reads its tasks on /manipulation/task_prompt, so any upstream name turns
    ``wait_for_task`` on and makes 50 the default of ``max_steps`` and upstream's
    task topic the default of ``instruction_topic`` (each given itself wins, and
    ``task_prompt_topic`` is the task topic under upstream's name).
    """
    defaults: dict[str, Any] = {}
    notes: list[str] = []
    task_given = False
    for name, value in given.items():
        if name in UPSTREAM_ALIASES:
            target = UPSTREAM_ALIASES[name]
            if not isinstance(value, str):
                raise ValueError(f"{name} expected str, got {type(value).__name__} {value!r}")
            notes.append(f"parameter {name!r} is the upstream MobileManipulationCore name of "
                         f"{target!r}; it is deprecated, use {target!r}")
            if name == "task_prompt_topic":
                reason = topic_name(value)
                if reason is not None:
                    raise ValueError(f"{name} {reason}")
                defaults[target] = value
            elif value.strip():
                reason = text_up_to(MAX_INSTRUCTION_CHARS)(value)
                if reason is not None:
                    raise ValueError(f"{name} {reason}")
                defaults[target] = value.strip()
                task_given = True
        elif name == "use_remote":
            if not isinstance(value, bool):
                raise ValueError(f"use_remote expected bool, got {type(value).__name__} {value!r}")
            if value and not remote:
                raise ValueError(
                    "use_remote is true, but policy_node runs the model in this process; "
                    "start remote_policy_node instead (launch: use_remote_policy:=true)"
                )
            notes.append(
                "parameter 'use_remote' is the upstream MobileManipulationCore switch; it is "
                "deprecated: the node chooses (remote_policy_node calls the server, "
                "policy_node runs the model)"
                + ("" if value or not remote else "; use_remote=false is ignored here")
            )
    if given:
        defaults["wait_for_task"] = True
        defaults["max_steps"] = UPSTREAM_MAX_STEPS
        defaults.setdefault("instruction_topic", UPSTREAM_TASK_TOPIC)
    return UpstreamParameters(defaults, task_given, tuple(notes))


# Upstream's per-request action settings (remote node only): sent with every request
# when given, and used on a raw action vector the server may answer with.
UPSTREAM_ACTION_PARAMETERS = (
    "openvla_xyz_scaling", "openvla_rotation_scaling", "openvla_clip_actions",
    "openvla_position_bounds", "openvla_rotation_bounds", "openvla_gripper_bounds",
)


def upstream_action_fields(given: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields for upstream's ``openvla_*`` parameters that were given;
    ValueError naming the parameter for a value the server would refuse."""
    fields: dict[str, Any] = {}
    for name, value in given.items():
        if name.endswith("_scaling"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} expected float, got {type(value).__name__} {value!r}")
            reason = scale(float(value))  # the server's own check
            if reason is not None:
                raise ValueError(f"{name} {reason}")
            fields[name] = float(value)
        elif name == "openvla_clip_actions":
            if not isinstance(value, bool):
                raise ValueError(f"{name} expected bool, got {type(value).__name__} {value!r}")
            fields[name] = value
        elif name.endswith("_bounds"):
            numbers = list(value) if isinstance(value, Sequence) and not isinstance(
                value, str) else []
            if len(numbers) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in numbers
            ) or numbers[0] > numbers[1]:
                raise ValueError(f"{name} must be [lower, upper], two finite numbers, "
                                 f"got {value!r}")
            fields[name] = [float(v) for v in numbers]
    return fields
