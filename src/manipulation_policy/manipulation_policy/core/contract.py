"""The HTTP wire contract between the robot-side client and the policy server.

Request and response field names, types and defaults are those of the
original remote-server guide; the optional extensions (instruction, eef_pose,
request_id, pending_actions, pending_delay_sec, images, state, robot_id;
eef_target_mode, has_joint_positions, joint_positions, joint_names, request_id,
inference_time_ms, actions, action_period_sec) are never required. Unknown
request fields are ignored. Every request the upstream MobileManipulationCore
client sends is understood: ``task``/``task_text`` as
the instruction, NaN/Infinity in joint arrays as unknown values, its
``openvla_*`` scaling and clipping fields (within ``MAX_REQUEST_SCALE``).
Conversions to and from the plain types of ``policy_types`` live here too, so
the server and the client share one definition.

Action chunks: an answer carries the whole chunk under ``actions`` (each item
the PolicyOutput-shaped action object, with its own has_* flags) and the time
between its actions under ``action_period_sec``; its top-level fields carry the
chunk's first action, so a client that knows nothing of chunks (upstream's)
reads the answer as before. This server always sends both, a single-step model
answering a chunk of one; an answer without them (upstream's server, older
ones) is a chunk of one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_base64_image,
    encode_base64_jpeg,
)
from manipulation_policy.core.policy_types import (
    DEFAULT_REFERENCE_FRAME,
    MAX_CHUNK_LENGTH,
    ActionChunk,
    ActionOverrides,
    EefTargetMode,
    JointStateData,
    Observation,
    PolicyAction,
    Pose,
    Twist,
    geometry_from,
    geometry_to_dict,
)

ModelT = TypeVar("ModelT", bound=BaseModel)

# JSON numbers only (no "1.0" strings, no booleans), finite.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A joint value: robots publish NaN for joints without velocity or effort sensors
# (and json_body lets NaN/Infinity through inside joint arrays only): unknown.
JointValue = Annotated[float, Field(strict=True)]
Text = Annotated[str, Field(strict=True)]
# JSON true/false only: "yes", 1 or "true" are not a flag.
Flag = Annotated[bool, Field(strict=True)]
MAX_INSTRUCTION_CHARS = 1024  # also the instruction parameter's limit (node_parameters)
InstructionText = Annotated[str, Field(strict=True, max_length=MAX_INSTRUCTION_CHARS)]
MAX_JOINTS = 256
MAX_IMAGE_SIDE = 8192
MAX_FRAME_LENGTH = 256
# A client's per-request gain on the model's motion is honoured up to this; the
# server's own step caps (max_position_step, max_rotation_step) still apply after it.
MAX_REQUEST_SCALE = 100.0
Scale = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_REQUEST_SCALE)]
BoundsPair = Annotated[list[Number], Field(min_length=2, max_length=2)]
MAX_REQUEST_ID_CHARS = 128
# The longest time between two actions of a chunk a server may answer: slower than any
# controller runs, and what bounds how far into the future one answer can reach.
MAX_ACTION_PERIOD_SEC = 10.0
# The longest inference delay a client may announce with its pending actions.
MAX_PENDING_DELAY_SEC = 10.0
ActionPeriod = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0,
                                      le=MAX_ACTION_PERIOD_SEC)]
PendingDelay = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0,
                                      le=MAX_PENDING_DELAY_SEC)]
# Several cameras (request ``images``): at most this many, each named like a policy's
# image feature (``wrist`` for ``observation.images.wrist``).
MAX_CAMERAS = 8
CAMERA_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_STATE_LENGTH = 256
MAX_ROBOT_ID_CHARS = 128
ImageSide = Annotated[int, Field(strict=True, ge=1, le=MAX_IMAGE_SIDE)]


class _WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PointModel(_WireModel):
    x: Number = 0.0
    y: Number = 0.0
    z: Number = 0.0


class QuaternionModel(_WireModel):
    x: Number = 0.0
    y: Number = 0.0
    z: Number = 0.0
    w: Number = 1.0


class PoseModel(_WireModel):
    position: PointModel = Field(default_factory=PointModel)
    orientation: QuaternionModel = Field(default_factory=QuaternionModel)


class TwistModel(_WireModel):
    linear: PointModel = Field(default_factory=PointModel)
    angular: PointModel = Field(default_factory=PointModel)


class JointStatesModel(_WireModel):
    """sensor_msgs/JointState: position, velocity and effort are empty or one per name."""

    name: list[Text] = Field(default_factory=list, max_length=MAX_JOINTS)
    position: list[JointValue] = Field(default_factory=list, max_length=MAX_JOINTS)
    velocity: list[JointValue] = Field(default_factory=list, max_length=MAX_JOINTS)
    effort: list[JointValue] = Field(default_factory=list, max_length=MAX_JOINTS)

    @model_validator(mode="after")
    def _lengths_agree(self) -> JointStatesModel:
        # Named relative to this object: first_input_error prefixes joint_states.
        count = len(self.name)
        for field_name in ("position", "velocity", "effort"):
            values = getattr(self, field_name)
            if values and len(values) != count:
                raise InputError(
                    field_name,
                    f"has {_count(len(values), 'value')} for {_count(count, 'joint name')}",
                )
        return self


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


class NamedImageModel(_WireModel):
    """One camera of ``images``: the top-level image's fields, the same bounds."""

    image: Text = Field(description="base64-encoded JPEG (or PNG)")
    image_encoding: Optional[Text] = Field(
        default=None, description="jpeg or png; when absent, detected from the image bytes"
    )
    image_width: Optional[ImageSide] = None
    image_height: Optional[ImageSide] = None


