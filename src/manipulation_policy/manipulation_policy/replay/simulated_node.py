"""A policy node run in simulated time over recorded inputs: what it would have commanded.

The node's own pure parts make every decision: input selection
(``observation_inputs.select_inputs``), the rate, task and freshness rules and the EEF
pose pairing (``scheduling.FrameScheduler``), the observation
(``observation_assembly``), the action timeline (``executor.ChunkExecutor``) and the
safety guard on every command (``safety_guard.SafetyGuard``, ``guarded_commands``).
This module only drives them as ``nodes/node_execution`` and ``nodes/node_publishing``
do, on a clock that is the bag's: a message is received at its recorded (log) time;
the executor's tick (every ``EXECUTOR_TICK_SEC``) and the rate timer fire at their
simulated times in between.

What differs from a live node, by design:

- the rate timer's phase is not in the recording: besides ticking at the rate from the
  first message, it fires the moment the rate lets a held-back frame go, the earliest
  the node's timer could have taken it;
- inference takes no simulated time: the answer arrives at the instant its frame was
  handed over, so a replay is deterministic and two replays of one bag differ only
  by what their policies answered (the wall-clock time of each call is measured and
  reported as its latency). The worker is therefore never busy;
- the node is active from the first message; e-stop, dry run and the input watchdog
  are not replayed (the outputs go to the output and chunk topics);
- an instruction message sets the task as the node does on ``instruction_topic``
  (an empty one clears it), without the parameter service round trip.

Several cameras (``camera_topics``) and the state (``state_joints``,
``state_eef_pose``) go as in the node: sets paired and the state built by
``robot/camera_inputs``; a first-camera frame whose set cannot be made (a camera
missing or off, the state unbuildable) is not sent, and is counted once, with its
reason, in ``skipped_sets`` (a frame later completed by a late camera is sent).
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from manipulation_policy.core.policy_types import (
    ActionChunk,
    JointStateData,
    Observation,
    PolicyAction,
)
from manipulation_policy.robot import message_reading as read
from manipulation_policy.robot.camera_inputs import (
    CameraSet,
    StateLayout,
    camera_specs,
    pair_cameras,
    state_vector,
)
from manipulation_policy.robot.executor import ChunkExecutor, DueCommand
from manipulation_policy.robot.guarded_commands import ChunkOrigin, guard_preview
from manipulation_policy.robot.message_fields import (
    policy_action_chunk_fields,
    policy_output_fields,
)
from manipulation_policy.robot.node_parameters import executor_settings
from manipulation_policy.robot.node_shared import Frame, Job
from manipulation_policy.robot.observation_assembly import (
    observation_to_send,
    observation_without_image,
)
from manipulation_policy.robot.observation_inputs import (
    AggregatedObservation,
    Inputs,
    ObservationSettings,
    select_inputs,
)
from manipulation_policy.robot.safety_guard import (
    GuardContext,
    GuardLimits,
    GuardResult,
    SafetyGuard,
)
from manipulation_policy.robot.scheduling import (
    FrameInfo,
    FrameScheduler,
    ScheduleSettings,
    StampedPose,
    Verdict,
    task_active_at_start,
)

# The node's timer of due steps (nodes/node_execution.EXECUTOR_TICK_SEC).
EXECUTOR_TICK_NS = 10_000_000
REMEMBERED_CHUNKS = 64
MAX_FINISH_ROUNDS = 1000
# Inputs a replay takes, by kind (see bag_input).
CAMERA, JOINT_STATES, EEF_POSE, OBSERVATION, INSTRUCTION = (
    "camera", "joint_states", "eef_pose", "observation", "instruction")
NAMED_CAMERA_PREFIX = CAMERA + ":"


def camera_kind(name: str) -> str:
    """The kind of the frames of the named camera ``name`` (``camera_topics``)."""
    return NAMED_CAMERA_PREFIX + name


class ActionSourceLike(Protocol):
    def new_request_id(self) -> str: ...
    def __call__(self, observation: Observation, request_id: str) -> Any: ...
    def fallback(self, observation: Observation) -> Optional[PolicyAction]: ...
    def take_failure(self) -> str: ...


@dataclass(frozen=True)
class Command:
    """A PolicyOutput the node would have published, at simulated ``time_ns``."""

    time_ns: int
    fields: dict[str, Any]
    action: PolicyAction
    stamp_ns: int
    step_index: int


@dataclass(frozen=True)
class ChunkMessage:
    """A PolicyActionChunk the node would have published, at simulated ``time_ns``."""

    time_ns: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class Request:
    """One observation sent to the policy: its answer's wall-clock latency, or why none."""

    time_ns: int
    request_id: str
    stamp_ns: int
    latency_ms: float
    failure: str = ""


