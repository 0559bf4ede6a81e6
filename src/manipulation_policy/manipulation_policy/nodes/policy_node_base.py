"""What both policy nodes share: inputs, the rate, the worker, parameters, publishing.

The nodes differ only in their *action source*, a callable
``Observation -> ActionChunk | PolicyAction | None``: the in-process node calls
a backend, the remote node calls the policy server. A chunk goes onto the
action timeline of a ``robot.executor.ChunkExecutor`` on the node clock (the
same code in both nodes): it is published whole on ``chunk_topic``, and each
step as a PolicyOutput when it is due, by the worker on arrival and by a
timer every EXECUTOR_TICK_SEC after; a chunk of one goes out on arrival, as
before chunks existed. A PolicyAction (a failure's hold) is published at
once and ends the plan; None publishes nothing. The next frame goes to the
worker only when the timeline has no more than ``refill_horizon_sec`` left.

Threading: subscriptions only store the newest message. The newest fresh frame
goes to one worker thread that runs the action source and publishes; while the
worker is busy, frames are skipped (never queued), so the executor thread that
receives images and joint states never waits for inference.

Rate: a frame is handed over as soon as it arrives, unless the previous one
was handed over less than one period (1 / ``inference_rate``) ago; a timer at
``inference_rate`` picks up a frame that arrived inside that window. Waiting
for the timer alone would add up to a whole period of latency to every output.
These decisions (rate, task, staleness, which EEF pose goes along) are made
by ``scheduling.FrameScheduler``; this module is the ROS glue around it.

Inputs: the raw topics (camera, joint states, end-effector pose) and, with
``use_observation``, the aggregated ``manipulation_msgs/Observation`` of a
perception node; ``observation_inputs.select_inputs`` chooses between them
by the aggregated observation's freshness, each time a frame may go.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar, Union

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterValueException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from manipulation_msgs.msg import Observation as ObservationMsg
from manipulation_msgs.msg import PolicyActionChunk, PolicyOutput
from manipulation_policy.core.policy_types import (
    ActionChunk,
    JointStateData,
    Observation,
    PolicyAction,
)
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.nodes.parameter_declarations import (
    as_declared_type,
    descriptor_for,
    refusal_reason,
)
from manipulation_policy.robot.executor import ChunkExecutor, DueCommand
from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    EXECUTOR_PARAMETERS,
    UPSTREAM_PARAMETER_NAMES,
    ParameterSpec,
    executor_settings,
    reason_to_refuse,
    resolve_upstream_parameters,
    specs_by_name,
)
from manipulation_policy.robot.observation_inputs import (
    AggregatedObservation,
    Inputs,
    ObservationSettings,
    Source,
    select_inputs,
)
from manipulation_policy.robot.scheduling import (
    EefUse,
    FrameInfo,
    FrameScheduler,
    ScheduleSettings,
    StampedPose,
    Verdict,
    task_active_at_start,
)

# An ActionChunk goes onto the executor's timeline; a PolicyAction (a failure's hold) is
# published at once; None publishes nothing.
ActionSource = Callable[[Observation], Union[ActionChunk, PolicyAction, None]]

LOG_THROTTLE_SEC = 5.0
# How often due steps of the action timeline are looked for (and published).
EXECUTOR_TICK_SEC = 0.01
EXECUTOR_DIAGNOSTICS_PERIOD_SEC = 1.0
DIAGNOSTICS_TOPIC = "/diagnostics"
REMEMBERED_CHUNKS = 64
EXECUTOR_PARAMETER_NAMES = frozenset(spec.name for spec in EXECUTOR_PARAMETERS)
WORKER_STOP_TIMEOUT_SEC = 5.0
SECRET_PARAMETERS = frozenset({"remote_api_key"})

Job = TypeVar("Job")


class SkippingWorker(Generic[Job]):
    """One thread that runs ``handle`` on one job at a time; refuses jobs while busy."""

    def __init__(self, handle: Callable[[Job], None], name: str):
        self._handle = handle
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._busy = False
        self._job: Optional[Job] = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy

    def try_submit(self, job: Job) -> bool:
        with self._lock:
            if self._busy or self._stopping:
                return False
            self._busy = True
            self._job = job
        self._wake.set()
        return True

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_SEC) -> bool:
        """Stop after the current job; True if the thread ended within ``timeout``."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._stopping:
                    return
                job, self._job = self._job, None
            try:
                if job is not None:
                    self._handle(job)
            except Exception:  # noqa: BLE001 - the handler reports its own errors; the
                pass  # thread must live on for the next job whatever happened
            finally:
                with self._lock:
                    self._busy = False