def _shown_name(name: str) -> str:
    """A client's key as it appears in an error's field path (bounded, printable)."""
    shown = name if name.isprintable() and name else repr(name)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class InferRequest(_WireModel):
    # Bounded like the answer's frame, which echoes it.
    reference_frame: Annotated[Text, Field(max_length=MAX_FRAME_LENGTH)] = DEFAULT_REFERENCE_FRAME
    joint_states: JointStatesModel = Field(default_factory=JointStatesModel)
    image: Optional[Text] = Field(default=None, description="base64-encoded JPEG (or PNG)")
    image_encoding: Optional[Text] = Field(
        default=None, description="jpeg or png; when absent, detected from the image bytes"
    )
    image_width: Optional[ImageSide] = None
    image_height: Optional[ImageSide] = None
    # Optional extensions.
    images: Optional[dict[str, NamedImageModel]] = Field(
        default=None,
        description=(
            f"several cameras, one set taken together: camera name (the policy's image "
            f"feature name, e.g. wrist for observation.images.wrist; "
            f"{CAMERA_NAME_PATTERN.pattern}) -> the image, with the same fields and "
            f"bounds as the top-level one; at most {MAX_CAMERAS}. image keeps its meaning"
        ),
    )
    state: Optional[Annotated[list[Number], Field(max_length=MAX_STATE_LENGTH)]] = Field(
        default=None,
        description=(
            "the robot's state vector (joint positions in a configured order, then the "
            "end-effector pose where configured), for a policy that reads one"
        ),
    )
    robot_id: Optional[Annotated[Text, Field(max_length=MAX_ROBOT_ID_CHARS)]] = Field(
        default=None, description="who sends the request (the remote node's name)"
    )
    instruction: Optional[InstructionText] = None
    eef_pose: Optional[PoseModel] = None
    request_id: Optional[Annotated[str, Field(strict=True, max_length=MAX_REQUEST_ID_CHARS)]] = (
        None
    )
    pending_actions: Optional[list[ActionModel]] = Field(
        default=None,
        max_length=MAX_CHUNK_LENGTH,
        description=(
            "the not-yet-executed rest of the chunk the robot is executing, oldest first "
            "(real-time chunking); a backend that cannot use it ignores it"
        ),
    )
    pending_delay_sec: Optional[PendingDelay] = Field(
        default=None,
        description=(
            "how long the pending actions keep running before this answer takes over "
            "(the inference delay)"
        ),
    )
    # Upstream MobileManipulationCore's names and per-request action settings.
    task: Optional[InstructionText] = Field(default=None, description="upstream's instruction")
    task_text: Optional[InstructionText] = Field(default=None, description="upstream's too")
    openvla_xyz_scaling: Optional[Scale] = None
    openvla_rotation_scaling: Optional[Scale] = None
    openvla_clip_actions: Optional[Annotated[bool, Field(strict=True)]] = None
    openvla_position_bounds: Optional[BoundsPair] = None
    openvla_rotation_bounds: Optional[BoundsPair] = None
    openvla_gripper_bounds: Optional[BoundsPair] = None

    @field_validator("images", mode="before")
    @classmethod
    def _camera_names_are_names(cls, images: Any) -> Any:
        # Named relative to ``images``: first_input_error prefixes it.
        if isinstance(images, Mapping):
            if len(images) > MAX_CAMERAS:
                raise InputError(
                    "", f"has {len(images)} cameras; at most {MAX_CAMERAS} are accepted"
                )
            for name in images:
                if not isinstance(name, str) or not CAMERA_NAME_PATTERN.fullmatch(name):
                    raise InputError(
                        _shown_name(str(name)),
                        f"is not a camera name; a name matches {CAMERA_NAME_PATTERN.pattern}",
                    )
        return images

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> InferRequest:
        for name in BOUNDS_FIELDS:
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] > bounds[1]:
                raise InputError(name, f"lower bound {bounds[0]} is above upper {bounds[1]}")
        return self

    @model_validator(mode="after")
    def _eef_orientation_is_a_rotation(self) -> InferRequest:
        # A zero (or overflowing) quaternion cannot be normalised: the client's fault, not a 500.
        if self.eef_pose is not None:
            q = self.eef_pose.orientation
            if not _is_rotation(q):
                raise InputError(
                    "eef_pose.orientation",
                    f"quaternion ({q.x}, {q.y}, {q.z}, {q.w}) is not a rotation; "
                    "its length must be non-zero and finite",
                )
        return self

    @model_validator(mode="after")
    def _pending_actions_fit_this_request(self) -> InferRequest:
        joint_count = len(self.joint_states.name)
        for index, action in enumerate(self.pending_actions or ()):
            path = f"pending_actions[{index}]"
            check_announced_parts(action, path)
            if (
                "reference_frame" in action.model_fields_set
                and action.reference_frame != self.reference_frame
            ):
                raise InputError(
                    f"{path}.reference_frame",
                    f"is {action.reference_frame!r}, but the request's reference_frame is "
                    f"{self.reference_frame!r}",
                )
            if action.has_eef_target:
                q = action.eef_target_pose.orientation
                if not _is_rotation(q):
                    raise InputError(
                        f"{path}.eef_target_pose.orientation",
                        f"quaternion ({q.x}, {q.y}, {q.z}, {q.w}) is not a rotation",
                    )
            if action.joint_names:
                continue  # its values are one per joint_names entry (ActionModel checks)
            for flag, name in (("has_joint_deltas", "joint_deltas"),
                               ("has_joint_positions", "joint_positions")):
                values = getattr(action, name)
                if getattr(action, flag) and len(values) != joint_count:
                    raise InputError(
                        f"{path}.{name}",
                        f"has {_count(len(values), 'value')} for "
                        f"{_count(joint_count, 'joint name')}",
                    )
        return self


