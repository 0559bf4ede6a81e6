"""The HTTP wire contract between the robot-side client and the policy server.

Request and response field names, types and defaults are those of the
original remote-server guide; the optional extensions (instruction, eef_pose,
request_id; eef_target_mode, request_id, inference_time_ms) are never
required. Unknown request fields are ignored. Every request the upstream
MobileManipulationCore client sends is understood: ``task``/``task_text`` as
the instruction, NaN/Infinity in joint arrays as unknown values, its
``openvla_*`` scaling and clipping fields (within ``MAX_REQUEST_SCALE``).
Conversions to and from the plain types of ``policy_types`` live here too, so
the server and the client share one definition.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_base64_image,
    encode_base64_jpeg,
)
from manipulation_policy.core.policy_types import (
    DEFAULT_REFERENCE_FRAME,
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
        # A short-circuit ValueError here becomes a 422 naming joint_states.<field>.
        count = len(self.name)
        for field_name in ("position", "velocity", "effort"):
            values = getattr(self, field_name)
            if values and len(values) != count:
                raise InputError(
                    f"joint_states.{field_name}",
                    f"has {_count(len(values), 'value')} for {_count(count, 'joint name')}",
                )
        return self


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


class InferRequest(_WireModel):
    # Bounded like the answer's frame, which echoes it.
    reference_frame: Annotated[Text, Field(max_length=MAX_FRAME_LENGTH)] = DEFAULT_REFERENCE_FRAME
    joint_states: JointStatesModel = Field(default_factory=JointStatesModel)
    image: Optional[Text] = Field(default=None, description="base64-encoded JPEG (or PNG)")
    image_encoding: Optional[Text] = Field(
        default=None, description="jpeg or png; when absent, detected from the image bytes"
    )
    image_width: Optional[Annotated[int, Field(strict=True, ge=1, le=MAX_IMAGE_SIDE)]] = None
    image_height: Optional[Annotated[int, Field(strict=True, ge=1, le=MAX_IMAGE_SIDE)]] = None
    # Optional extensions.
    instruction: Optional[InstructionText] = None
    eef_pose: Optional[PoseModel] = None
    request_id: Optional[Annotated[str, Field(strict=True, max_length=128)]] = None
    # Upstream MobileManipulationCore's names and per-request action settings.
    task: Optional[InstructionText] = Field(default=None, description="upstream's instruction")
    task_text: Optional[InstructionText] = Field(default=None, description="upstream's too")
    openvla_xyz_scaling: Optional[Scale] = None
    openvla_rotation_scaling: Optional[Scale] = None
    openvla_clip_actions: Optional[Annotated[bool, Field(strict=True)]] = None
    openvla_position_bounds: Optional[BoundsPair] = None
    openvla_rotation_bounds: Optional[BoundsPair] = None
    openvla_gripper_bounds: Optional[BoundsPair] = None

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
            norm_squared = q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w
            if not (math.isfinite(norm_squared) and norm_squared > 1e-12):
                raise InputError(
                    "eef_pose.orientation",
                    f"quaternion ({q.x}, {q.y}, {q.z}, {q.w}) is not a rotation; "
                    "its length must be non-zero and finite",
                )
        return self


BOUNDS_FIELDS = ("openvla_position_bounds", "openvla_rotation_bounds", "openvla_gripper_bounds")


class InferResponse(_WireModel):
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
    request_id: Optional[Annotated[Text, Field(max_length=128)]] = None
    inference_time_ms: Optional[Annotated[Number, Field(ge=0.0)]] = None


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
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):
        return cause
    return InputError(field_path(tuple(error["loc"])), error["msg"])


def _validated(model: type[ModelT], payload: Any, what: str) -> ModelT:
    if not isinstance(payload, dict):
        raise InputError("body", f"{what} body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise first_input_error(exc) from None


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
    """Decode a validated request into an Observation (decodes the image)."""
    image = None
    if request.image is not None:
        image = decode_base64_image(
            request.image,
            request.image_encoding,
            request.image_width,
            request.image_height,
            max_image_pixels,
        )
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
    )


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
        height, width = observation.image.shape[:2]
        body["image"] = encode_base64_jpeg(observation.image, jpeg_quality)
        body["image_encoding"] = "jpeg"
        body["image_width"] = int(width)
        body["image_height"] = int(height)
    if observation.instruction:
        body["instruction"] = observation.instruction
    if observation.eef_pose is not None:
        body["eef_pose"] = pose_to_wire(observation.eef_pose)
    if request_id is not None:
        body["request_id"] = request_id
    return body


def action_to_response(
    action: PolicyAction,
    request_id: Optional[str] = None,
    inference_time_ms: Optional[float] = None,
) -> dict:
    """The full PolicyOutput-shaped JSON for an action (every field present)."""
    body = {
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
        "request_id": request_id,
        "inference_time_ms": inference_time_ms,
    }
    _reject_non_finite(body)
    return body


def response_to_action(response: InferResponse) -> PolicyAction:
    return PolicyAction(
        reference_frame=response.reference_frame,
        eef_target=pose_from_wire(response.eef_target_pose) if response.has_eef_target else None,
        eef_target_mode=EefTargetMode(response.eef_target_mode),
        joint_deltas=tuple(response.joint_deltas) if response.has_joint_deltas else None,
        gripper_command=response.gripper_command if response.gripper_active else None,
        base_velocity_hint=(
            twist_from_wire(response.base_velocity_hint) if response.has_base_hint else None
        ),
        confidence=response.confidence,
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