@dataclass(frozen=True)
class _Frame:
    msg: Any  # sensor_msgs Image or CompressedImage, converted on the worker
    info: FrameInfo
    stamp: Any  # builtin_interfaces/Time of the image: the outputs' stamp


@dataclass(frozen=True)
class _ChunkInfo:
    """What a published command needs to know of the chunk it comes from."""

    stamp: Any  # builtin_interfaces/Time of the observation
    stamp_ns: int
    length: int
    period: float


@dataclass(frozen=True)
class _Job:
    frame: _Frame
    observation: Observation  # image still None: decoded on the worker
    task_generation: int = 0


class PolicyNodeBase(Node):
    """The shared node; subclasses supply the action source through two hooks.

    - ``create_action_source()``: called once, after parameters are declared.
    - ``parameters_changed(changed)``: called after live parameters were accepted.
    """

    # remote_policy_node sets this: upstream's use_remote:=true then means "this node".
    remote = False

    def __init__(self, node_name: str, extra_parameters: Sequence[ParameterSpec], **node_kwargs):
        super().__init__(node_name, **node_kwargs)
        self._specs = specs_by_name(COMMON_PARAMETERS, extra_parameters)
        # A task is what the node acts on: the instruction, until max_steps decisions
        # were published or an empty instruction message cleared it.
        self._scheduler = FrameScheduler(
            time.monotonic_ns, lambda: self.get_clock().now().nanoseconds, task_active=False
        )
        self._values_lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._ready = False
        self._closing = False
        self._state_lock = threading.Lock()
        self._latest_frame: Optional[_Frame] = None
        self._latest_joint_state = JointStateData()
        self._latest_eef_pose: Optional[StampedPose] = None
        self._latest_aggregate: Optional[AggregatedObservation[_Frame]] = None
        self._frame_sequence = 0  # frames of both sources, in arrival order
        self._input_source: Optional[Source] = None  # of the last decision (logged on change)
        self._observation_subscription = None
        self._reported_encodings: set[str] = set()
        self._counters = {
            "images": 0,
            "joint_states": 0,
            "observations": 0,
            "from_observation": 0,
            "unsupported_images": 0,
            "inferences": 0,
            "published": 0,
            "no_action": 0,
            "publish_failed": 0,
            "chunks_accepted": 0,
            "chunks_refused": 0,
            "underrun_holds": 0,
        }

        # Registered before declaring, so invalid start values are refused too.
        self.add_on_set_parameters_callback(self._on_set_parameters)
        upstream = self._declare_upstream_parameters()
        self._prepare_start_values()
        for spec in self._specs.values():
            self.declare_parameter(
                spec.name, upstream.defaults.get(spec.name, spec.default), descriptor_for(spec)
            )
        with self._values_lock:
            self._values = {
                name: spec.normalized(self.get_parameter(name).value)
                for name, spec in self._specs.items()
            }
        values = self.parameter_values()
        for note in upstream.notes:
            self.get_logger().warning(note)
        if task_active_at_start(values["wait_for_task"], upstream.task_given):
            self._scheduler.start_task()
        # Action chunks on a timeline by the node clock (robot/executor.py).
        self._executor = ChunkExecutor(
            lambda: self.get_clock().now().nanoseconds / 1e9, executor_settings(values)
        )
        self._request_numbers = itertools.count(1)
        self._chunks_lock = threading.Lock()
        self._chunks: dict[str, _ChunkInfo] = {}  # request id -> its accepted chunk
        self._reported_underruns = 0

        self.action_source: ActionSource = self.create_action_source()

        camera_topic = values["camera_topic"]
        if values["image_transport"].strip().lower() == "compressed":
            camera_topic = camera_topic.rstrip("/") + "/compressed"
            self.create_subscription(
                CompressedImage, camera_topic, self._on_compressed_image, qos_profile_sensor_data
            )
        else:
            self.create_subscription(Image, camera_topic, self._on_image, qos_profile_sensor_data)
        self._camera_topic = camera_topic
        # Sensor-data QoS (best effort) matches reliable and best-effort publishers alike.
        self.create_subscription(
            JointState, values["joint_states_topic"], self._on_joint_state, qos_profile_sensor_data
        )
        self.create_subscription(
            PoseStamped, values["eef_pose_topic"], self._on_eef_pose,
            qos_profile_sensor_data,
        )
        self._observation_topic = values["observation_topic"]
        if values["use_observation"]:
            self._subscribe_to_observations()
        self._task_topic = values["instruction_topic"]
        self.create_subscription(String, values["instruction_topic"], self._on_instruction, 10)
        self._publisher = self.create_publisher(PolicyOutput, values["output_topic"], 10)
        self._chunk_publisher = self.create_publisher(
            PolicyActionChunk, values["chunk_topic"], 10
        )
        self._executor_diagnostics = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        self.create_timer(EXECUTOR_TICK_SEC, self._on_executor_tick)
        self.create_timer(EXECUTOR_DIAGNOSTICS_PERIOD_SEC, self._publish_executor_diagnostics)

        self._worker: SkippingWorker[_Job] = SkippingWorker(self._run_job, f"{node_name}_worker")
        self._timer = self.create_timer(1.0 / values["inference_rate"], self._on_tick)
        self._ready = True
        self.get_logger().info(
            f"listening to {camera_topic} ({values['image_transport']})"
            + (f" and {self._observation_topic} (aggregated observation)"
               if values["use_observation"] else "")
            + f", publishing {values['output_topic']} at {values['inference_rate']:g} Hz; "
            f"tasks on {self._task_topic}"
        )

    # ------------------------------------------------------------ hooks

    def create_action_source(self) -> ActionSource:
        raise NotImplementedError

    def parameters_changed(self, changed: dict[str, Any]) -> None:
        """Live parameters in ``changed`` were just accepted (values already current)."""

    # ------------------------------------------------------------ parameters

    def declare_optional_start_parameters(
        self, names: Iterable[str], description: str
    ) -> dict[str, Any]:
        """Declare ``names`` unset, of any type and read-only; the ones given at start."""
        given = {}
        for name in names:
            value = self.declare_parameter(
                name,
                None,
                ParameterDescriptor(description=description, dynamic_typing=True, read_only=True),
            ).value
            if value is not None:
                given[name] = value
        return given

    def _declare_upstream_parameters(self):
        """Declare upstream MobileManipulationCore's parameter names (unset by default,
        read-only) and say what the ones given mean here."""
        given = self.declare_optional_start_parameters(
            UPSTREAM_PARAMETER_NAMES,
            "upstream MobileManipulationCore name, deprecated (read at start)",
        )
        return resolve_upstream_parameters(given, remote=self.remote)

    def declare_start_parameters(self, specs: Sequence[ParameterSpec]) -> None:
        """Declare those of ``specs`` not declared yet (a plugin backend's options, known
        once ``backend`` is read), their start values checked as the others' are."""
        added = {spec.name: spec for spec in specs if spec.name not in self._specs}
        self._specs.update(added)
        self._prepare_start_values(added)
        for spec in added.values():
            self.declare_parameter(spec.name, spec.default, descriptor_for(spec))
        with self._values_lock:
            self._values.update({
                name: spec.normalized(self.get_parameter(name).value)
                for name, spec in added.items()
            })

    def _prepare_start_values(self, specs: Optional[dict[str, ParameterSpec]] = None) -> None:
        """Start values (parameter_overrides, -p, params files) as declared: an integer for
        a double becomes a double; a bad one stops the node with the spec's reason, not
        rclpy's "wrong parameter type". rclpy keeps them in ``_parameter_overrides`` from
        Humble on; declaring reads them there."""
        overrides = getattr(self, "_parameter_overrides", None)
        if not isinstance(overrides, dict):
            return
        for name, spec in (self._specs if specs is None else specs).items():
            given = overrides.get(name)
            if given is None:
                continue
            given = as_declared_type(spec, given)
            reason = refusal_reason(spec, given.value, started=False)
            if reason is not None:
                raise InvalidParameterValueException(name, given.value, reason)
            overrides[name] = given

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        return [self.set_parameters_atomically([parameter]) for parameter in parameter_list]

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """rclpy's, with integers for doubles made doubles and the specs asked first.

        The parameter services (``ros2 param set``, parameter clients) call this too."""
        # getattr: rclpy's Node.__init__ may set parameters before ours has run.
        specs, started = getattr(self, "_specs", {}), getattr(self, "_ready", False)
        parameters = [as_declared_type(specs.get(p.name), p) for p in parameter_list]
        for parameter in parameters:
            reason = refusal_reason(specs.get(parameter.name), parameter.value, started)
            if reason is not None:
                self.get_logger().warning(f"refused parameter change: {reason}")
                return SetParametersResult(successful=False, reason=reason)
        return super().set_parameters_atomically(parameters)

    def parameter_values(self) -> dict[str, Any]:
        """A snapshot of the current values of this node's parameters."""
        with self._values_lock:
            return dict(self._values)

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        changes = {p.name: p.value for p in parameters if p.name in self._specs}
        reason = reason_to_refuse(self._specs, changes)
        changes = {name: self._specs[name].normalized(value) for name, value in changes.items()}
        if reason is not None:
            if self._ready:
                self.get_logger().warning(f"refused parameter change: {reason}")
            return SetParametersResult(successful=False, reason=reason)
        if self._ready and changes:
            self._apply(changes)
        return SetParametersResult(successful=True)

    def _apply(self, changes: dict[str, Any]) -> None:
        with self._values_lock:
            self._values.update(changes)
        if EXECUTOR_PARAMETER_NAMES.intersection(changes):
            self._executor.update_settings(executor_settings(self.parameter_values()))
        if "instruction" in changes:
            self._start_task(changes["instruction"])
        if "use_observation" in changes:
            if changes["use_observation"]:
                self._subscribe_to_observations()
            else:
                with self._state_lock:
                    self._latest_aggregate = None
        if "inference_rate" in changes:
            # Recreated rather than re-periodised: Humble's Timer has no period setter.
            self.destroy_timer(self._timer)
            self._timer = self.create_timer(1.0 / changes["inference_rate"], self._on_tick)
        shown = {k: ("***" if k in SECRET_PARAMETERS and v else v) for k, v in changes.items()}
        self.get_logger().info(f"parameters changed: {shown}")
        self.parameters_changed(changes)

    # ------------------------------------------------------------ inputs

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot: inputs received, frames skipped (stale, busy), inferences, outputs."""
        with self._state_lock:
            counters = dict(self._counters)
        counters.update(self._scheduler.counts())
        return counters

    def _count(self, name: str) -> None:
        with self._state_lock:
            self._counters[name] += 1

    def _new_frame(self, msg, stamp) -> _Frame:
        """A received image as a frame; call with the state lock held."""
        self._frame_sequence += 1
        info = FrameInfo(self._frame_sequence, ros_conversion.stamp_to_nanoseconds(stamp))
        return _Frame(msg, info, stamp)

    def _store_frame(self, msg) -> None:
        with self._state_lock:
            self._counters["images"] += 1
            self._latest_frame = self._new_frame(msg, msg.header.stamp)
        if self._ready:
            self._dispatch_newest()

    def _usable_image(self, msg: Image, topic: str) -> bool:
        """False (and an error logged once per encoding) for an encoding we cannot convert."""
        encoding = ros_conversion.unsupported_encoding(msg)
        if encoding is None:
            return True
        with self._state_lock:
            self._counters["unsupported_images"] += 1
            first_time = encoding not in self._reported_encodings
            self._reported_encodings.add(encoding)
        if first_time:
            self.get_logger().error(
                f"unsupported image encoding {encoding!r} on {topic}; such "
                "frames are skipped (supported: rgb8, bgr8, rgba8, bgra8, mono8)"
            )
        return False

    def _on_image(self, msg: Image) -> None:
        if self._usable_image(msg, self._camera_topic):
            self._store_frame(msg)

    def _on_compressed_image(self, msg: CompressedImage) -> None:
        self._store_frame(msg)

    def _on_joint_state(self, msg: JointState) -> None:
        state = ros_conversion.joint_state_to_data(msg)
        with self._state_lock:
            self._counters["joint_states"] += 1
            self._latest_joint_state = state

    def _subscribe_to_observations(self) -> None:
        """Subscribe to observation_topic, once (use_observation on, at start or later).
        Sensor-data QoS matches upstream's reliable perception publisher too."""
        if self._observation_subscription is None:
            self._observation_subscription = self.create_subscription(
                ObservationMsg, self._observation_topic, self._on_observation,
                qos_profile_sensor_data,
            )

    def _on_observation(self, msg: ObservationMsg) -> None:
        if not self.parameter_values()["use_observation"]:
            return
        image_usable = msg.has_rgb_image and self._usable_image(
            msg.rgb_image, f"{self._observation_topic} (rgb_image)"
        )
        parts_without_frame = Inputs(
            joint_state=ros_conversion.observation_joint_state(msg),
            eef=ros_conversion.observation_eef_pose(msg),
        )
        stamp_ns = ros_conversion.stamp_to_nanoseconds(msg.header.stamp)
        with self._state_lock:
            self._counters["observations"] += 1
            frame = (
                self._new_frame(msg.rgb_image, ros_conversion.observation_image_stamp(msg))
                if image_usable else None
            )
            self._latest_aggregate = AggregatedObservation(
                stamp_ns, Inputs(frame, parts_without_frame.joint_state, parts_without_frame.eef)
            )
        if self._ready:
            self._dispatch_newest()

    def _on_eef_pose(self, msg) -> None:
        pose = ros_conversion.pose_stamped_to_pose(msg)
        stamp_ns = ros_conversion.stamp_to_nanoseconds(msg.header.stamp)
        with self._state_lock:
            self._latest_eef_pose = StampedPose(pose, stamp_ns, msg.header.frame_id)

    def _on_instruction(self, msg: String) -> None:
        if not msg.data.strip():
            # Upstream's "stop"/"clear": an empty task ends the current one.
            self._executor.clear()
            if self._scheduler.clear_task():
                self.get_logger().info(f"task cleared; waiting for a task on {self._task_topic}")
            return
        # Through the parameter, so `ros2 param get` shows it and validation applies;
        # accepting it starts a new task (_apply).
        result = self.set_parameters([Parameter("instruction", value=msg.data.strip())])[0]
        if not result.successful:
            self.get_logger().warning(f"instruction message refused: {result.reason}")

    def _start_task(self, instruction: str) -> None:
        self._executor.clear()  # steps planned for the previous task are not published
        self._scheduler.start_task()
        steps = self.parameter_values()["max_steps"]
        self.get_logger().info(
            f"task: {instruction!r} ("
            + (f"{steps} decisions)" if steps > 0 else "until cleared)")
        )

    def _count_task_step(self, generation: int) -> None:
        """One decision of the task ``generation`` was published; end it at max_steps."""
        max_steps = self.parameter_values()["max_steps"]
        if self._scheduler.count_step(generation, max_steps):
            self.get_logger().info(
                f"task reached max_steps={max_steps}; waiting for the next task on "
                f"{self._task_topic}"
            )

    @property
    def task_active(self) -> bool:
        return self._scheduler.task_active

    # ------------------------------------------------------------ the rate

    def _on_tick(self) -> None:
        self._dispatch_newest()

    def _dispatch_newest(self) -> None:
        """Hand the newest frame to the worker if the scheduler and the worker allow.

        Runs in the image callback and the timer, never concurrently with itself: all
        of the node's callbacks share its default, mutually exclusive callback group.
        """
        if self._executor.remaining_sec() > self._executor.refill_horizon_sec() + 1e-6:
            return  # the action timeline has enough left: the next observation waits
        values = self.parameter_values()
        with self._state_lock:
            raw = Inputs(self._latest_frame, self._latest_joint_state, self._latest_eef_pose)
            aggregate = self._latest_aggregate
        selection = select_inputs(
            aggregate, raw, self.get_clock().now().nanoseconds,
            ObservationSettings.from_values(values),
        )
        self._log_input_source(selection)
        frame = selection.frame
        decision = self._scheduler.decide(
            frame.info if frame is not None else None,
            selection.eef_candidates,
            ScheduleSettings.from_values(values),
        )
        if decision.verdict is not Verdict.HAND_OVER:
            self._log_held_back(decision, values)
            return
        assert frame is not None
        if decision.eef is EefUse.WRONG_FRAME:
            self.get_logger().warning(
                f"end-effector pose is in {decision.eef_frame_id!r}, not reference_frame "
                f"{values['reference_frame']!r}; ignored",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        observation = Observation(
            joint_state=selection.joint_state,
            image=None,
            reference_frame=values["reference_frame"],
            instruction=values["instruction"],
            eef_pose=decision.eef_pose,
        )
        accepted = self._worker.try_submit(_Job(frame, observation, decision.task_generation))
        self._scheduler.handed_over(frame.info, accepted)
        if accepted and selection.source is Source.AGGREGATED:
            self._count("from_observation")

    def _log_input_source(self, selection) -> None:
        """Say when the inputs switch between the aggregated observation and the raw topics
        (not the start on the raw topics: a robot without a perception node stays there)."""
        source, previous = selection.source, self._input_source
        self._input_source = source
        if source is previous or (previous is None and source is not Source.AGGREGATED
                                  and source is not Source.RAW_STALE):
            return
        if source is Source.AGGREGATED:
            self.get_logger().info(
                f"inputs: the aggregated observation on {self._observation_topic} (the raw "
                "topics fill in the parts it lacks)",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif source is Source.RAW_STALE:
            age = selection.observation_age_ns
            values = self.parameter_values()
            self.get_logger().warning(
                f"inputs: the raw topics; the aggregated observation on "
                f"{self._observation_topic} is "
                + ("stamped zero" if age is None else f"{age / 1e9:.3f} s old")
                + f" (observation_timeout_sec={values['observation_timeout_sec']:g}, "
                f"max_observation_age_sec={values['max_observation_age_sec']:g}). Check the "
                "perception node and that its clock matches this node's.",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif previous is not None:
            self.get_logger().info(f"inputs: {source.value}")

    def _log_held_back(self, decision, values: dict[str, Any]) -> None:
        if decision.verdict is Verdict.NO_TASK:
            self.get_logger().info(
                f"waiting for a task on {self._task_topic}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif decision.verdict is Verdict.NO_FRAME:
            self.get_logger().info(
                f"waiting for images on {self._camera_topic}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        elif decision.verdict is Verdict.STALE:
            self.get_logger().warning(
                f"newest image is {decision.frame_age_ns / 1e9:.3f} s old "
                f"(max_observation_age_sec={values['max_observation_age_sec']:g}); not used. "
                "Check the camera and that its clock matches this node's.",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )

    # ------------------------------------------------------------ the worker

    def action_on_failure(self, observation: Observation) -> Optional[PolicyAction]:
        """What to publish when a cycle fails (the policy raised, or its action could not
        be published): None publishes nothing; a subclass may answer a safe hold."""
        return None

    def _run_job(self, job: _Job) -> None:
        try:
            if isinstance(job.frame.msg, CompressedImage):
                image = ros_conversion.compressed_image_to_rgb(job.frame.msg)
            else:
                image = ros_conversion.image_to_rgb(job.frame.msg)
        except Exception as exc:  # noqa: BLE001 - a bad frame ends this cycle, not the worker
            self.get_logger().error(
                f"camera frame not usable: {exc}", throttle_duration_sec=LOG_THROTTLE_SEC
            )
            return
        observation = Observation(
            joint_state=job.observation.joint_state,
            image=image,
            reference_frame=job.observation.reference_frame,
            instruction=job.observation.instruction,
            eef_pose=job.observation.eef_pose,
        )
        self._count("inferences")
        request_id = self.new_request_id()
        self._executor.request_sent(request_id)
        try:
            answer = self.call_action_source(observation, request_id)
        except Exception as exc:  # a policy failure must not end the worker thread
            self.get_logger().error(
                f"policy failed: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            answer = self._fallback_action(observation)
        if isinstance(answer, ActionChunk):
            if self._take_chunk(answer, job, request_id):
                return
            answer = self._fallback_action(observation)
            if answer is None:
                return
        else:
            self._executor.request_failed(request_id)
            if isinstance(answer, PolicyAction) and answer.is_hold:
                # A failure's hold ends the plan: no step of an older chunk follows it.
                self._executor.clear()
        if answer is None:
            self._count("no_action")
            return
        if self._publish(answer, job, request_id):
            return
        fallback = self._fallback_action(observation)
        if fallback is not None and fallback != answer:
            self._publish(fallback, job, request_id)

    def _fallback_action(self, observation: Observation) -> Optional[PolicyAction]:
        try:
            return self.action_on_failure(observation)
        except Exception:  # noqa: BLE001 - no fallback then
            return None

    def new_request_id(self) -> str:
        """A fresh id for the next observation sent to the policy."""
        return f"{self.get_name()}-{next(self._request_numbers)}"

    def call_action_source(self, observation: Observation, request_id: str) -> Any:
        """Run the action source on ``observation`` (sent as ``request_id``)."""
        return self.action_source(observation)

    def _publish(self, action: PolicyAction, job: _Job, request_id: str = "") -> bool:
        """Publish ``action`` for ``job``'s frame at once; False (logged) when it cannot be."""
        stamp_ns = ros_conversion.stamp_to_nanoseconds(job.frame.stamp)
        return self._send(
            lambda: ros_conversion.command_to_policy_output(
                action, job.frame.stamp, stamp_ns, 0, 1, request_id
            ),
            job.task_generation,
        )

    def _send(self, build: Callable[[], PolicyOutput], task_generation: Optional[int]) -> bool:
        try:
            msg = build()
            if not self._closing:
                self._publisher.publish(msg)
                self._count("published")
                if task_generation is not None:
                    self._count_task_step(task_generation)
            return True
        except Exception as exc:  # noqa: BLE001 - e.g. text ROS cannot carry: this cycle fails
            self._count("publish_failed")
            self.get_logger().error(
                f"policy output not publishable: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            return False

    # ------------------------------------------------------------ the action timeline

    def _take_chunk(self, chunk: ActionChunk, job: _Job, request_id: str) -> bool:
        """Put an answered chunk on the timeline, publish it whole on the chunk topic and
        its steps due now; False when the chunk was refused or could not be published."""
        stamp_ns = ros_conversion.stamp_to_nanoseconds(job.frame.stamp)
        acceptance = self._executor.accept(chunk, stamp_ns / 1e9, request_id)
        if not acceptance.accepted:
            self._count("chunks_refused")
            self.get_logger().warning(
                f"action chunk not used: {acceptance.verdict.value} ({acceptance.detail})",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            return True  # nothing to publish for it, and nothing failed
        self._count("chunks_accepted")
        with self._chunks_lock:
            self._chunks[request_id] = _ChunkInfo(
                job.frame.stamp, stamp_ns, len(chunk), chunk.action_period_sec
            )
            while len(self._chunks) > REMEMBERED_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))
        try:
            if not self._closing:
                self._chunk_publisher.publish(
                    ros_conversion.chunk_to_msg(chunk, job.frame.stamp, request_id)
                )
        except Exception as exc:  # noqa: BLE001 - unpublishable: its steps will fail too
            self._count("publish_failed")
            self.get_logger().error(
                f"action chunk not publishable: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        published = self._publish_due()
        if published:
            self._count_task_step(job.task_generation)
        return published is not False

    def _publish_due(self) -> Optional[bool]:
        """Publish the commands due now: None when none was, else whether all went out."""
        commands = self._executor.due()
        if not commands:
            return None
        return all([self._publish_command(command) for command in commands])

    def _publish_command(self, command: DueCommand) -> bool:
        with self._chunks_lock:
            info = self._chunks.get(command.request_id)
        if info is None:  # forgotten (cannot happen with REMEMBERED_CHUNKS > 1)
            return False
        if command.is_underrun_hold:
            step, due_ns = info.length, round(command.due_sec * 1e9)
            self._count("underrun_holds")
            self.get_logger().warning(
                "action timeline ran dry before the next chunk arrived: publishing a hold "
                f"(underruns so far: {self.counters['underrun_holds']}; refill_horizon_sec "
                f"in effect {self._executor.refill_horizon_sec():.3f})",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
        else:
            step = command.step_index
            due_ns = ros_conversion.step_due_nanoseconds(info.stamp_ns, step, info.period)
        return self._send(
            lambda: ros_conversion.command_to_policy_output(
                command.action, info.stamp, due_ns, step, info.length, command.request_id
            ),
            None,
        )

    def _on_executor_tick(self) -> None:
        """Publish due steps; when the timeline is about to run dry, send the next frame."""
        self._publish_due()
        if self._worker.busy:
            return
        remaining = self._executor.remaining_sec()
        if 0.0 < remaining <= self._executor.refill_horizon_sec() + 1e-6:
            self._dispatch_newest()

    @property
    def chunk_executor(self) -> ChunkExecutor:
        return self._executor

    def _publish_executor_diagnostics(self) -> None:
        counts = self._executor.counts()
        underruns = counts["underruns"]
        status = DiagnosticStatus()
        status.name = f"{self.get_fully_qualified_name()}: action executor"
        status.hardware_id = self.get_fully_qualified_name()
        if underruns > self._reported_underruns:
            status.level = DiagnosticStatus.WARN
            status.message = f"{underruns - self._reported_underruns} underrun(s): holds published"
        else:
            status.level = DiagnosticStatus.OK
            status.message = "ok"
        self._reported_underruns = underruns
        settings = self._executor.settings
        status.values = [KeyValue(key=name, value=str(value)) for name, value in counts.items()]
        status.values += [
            KeyValue(key="chunk_merge", value=settings.chunk_merge.value),
            KeyValue(key="refill_horizon_sec", value=f"{self._executor.refill_horizon_sec():.3f}"),
            KeyValue(key="remaining_sec", value=f"{self._executor.remaining_sec():.3f}"),
        ]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        if not self._closing:
            self._executor_diagnostics.publish(msg)

    # ------------------------------------------------------------ shutdown

    def close_action_source(self) -> None:
        close = getattr(self.action_source, "close", None)
        if callable(close):
            close()

    def destroy_node(self) -> None:
        if self._closing:
            return
        self._closing = True
        if hasattr(self, "_worker"):
            if hasattr(self, "action_source"):
                self.close_action_source()
            if not self._worker.stop():
                self.get_logger().warning("policy worker still busy at shutdown; left behind")
        super().destroy_node()


def run_node(factory: Callable[[], Node], args: Optional[list[str]] = None) -> int:
    """main() of a policy node: spin until Ctrl-C or shutdown; clear errors, no tracebacks."""
    rclpy.init(args=args)
    executor = SingleThreadedExecutor()
    node = None
    try:
        node = factory()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, ParameterException) as exc:
        # Bad start parameters, unknown backend, unloadable model: say which and stop.
        print(f"error: {exc}", flush=True)
        return 2
    except Exception:
        if rclpy.ok():
            raise
        # Ctrl-C while starting (e.g. loading a model): rclpy shut the context down under us.
    finally:
        # `ros2 launch` forwards Ctrl-C as a second SIGINT, which would interrupt the
        # cleanup (an in-flight inference may take a moment) with a traceback.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.destroy_node()
        executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown()
    return 0