def _is_rotation(q: QuaternionModel) -> bool:
    """A quaternion that can be normalised: non-zero and finite length."""
    norm_squared = q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w
    return math.isfinite(norm_squared) and norm_squared > 1e-12


BOUNDS_FIELDS = ("openvla_position_bounds", "openvla_rotation_bounds", "openvla_gripper_bounds")


class ActionModel(_WireModel):
    """One action, PolicyOutput-shaped: the top level of an answer, each item of its
    ``actions``, each item of a request's ``pending_actions``."""

    has_eef_target: Flag = False
    eef_target_pose: PoseModel = Field(default_factory=PoseModel)
    has_joint_deltas: Flag = False
    joint_deltas: list[Number] = Field(default_factory=list, max_length=MAX_JOINTS)
    gripper_command: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.0
    gripper_active: Flag = False
    has_base_hint: Flag = False
    base_velocity_hint: TwistModel = Field(default_factory=TwistModel)
    reference_frame: Annotated[Text, Field(max_length=MAX_FRAME_LENGTH)] = DEFAULT_REFERENCE_FRAME
    confidence: Annotated[Number, Field(ge=0.0, le=1.0)] = 0.0
    # Optional extensions.
    eef_target_mode: Literal["absolute", "delta"] = "delta"
    has_joint_positions: Flag = False
    joint_positions: list[Number] = Field(
        default_factory=list,
        max_length=MAX_JOINTS,
        description="absolute joint position targets (rad, or m for prismatic joints), "
        "never deltas; read when has_joint_positions",
    )
    joint_names: list[Text] = Field(
        default_factory=list,
        max_length=MAX_JOINTS,
        description="the joints joint_positions and joint_deltas name, in their order "
        "(each then has this length); empty: the request's joint_states order",
    )

    @model_validator(mode="after")
    def _joint_names_fit(self) -> ActionModel:
        # Named relative to this object: first_input_error prefixes e.g. actions[2].
        if not self.joint_names:
            return self
        problem = joint_names_problem(self.joint_names)
        if problem is not None:
            raise InputError("joint_names", problem)
        count = len(self.joint_names)
        for flag, name in (("has_joint_positions", "joint_positions"),
                           ("has_joint_deltas", "joint_deltas")):
            values = getattr(self, name)
            if getattr(self, flag) and len(values) != count:
                raise InputError(
                    name,
                    f"has {_count(len(values), 'value')} for {_count(count, 'joint name')} "
                    "in joint_names",
                )
        return self