@dataclass
class Counts:
    frames: int = 0
    unsupported_frames: int = 0
    unusable_frames: int = 0
    requests: int = 0
    failed: int = 0
    refused_by_guard: int = 0
    chunks_refused: int = 0
    answers_after_task: int = 0
    underrun_holds: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Outputs:
    """What the replay produced, in publishing order."""

    commands: list[Command] = field(default_factory=list)
    chunks: list[ChunkMessage] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


class SimulatedNode:
    def __init__(
        self,
        values: Mapping[str, Any],
        source: ActionSourceLike,
        on_output: Callable[[Any], None] = lambda item: None,
        robot_id: str = "",
    ):
        """``on_output`` gets each Command, ChunkMessage and Request as it is made;
        ``robot_id`` goes with each observation (the node's fully qualified name)."""
        self._values = dict(values)
        self._robot_id = robot_id
        self._camera_names = tuple(c.name for c in camera_specs(
            self._values["camera_topics"], self._values["camera_names"],
            self._values["image_transport"]))
        self._camera_frames: dict[str, Frame] = {}
        self._state_layout = StateLayout.from_values(self._values)
        # Frames not sent because their set was incomplete: sequence -> the last reason.
        self._skipped: dict[int, str] = {}
        self._source = source
        self._on_output = on_output
        self.outputs = Outputs()
        self.counts = Counts()
        self._now_ns = 0
        self._started = False
        self._next_tick_ns = 0
        self._next_rate_ns = 0
        self._rate_period_ns = round(1e9 / float(self._values["inference_rate"]))
        # When a frame held back by the rate may go (see the module docstring).
        self._rate_retry_ns: Optional[int] = None
        self._last_hand_over_ns: Optional[int] = None
        self._scheduler = FrameScheduler(
            lambda: self._now_ns, lambda: self._now_ns,
            task_active=task_active_at_start(self._values["wait_for_task"], False),
        )
        self._executor = ChunkExecutor(lambda: self._now_ns / 1e9, executor_settings(self._values))
        self._guard = SafetyGuard(GuardLimits.from_values(self._values))
        self._chunks: OrderedDict[str, ChunkOrigin] = OrderedDict()
        self._frame: Optional[Frame] = None
        self._joint_state = JointStateData()
        self._eef: Optional[StampedPose] = None
        self._aggregate: Optional[AggregatedObservation[Frame]] = None
        self._sequence = 0

    def count_summary(self) -> dict[str, int]:
        """The replay's counters and the scheduler's (frames handed over, stale ones)."""
        counts = self.counts.as_dict()
        counts.update(self._scheduler.counts())
        # First-camera frames never sent: their set or the state was incomplete.
        counts["skipped_sets"] = len(self._skipped)
        return counts

    def skipped_reasons(self) -> dict[str, int]:
        """Why frames were not sent (a camera missing or off, the state), how often."""
        return dict(Counter(self._skipped.values()))

    # ------------------------------------------------------------ time

    def advance_to(self, time_ns: int) -> None:
        """Fire the executor's tick and the rate timer due up to ``time_ns``, in order."""
        if not self._started:
            self._started = True
            self._now_ns = time_ns
            self._next_tick_ns = time_ns + EXECUTOR_TICK_NS
            self._next_rate_ns = time_ns + self._rate_period_ns
            return
        while True:
            retry_ns = self._rate_retry_ns if self._rate_retry_ns is not None else math.inf
            next_ns = min(self._next_tick_ns, self._next_rate_ns, retry_ns)
            if next_ns > time_ns:
                break
            self._now_ns = int(next_ns)
            if next_ns == self._next_tick_ns:
                self._next_tick_ns += EXECUTOR_TICK_NS
                self._on_executor_tick()
            else:
                if next_ns == self._next_rate_ns:
                    self._next_rate_ns += self._rate_period_ns
                if next_ns == retry_ns:
                    self._rate_retry_ns = None
                self._dispatch_newest()
        self._now_ns = max(self._now_ns, time_ns)

    def finish(self) -> None:
        """Run on after the last message, as the node would: its rate timer still hands
        over a frame held back by the rate, and the action timeline publishes what it
        planned. Ends when a rate period and the timeline pass with nothing new sent
        (each frame goes at most once, so that comes)."""
        if not self._started:
            return
        for _ in range(MAX_FINISH_ROUNDS):
            sent = self.counts.requests
            remaining_ns = math.ceil(self._executor.remaining_sec() * 1e9)
            self.advance_to(self._now_ns + max(remaining_ns, self._rate_period_ns)
                            + 2 * EXECUTOR_TICK_NS)
            if self.counts.requests == sent and self._executor.remaining_sec() == 0.0:
                return

    # ------------------------------------------------------------ inputs

    def receive(self, kind: str, time_ns: int, msg: Any) -> None:
        """A recorded message, received at its log time ``time_ns``."""
        self.advance_to(time_ns)
        if kind == CAMERA:
            self._on_camera(msg)
        elif kind.startswith(NAMED_CAMERA_PREFIX):
            self._on_named_camera(kind[len(NAMED_CAMERA_PREFIX):], msg)
        elif kind == JOINT_STATES:
            self._joint_state = read.joint_state_to_data(msg)
        elif kind == EEF_POSE:
            self._eef = read.pose_stamped_to_stamped_pose(msg)
        elif kind == OBSERVATION:
            self._on_observation(msg)
        elif kind == INSTRUCTION:
            self._on_instruction(msg.data)

    def _new_frame(self, msg: Any, stamp: Any) -> Frame:
        self._sequence += 1
        self.counts.frames += 1
        return Frame(msg, FrameInfo(self._sequence, read.stamp_to_nanoseconds(stamp)), stamp)

    def _usable(self, msg: Any) -> bool:
        if read.is_compressed_image(msg) or read.unsupported_encoding(msg) is None:
            return True
        self.counts.unsupported_frames += 1
        return False

    def _on_camera(self, msg: Any) -> None:
        if self._usable(msg):
            self._frame = self._new_frame(msg, msg.header.stamp)
            self._dispatch_newest()

    def _on_named_camera(self, name: str, msg: Any) -> None:
        """A frame of one of several cameras; the first camera's is the scheduler's frame
        (a new set), another's may complete a set waiting for it (as in the node)."""
        if self._usable(msg):
            frame = self._new_frame(msg, msg.header.stamp)
            self._camera_frames[name] = frame
            if name == self._camera_names[0]:
                self._frame = frame
            self._dispatch_newest()

    def _camera_set(self, first: Frame) -> CameraSet[Frame]:
        if not self._camera_names:
            return CameraSet({})
        newest: dict[str, Optional[Frame]] = dict(self._camera_frames)
        newest[self._camera_names[0]] = first
        return pair_cameras(
            self._camera_names, newest, lambda frame: frame.info.stamp_ns,
            float(self._values["camera_sync_tolerance_sec"]),
        )

    def _on_observation(self, msg: Any) -> None:
        if not self._values["use_observation"]:
            return
        usable = msg.has_rgb_image and self._usable(msg.rgb_image)
        frame = (self._new_frame(msg.rgb_image, read.observation_image_stamp(msg))
                 if usable and not self._camera_names else None)
        self._aggregate = AggregatedObservation(
            read.stamp_to_nanoseconds(msg.header.stamp),
            Inputs(frame, read.observation_joint_state(msg), read.observation_eef_pose(msg)),
        )
        self._dispatch_newest()

    def _on_instruction(self, text: str) -> None:
        self._executor.clear()
        if not text.strip():
            self._scheduler.clear_task()
            return
        self._values["instruction"] = text.strip()
        self._scheduler.start_task()

    # ------------------------------------------------------------ the node's cycle

    def _on_executor_tick(self) -> None:
        self._publish_due()
        remaining = self._executor.remaining_sec()
        if 0.0 < remaining <= self._executor.refill_horizon_sec() + 1e-6:
            self._dispatch_newest()

    def _dispatch_newest(self) -> None:
        if self._executor.remaining_sec() > self._executor.refill_horizon_sec() + 1e-6:
            return
        raw = Inputs(self._frame, self._joint_state, self._eef)
        selection = select_inputs(
            self._aggregate, raw, self._now_ns, ObservationSettings.from_values(self._values)
        )
        frame = selection.frame
        decision = self._scheduler.decide(
            frame.info if frame is not None else None,
            selection.eef_candidates,
            ScheduleSettings.from_values(self._values),
        )
        if decision.verdict is Verdict.RATE_CAPPED and self._last_hand_over_ns is not None:
            self._rate_retry_ns = self._last_hand_over_ns + math.ceil(
                ScheduleSettings.from_values(self._values).min_interval_ns)
        if decision.verdict is not Verdict.HAND_OVER:
            return
        assert frame is not None
        cameras = self._camera_set(frame)
        state = state_vector(self._state_layout, selection.joint_state, decision.eef_pose)
        problem = cameras.problem or state.problem
        if problem is not None:
            self._skipped[frame.info.sequence] = problem
            return  # the frame stays the candidate: a later frame may complete the set
        self._skipped.pop(frame.info.sequence, None)
        observation = observation_without_image(
            selection.joint_state, decision.eef_pose, self._values,
            state=state.values, robot_id=self._robot_id,
        )
        self._scheduler.handed_over(frame.info, True)
        self._last_hand_over_ns = self._now_ns
        self._run_job(Job(frame, observation, decision.task_generation, cameras.frames or {}))

    def _run_job(self, job: Job) -> None:
        image, images = None, {}
        try:
            if job.camera_frames:
                images = {name: read.frame_to_rgb(frame.msg)
                          for name, frame in job.camera_frames.items()}
            else:
                image = read.frame_to_rgb(job.frame.msg)
        except Exception:  # noqa: BLE001 - a bad frame ends this cycle, as in the node
            self.counts.unusable_frames += 1
            return
        observation = observation_to_send(job.observation, image, self._executor, images)
        request_id = self._source.new_request_id()
        self._executor.request_sent(request_id)
        self.counts.requests += 1
        started = time.perf_counter()
        try:
            answer = self._source(observation, request_id)
            failure = self._source.take_failure()
        except Exception as exc:  # noqa: BLE001 - a failed step, counted; the replay goes on
            failure = f"{type(exc).__name__}: {exc}"
            answer = self._source.fallback(observation)
        latency_ms = (time.perf_counter() - started) * 1e3
        if not failure and not isinstance(answer, (ActionChunk, PolicyAction)):
            failure = f"no usable answer ({type(answer).__name__})"
        self._record_request(request_id, job.frame.info.stamp_ns, latency_ms, failure)
        if not self._scheduler.is_current(job.task_generation):
            self._executor.request_failed(request_id)
            self.counts.answers_after_task += 1
            return
        if isinstance(answer, ActionChunk):
            if self._take_chunk(answer, job, request_id):
                return
            answer = self._source.fallback(observation)
        else:
            self._executor.request_failed(request_id)
            if isinstance(answer, PolicyAction) and answer.is_hold:
                self._executor.clear()
        if isinstance(answer, PolicyAction):
            self._publish_now(answer, job, request_id)

    def _record_request(
        self, request_id: str, stamp_ns: int, latency_ms: float, failure: str
    ) -> None:
        if failure:
            self.counts.failed += 1
        request = Request(self._now_ns, request_id, stamp_ns, latency_ms, failure)
        self.outputs.requests.append(request)
        self._on_output(request)

    def _take_chunk(self, chunk: ActionChunk, job: Job, request_id: str) -> bool:
        stamp_ns = job.frame.info.stamp_ns
        origin = ChunkOrigin.of(chunk, job.frame.stamp, stamp_ns, job.observation)
        self._chunks[request_id] = origin
        while len(self._chunks) > REMEMBERED_CHUNKS:
            self._chunks.popitem(last=False)
        acceptance = self._executor.accept(chunk, stamp_ns / 1e9, request_id)
        if not acceptance.accepted:
            self.counts.chunks_refused += 1
            return True
        self._count_task_step(job.task_generation)
        shown = guard_preview(self._guard, chunk, origin)
        fields = policy_action_chunk_fields(shown, stamp_ns, request_id)
        message = ChunkMessage(self._now_ns, fields)
        self.outputs.chunks.append(message)
        self._on_output(message)
        self._publish_due()
        return True

    def _count_task_step(self, generation: int) -> None:
        self._scheduler.count_step(generation, self._values["max_steps"])

    # ------------------------------------------------------------ publishing

    def _guarded(self, action: PolicyAction, context: GuardContext) -> GuardResult:
        result = self._guard.check(action, context)
        if result.refused:
            self.counts.refused_by_guard += 1
            self._executor.clear()
            self._guard.reset()
        return result

    def _publish_now(self, action: PolicyAction, job: Job, request_id: str) -> None:
        stamp_ns = job.frame.info.stamp_ns
        observation = job.observation
        context = GuardContext(
            stamp_ns / 1e9, observation.joint_state, observation.eef_pose, stamp_ns / 1e9
        )
        checked = self._guarded(action, context).action
        self._emit(checked, stamp_ns, stamp_ns, 0, 1, request_id)
        self._count_task_step(job.task_generation)

    def _publish_due(self) -> None:
        for command in self._executor.due():
            if self._publish_command(command):
                break

    def _publish_command(self, command: DueCommand) -> bool:
        """Publish a due command, guarded; True when the guard refused it."""
        origin = self._chunks.get(command.request_id)
        if origin is None:
            return False
        step, due_ns = origin.step_and_due_ns(command)
        if command.is_underrun_hold:
            self.counts.underrun_holds += 1
        result = self._guarded(command.action, origin.guard_context(due_ns))
        self._emit(result.action, origin.stamp_ns, due_ns, step, origin.length,
                   command.request_id)
        return result.refused

    def _emit(
        self, action: PolicyAction, stamp_ns: int, due_ns: int, step: int, length: int,
        request_id: str,
    ) -> None:
        fields = policy_output_fields(action, stamp_ns, due_ns, step, length, request_id)
        command = Command(self._now_ns, fields, action, stamp_ns, step)
        self.outputs.commands.append(command)
        self._on_output(command)