def joint_names_problem(names: Any) -> Optional[str]:
    """Why a non-empty joint_names list cannot name joints (an empty or repeated name)."""
    seen = set()
    for index, name in enumerate(names):
        if not name:
            return f"name [{index}] is empty"
        if name in seen:
            return f"names joint {_shown_name(name)!r} twice"
        seen.add(name)
    return None


class InferResponse(ActionModel):
    """The answer: the chunk's first action at the top level (PolicyOutput's fields, what
    upstream's client reads), the whole chunk under ``actions``."""

    # Optional extensions.
    request_id: Optional[Annotated[Text, Field(max_length=MAX_REQUEST_ID_CHARS)]] = None
    inference_time_ms: Optional[Annotated[Number, Field(ge=0.0)]] = None
    actions: Optional[list[ActionModel]] = Field(
        default=None,
        min_length=1,
        max_length=MAX_CHUNK_LENGTH,
        description=(
            "the action chunk, in order; the top-level fields repeat its first action. "
            "Always sent by this server (a single-step model answers a chunk of one); "
            "absent from upstream's answers, which are a chunk of one"
        ),
    )
    action_period_sec: Optional[ActionPeriod] = Field(
        default=None,
        description="seconds between consecutive actions of the chunk; sent with actions",
    )

    @model_validator(mode="after")
    def _chunk_fields_come_together(self) -> InferResponse:
        if (self.actions is None) != (self.action_period_sec is None):
            given, missing = (
                ("actions", "action_period_sec")
                if self.actions is not None
                else ("action_period_sec", "actions")
            )
            raise InputError(missing, f"is missing, but {given} is given")
        return self


class HealthResponse(BaseModel):
    status: Literal["ok", "unhealthy"] = "ok"
    reason: Optional[str] = Field(default=None, description="why the server is unhealthy")


class ErrorResponse(BaseModel):
    error: str
    field: Optional[str] = None
    detail: str


# ---------------------------------------------------------------- validation


def field_path(location: tuple) -> str:
    """('joint_states', 'position', 2) -> 'joint_states.position[2]'."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def first_input_error(exc: ValidationError) -> InputError:
    """The first problem of a pydantic error, as an InputError naming its field."""
    error = exc.errors()[0]
    location = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):
        # A validator names its field relative to the object it validates.
        if not location:
            return cause
        where = field_path(location)
        if not cause.field:
            return InputError(where, cause.message)
        return InputError(f"{where}.{cause.field}", cause.message)
    return InputError(field_path(location), error["msg"])


def _validated(model: type[ModelT], payload: Any, what: str) -> ModelT:
    if not isinstance(payload, dict):
        raise InputError("body", f"{what} body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise first_input_error(exc) from None


def _require(model: BaseModel, path: str, names: Any, because: str) -> None:
    for name in names:
        if name not in model.model_fields_set:
            raise InputError(f"{path}.{name}" if path else name, f"is missing, but {because}")


def _require_complete(model: BaseModel, path: str, because: str) -> None:
    """Every field of a pose/twist part is given, level by level (a part announced by
    its flag must not be read from defaults)."""
    _require(model, path, type(model).model_fields, because)
    for name in type(model).model_fields:
        part = getattr(model, name)
        if isinstance(part, BaseModel):
            _require_complete(part, f"{path}.{name}", because)


def check_announced_parts(action: ActionModel, path: str = "") -> None:
    """A part announced by its flag is really there (``has_eef_target: true`` with no
    ``eef_target_pose`` is refused, not read as the origin); InputError names it."""
    prefix = f"{path}." if path else ""
    if action.has_eef_target:
        because = "has_eef_target is true"
        _require(action, path, ["eef_target_pose"], because)
        _require_complete(action.eef_target_pose, f"{prefix}eef_target_pose", because)
    if action.has_joint_deltas:
        _require(action, path, ["joint_deltas"], "has_joint_deltas is true")
    if action.has_joint_positions:
        _require(action, path, ["joint_positions"], "has_joint_positions is true")
    if action.gripper_active:
        _require(action, path, ["gripper_command"], "gripper_active is true")
    if action.has_base_hint:
        because = "has_base_hint is true"
        _require(action, path, ["base_velocity_hint"], because)
        _require_complete(action.base_velocity_hint, f"{prefix}base_velocity_hint", because)


def parse_request(payload: Any) -> InferRequest:
    return _validated(InferRequest, payload, "request")


def parse_response(payload: Any) -> InferResponse:
    return _validated(InferResponse, payload, "response")


# ---------------------------------------------------------------- conversions


# The plain types (policy_types) are THE pose/twist type; the models above only
# describe and validate the wire. These are the only converters between the two.


def pose_from_wire(model: PoseModel) -> Pose:
    return geometry_from(Pose, model)


def twist_from_wire(model: TwistModel) -> Twist:
    return geometry_from(Twist, model)


def pose_to_wire(pose: Pose) -> dict:
    return geometry_to_dict(pose, Pose)


def twist_to_wire(twist: Twist) -> dict:
    return geometry_to_dict(twist, Twist)


def request_to_observation(
    request: InferRequest, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Observation:
    """Decode a validated request into an Observation (decodes every image, each within
    ``max_image_pixels``)."""
    image = None
    if request.image is not None:
        image = decode_base64_image(
            request.image,
            request.image_encoding,
            request.image_width,
            request.image_height,
            max_image_pixels,
        )
    images = {
        name: _decode_named_image(name, camera, max_image_pixels)
        for name, camera in (request.images or {}).items()
    }
    joints = request.joint_states
    return Observation(
        joint_state=JointStateData(
            name=tuple(joints.name),
            position=_unknown_as_nan(joints.position),
            velocity=_unknown_as_nan(joints.velocity),
            effort=_unknown_as_nan(joints.effort),
        ),
        image=image,
        reference_frame=request.reference_frame,
        instruction=request_instruction(request),
        eef_pose=pose_from_wire(request.eef_pose) if request.eef_pose is not None else None,
        action_overrides=request_action_overrides(request),
        pending_actions=tuple(
            action_from_wire(action, request.reference_frame)
            for action in request.pending_actions or ()
        ),
        pending_delay_sec=request.pending_delay_sec,
        images=images,
        state=None if request.state is None else tuple(request.state),
        robot_id=request.robot_id or "",
    )


def _decode_named_image(name: str, camera: NamedImageModel, max_pixels: int):
    try:
        return decode_base64_image(
            camera.image,
            camera.image_encoding,
            camera.image_width,
            camera.image_height,
            max_pixels,
        )
    except InputError as exc:
        # imaging names the top-level fields (image, image_width, ...).
        raise InputError(f"images.{name}.{exc.field}", exc.message) from None


def request_instruction(request: InferRequest) -> str:
    """The task text, under any of its names (upstream's precedence: task, instruction,
    task_text; an empty one counts as absent)."""
    return request.task or request.instruction or request.task_text or ""


def request_action_overrides(request: InferRequest) -> Optional[ActionOverrides]:
    """The client's per-request scaling/clipping (upstream's openvla_* fields), if any."""

    def pair(value: Optional[list[float]]) -> Optional[tuple[float, float]]:
        return (value[0], value[1]) if value is not None else None

    overrides = ActionOverrides(
        position_scale=request.openvla_xyz_scaling,
        rotation_scale=request.openvla_rotation_scaling,
        clip_actions=request.openvla_clip_actions,
        position_bounds=pair(request.openvla_position_bounds),
        rotation_bounds=pair(request.openvla_rotation_bounds),
        gripper_bounds=pair(request.openvla_gripper_bounds),
    )
    return None if overrides == ActionOverrides() else overrides


def _unknown_as_nan(values: list[float]) -> tuple[float, ...]:
    """NaN and +-Infinity in a joint array mean "unknown"; one spelling for all."""
    return tuple(v if math.isfinite(v) else math.nan for v in values)


def observation_to_request(
    observation: Observation, jpeg_quality: int = 90, request_id: Optional[str] = None
) -> dict:
    """The JSON body the robot sends for an observation (image already sized)."""
    joints = observation.joint_state
    body: dict[str, Any] = {
        "reference_frame": observation.reference_frame,
        "joint_states": {
            "name": list(joints.name),
            "position": list(joints.position),
            "velocity": list(joints.velocity),
            "effort": list(joints.effort),
        },
    }
    if observation.image is not None:
        body.update(_image_to_wire(observation.image, jpeg_quality))
    if observation.images:
        body["images"] = {
            name: _image_to_wire(rgb, jpeg_quality) for name, rgb in observation.images.items()
        }
    if observation.state is not None:
        body["state"] = [float(value) for value in observation.state]
    if observation.robot_id:
        body["robot_id"] = observation.robot_id
    if observation.instruction:
        body["instruction"] = observation.instruction
    if observation.eef_pose is not None:
        body["eef_pose"] = pose_to_wire(observation.eef_pose)
    if request_id is not None:
        body["request_id"] = request_id
    if observation.pending_actions:
        body["pending_actions"] = [action_to_wire(a) for a in observation.pending_actions]
    if observation.pending_delay_sec is not None:
        body["pending_delay_sec"] = observation.pending_delay_sec
    return body


def _image_to_wire(rgb: Any, jpeg_quality: int) -> dict:
    height, width = rgb.shape[:2]
    return {
        "image": encode_base64_jpeg(rgb, jpeg_quality),
        "image_encoding": "jpeg",
        "image_width": int(width),
        "image_height": int(height),
    }


def action_to_wire(action: PolicyAction) -> dict:
    """The PolicyOutput-shaped JSON object of one action (every field present).
    ValueError when its joint_names do not fit its joint values (a backend's bug)."""
    _check_joint_names(action)
    return {
        "has_eef_target": action.eef_target is not None,
        "eef_target_pose": pose_to_wire(action.eef_target or Pose()),
        "has_joint_deltas": action.joint_deltas is not None,
        "joint_deltas": list(action.joint_deltas or ()),
        "gripper_command": action.gripper_command if action.gripper_command is not None else 0.0,
        "gripper_active": action.gripper_command is not None,
        "has_base_hint": action.base_velocity_hint is not None,
        "base_velocity_hint": twist_to_wire(action.base_velocity_hint or Twist()),
        "reference_frame": action.reference_frame,
        "confidence": action.confidence,
        "eef_target_mode": EefTargetMode(action.eef_target_mode).value,
        "has_joint_positions": action.joint_positions is not None,
        "joint_positions": list(action.joint_positions or ()),
        "joint_names": list(action.joint_names or ()),
    }


def _check_joint_names(action: PolicyAction) -> None:
    names = action.joint_names
    if not names:
        return
    problem = joint_names_problem(names)
    if problem is not None:
        raise ValueError(f"joint_names {problem}")
    for label, values in (("joint_positions", action.joint_positions),
                          ("joint_deltas", action.joint_deltas)):
        if values is not None and len(values) != len(names):
            raise ValueError(
                f"{label} has {_count(len(values), 'value')} for "
                f"{_count(len(names), 'joint name')} in joint_names"
            )


def chunk_to_response(
    chunk: ActionChunk,
    request_id: Optional[str] = None,
    inference_time_ms: Optional[float] = None,
) -> dict:
    """The full answer for a chunk: its first action at the top level (every
    PolicyOutput field present), the extensions, and the chunk itself."""
    actions = [action_to_wire(action) for action in chunk.actions]
    body = {
        **actions[0],
        "request_id": request_id,
        "inference_time_ms": inference_time_ms,
        "actions": actions,
        "action_period_sec": chunk.action_period_sec,
    }
    _reject_non_finite(body)
    return body


def action_to_response(
    action: PolicyAction,
    request_id: Optional[str] = None,
    inference_time_ms: Optional[float] = None,
) -> dict:
    """The full answer for a single action: a chunk of one."""
    return chunk_to_response(ActionChunk.of(action), request_id, inference_time_ms)


def action_from_wire(model: ActionModel, reference_frame: Optional[str] = None) -> PolicyAction:
    """The PolicyAction of a validated action object; ``reference_frame`` replaces its own."""
    return PolicyAction(
        reference_frame=model.reference_frame if reference_frame is None else reference_frame,
        eef_target=pose_from_wire(model.eef_target_pose) if model.has_eef_target else None,
        eef_target_mode=EefTargetMode(model.eef_target_mode),
        joint_deltas=tuple(model.joint_deltas) if model.has_joint_deltas else None,
        gripper_command=model.gripper_command if model.gripper_active else None,
        base_velocity_hint=(
            twist_from_wire(model.base_velocity_hint) if model.has_base_hint else None
        ),
        confidence=model.confidence,
        joint_positions=tuple(model.joint_positions) if model.has_joint_positions else None,
        joint_names=tuple(model.joint_names) if model.joint_names else None,
    )


def response_to_action(response: InferResponse) -> PolicyAction:
    """The answer's top-level action (the chunk's first)."""
    return action_from_wire(response)


def response_to_chunk(
    response: InferResponse, reference_frame: Optional[str] = None
) -> ActionChunk:
    """The answer's chunk: ``actions`` with ``action_period_sec``, or a chunk of one of the
    top-level action when the answer has none (upstream's, older servers'). An answer whose
    actions name different frames is refused (ValueError) unless ``reference_frame``
    replaces them all."""
    if response.actions is None or response.action_period_sec is None:
        return ActionChunk.of(action_from_wire(response, reference_frame))
    return ActionChunk(
        tuple(action_from_wire(action, reference_frame) for action in response.actions),
        response.action_period_sec,
    )


def _reject_non_finite(value: Any) -> None:
    """A backend must never put NaN/inf on the wire (JSON cannot carry it)."""
    steps = _steps_to_non_finite(value)
    if steps is not None:
        path = ""
        for step in reversed(steps):
            path += f"[{step}]" if isinstance(step, int) else f"{'.' if path else ''}{step}"
        raise ValueError(f"non-finite value in response field {path or 'body'}")


def _steps_to_non_finite(value: Any) -> Optional[list]:
    """The keys and indexes down to the first NaN/inf, innermost first; None if there
    is none (the path is only built on the way back from a find)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else []
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ()
    )
    for step, item in items:
        steps = _steps_to_non_finite(item)
        if steps is not None:
            steps.append(step)
            return steps
    return None
