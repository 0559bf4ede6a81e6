"""The policy node's execution: when a frame goes to the worker (the rate, the task,
staleness, the EEF pose: ``robot/scheduling.FrameScheduler``; the refill horizon of
the action timeline), the worker thread(s) that run the action source
(``robot/skipping_worker.SkippingWorker``), and the action timeline
(``robot/executor.ChunkExecutor`` on the node clock) an answered chunk goes onto.

Threading: the newest fresh frame goes to a worker thread that runs the action
source and publishes; while every worker thread is busy, frames are skipped
(never queued). The in-process node has one worker thread; the remote node has
``remote_max_in_flight`` (``max_in_flight``), so that many observations may await
their answers at once: the next goes out when a thread is free and the timeline,
projected with what the requests in flight are expected to cover, has no more
than the refill horizon left. ``_run_job`` may so run on several threads at once:
request ids, counters, the chunk registry, the executor and publishing are
thread-safe. ``_dispatch_newest`` runs in the subscription callbacks and the
timers, never concurrently with itself: all of the node's callbacks share its
default, mutually exclusive callback group. This mixin of ``PolicyNodeBase`` owns
``_scheduler``, ``_executor``, ``_worker`` and the rate ``_timer``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, Union

from sensor_msgs.msg import CompressedImage

from manipulation_policy.core.policy_types import ActionChunk, Observation, PolicyAction
from manipulation_policy.nodes import ros_conversion
from manipulation_policy.robot.camera_inputs import StateLayout, state_vector
from manipulation_policy.robot.executor import ChunkExecutor
from manipulation_policy.robot.node_parameters import EXECUTOR_PARAMETERS, executor_settings
from manipulation_policy.robot.node_shared import LOG_THROTTLE_SEC, Job
from manipulation_policy.robot.observation_assembly import (
    observation_to_send,
    observation_without_image,
)
from manipulation_policy.robot.observation_inputs import Source
from manipulation_policy.robot.scheduling import EefUse, FrameScheduler, ScheduleSettings, Verdict
from manipulation_policy.robot.skipping_worker import SkippingWorker

# An ActionChunk goes onto the executor's timeline; a PolicyAction (a failure's hold) is
# published at once; None publishes nothing.
ActionSource = Callable[[Observation], Union[ActionChunk, PolicyAction, None]]

# How often due steps of the action timeline are looked for (and published).
EXECUTOR_TICK_SEC = 0.01
EXECUTOR_PARAMETER_NAMES = frozenset(spec.name for spec in EXECUTOR_PARAMETERS)


class NodeExecution:
    """Scheduling, the worker and the action timeline of ``PolicyNodeBase`` (a mixin)."""

    def _init_scheduling(self) -> None:
        # A task is what the node acts on: the instruction, until max_steps decisions
        # were published or an empty instruction message cleared it.
        self._scheduler = FrameScheduler(
            time.monotonic_ns, lambda: self.get_clock().now().nanoseconds, task_active=False
        )

    def _init_executor(self, values: dict[str, Any]) -> None:
        # Action chunks on a timeline by the node clock (robot/executor.py).
        self._executor = ChunkExecutor(
            lambda: self.get_clock().now().nanoseconds / 1e9, executor_settings(values)
        )
        self._request_numbers = itertools.count(1)
        self._request_numbers_lock = threading.Lock()
        # Jobs (by id) handed to the worker whose request is not yet known to the executor
        # (it is sent once the frame is decoded): their coverage is not projected yet.
        self._jobs_before_send: set[int] = set()
        self._jobs_before_send_lock = threading.Lock()
        self._held_by_estop_gate = False  # a frame waits for the e-stop's state (activation)

    def _start_worker(self) -> None:
        """The worker thread(s) (configure)."""
        with self._jobs_before_send_lock:
            self._jobs_before_send.clear()  # a stopped worker's jobs not taken never run
        self._worker: SkippingWorker[Job] = SkippingWorker(
            self._run_job, f"{self.get_name()}_worker", capacity=self.max_in_flight()
        )

    def max_in_flight(self) -> int:
        """How many observations may await their answers at once (the remote node's
        ``remote_max_in_flight``; the in-process node answers one at a time)."""
        return 1

    def _max_in_flight_changed(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.set_capacity(self.max_in_flight())

    def _refill_due(self) -> bool:
        """Whether the action timeline wants the next observation: its remaining time
        (with several in flight: projected with what they are expected to cover) is no
        more than the refill horizon."""
        if self.max_in_flight() == 1:
            remaining = self._executor.remaining_sec()
        else:
            with self._jobs_before_send_lock:
                if self._jobs_before_send:
                    return False  # a job's coverage is not known yet: it comes first
            remaining = self._executor.projected_remaining_sec()
        return remaining <= self._executor.refill_horizon_sec() + 1e-6

    def _start_timers(self, values: dict[str, Any]) -> None:
        """The executor's tick and the rate timer (activate)."""
        self._tick_timer = self.create_timer(EXECUTOR_TICK_SEC, self._on_executor_tick)
        self._timer = self.create_timer(1.0 / values["inference_rate"], self._on_tick)

    def _stop_timers(self) -> None:
        """No more ticks and no more frames to the worker (deactivate)."""
        for name in ("_tick_timer", "_timer"):
            timer = getattr(self, name, None)
            if timer is not None:
                self.destroy_timer(timer)
                setattr(self, name, None)

    def _execution_parameters_changed(self, changes: dict[str, Any]) -> None:
        if EXECUTOR_PARAMETER_NAMES.intersection(changes):
            self._executor.update_settings(executor_settings(self.parameter_values()))
        if "instruction" in changes:
            self._start_task(changes["instruction"])

    def _rate_changed(self, rate: float) -> None:
        # Recreated rather than re-periodised: Humble's Timer has no period setter.
        if getattr(self, "_timer", None) is None:
            return  # not active: activation starts it at the rate then in effect
        self.destroy_timer(self._timer)
        self._timer = self.create_timer(1.0 / rate, self._on_tick)

    def _stop_worker(self) -> None:
        worker = getattr(self, "_worker", None)
        if worker is None:
            return
        self._worker = None
        if not worker.stop():
            self.get_logger().warning("policy worker still busy at shutdown; left behind")

    # ------------------------------------------------------------ the task

    def _start_task(self, instruction: str) -> None:
        self._executor.clear()  # steps planned for the previous task are not published
        self._scheduler.start_task()
        steps = self.parameter_values()["max_steps"]
        self.get_logger().info(
            f"task: {instruction!r} ("
            + (f"{steps} decisions)" if steps > 0 else "until cleared)")
        )

    def _clear_task(self) -> None:
        """An empty task message: the current task ends, its planned steps are dropped."""
        self._executor.clear()
        if self._scheduler.clear_task():
            self.get_logger().info(f"task cleared; waiting for a task on {self._task_topic}")

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
        if not self._publishing or self._worker is None or self.hold_reason() is not None:
            return  # not active, or stopped: no inference starts
        if not self.estop_state_known():
            self._held_by_estop_gate = True  # the executor tick dispatches once it opens
            return  # a stop latched before activation may still be on its way
        if not self._refill_due():
            return  # the action timeline has enough left: the next observation waits
        values = self.parameter_values()
        selection = self._select_inputs(values)
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
        cameras = self._camera_set(frame, values)
        state = state_vector(
            StateLayout.from_values(values), selection.joint_state, decision.eef_pose
        )
        problem = cameras.problem or state.problem
        if problem is not None:
            self._inputs_incomplete(problem)
            return  # the frame stays the candidate: a later frame may complete the set
        self.inputs_problem = None
        observation = observation_without_image(
            selection.joint_state, decision.eef_pose, values,
            state=state.values, robot_id=self.get_fully_qualified_name(),
        )
        with self._jobs_before_send_lock:
            job = Job(frame, observation, decision.task_generation, cameras.frames or {})
            accepted = self._worker.try_submit(job)
            if accepted:
                self._jobs_before_send.add(id(job))
        self._scheduler.handed_over(frame.info, accepted)
        if accepted and selection.source is Source.AGGREGATED:
            self._count("from_observation")

    def _inputs_incomplete(self, problem: str) -> None:
        """A camera of the set is missing or off, or the state cannot be made: nothing
        is sent (said every LOG_THROTTLE_SEC; the last reason is ``inputs_problem``)."""
        self._count("incomplete_inputs")
        self.inputs_problem = problem
        self.get_logger().warning(
            f"nothing sent: {problem}", throttle_duration_sec=LOG_THROTTLE_SEC
        )

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

    def _run_job(self, job: Job) -> None:
        try:
            sent = self._send_job(job)
        finally:
            with self._jobs_before_send_lock:
                self._jobs_before_send.discard(id(job))
        if sent is None:
            return
        observation, request_id = sent
        try:
            self._run_cycle(job, observation, request_id)
        finally:
            self._executor.request_failed(request_id)  # a no-op once answered

    def _send_job(self, job: Job) -> Optional[tuple[Observation, str]]:
        """Decode ``job``'s frame(s) into the observation to send and tell the executor
        it is sent: (observation, request id), or None when nothing is to be sent."""
        if self.hold_reason() is not None:
            return None  # a stop began after this frame was handed over
        image, images = None, {}
        try:
            if job.camera_frames:
                for name, frame in job.camera_frames.items():
                    camera = name
                    images[name] = _decoded(frame.msg)
            else:
                camera = ""
                image = _decoded(job.frame.msg)
        except Exception as exc:  # noqa: BLE001 - a bad frame ends this cycle, not the worker
            self.get_logger().error(
                f"camera frame not usable{f' ({camera})' if camera else ''}: {exc}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            return None
        observation = observation_to_send(job.observation, image, self._executor, images)
        self._count("inferences")
        request_id = self.new_request_id()
        stamp_ns = ros_conversion.stamp_to_nanoseconds(job.frame.stamp)
        self._executor.request_sent(request_id, stamp_ns / 1e9)
        return observation, request_id

    def _run_cycle(self, job: Job, observation: Observation, request_id: str) -> None:
        """Send ``observation`` as ``request_id`` and take its answer."""
        try:
            answer = self.call_action_source(observation, request_id)
        except Exception as exc:  # a policy failure must not end the worker thread
            self.get_logger().error(
                f"policy failed: {type(exc).__name__}: {ascii(str(exc))[1:-1]}",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            answer = self._fallback_action(observation)
        if not self._scheduler.is_current(job.task_generation):
            # The task ended (max_steps) or changed while this observation was answered.
            self._executor.request_failed(request_id)
            self._count("answers_after_task")
            return
        if self.hold_reason() is not None:
            # A stop began while this observation was answered: its hold went out.
            self._executor.request_failed(request_id)
            self._count("answers_after_stop")
            return
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
        with self._request_numbers_lock:
            number = next(self._request_numbers)
        return f"{self.get_name()}-{number}"

    def call_action_source(self, observation: Observation, request_id: str) -> Any:
        """Run the action source on ``observation`` (sent as ``request_id``)."""
        return self.action_source(observation)

    # ------------------------------------------------------------ the action timeline

    def _take_chunk(self, chunk: ActionChunk, job: Job, request_id: str) -> bool:
        """Put an answered chunk on the timeline, publish it whole on the chunk topic and
        its steps due now; False when the chunk was refused or could not be published."""
        stamp_ns = ros_conversion.stamp_to_nanoseconds(job.frame.stamp)
        self._remember_chunk(chunk, job.frame.stamp, stamp_ns, request_id, job.observation)
        acceptance = self._executor.accept(chunk, stamp_ns / 1e9, request_id)
        if not acceptance.accepted:
            self._count("chunks_refused")
            self.get_logger().warning(
                f"action chunk not used: {acceptance.verdict.value} ({acceptance.detail})",
                throttle_duration_sec=LOG_THROTTLE_SEC,
            )
            return True  # nothing to publish for it, and nothing failed
        self._count("chunks_accepted")
        # A decision of the task: counted here, not where its steps are published, since
        # the executor's tick may publish them first (on the other thread).
        self._count_task_step(job.task_generation)
        self._publish_chunk(chunk, job.frame.stamp, request_id)
        return self._publish_due() is not False

    def _on_executor_tick(self) -> None:
        """Check the inputs, publish due steps; when the timeline is about to run dry, send
        the next frame."""
        self._check_inputs()
        if self._held_by_estop_gate and self.estop_state_known():
            self._held_by_estop_gate = False
            self._dispatch_newest()
        self._publish_due()
        if self._worker is None or self._worker.busy:
            return  # no free slot
        if self._executor.remaining_sec() > 0.0 and self._refill_due():
            self._dispatch_newest()

    @property
    def chunk_executor(self) -> ChunkExecutor:
        return self._executor


def _decoded(msg: Any) -> Any:
    """An RGB array of a received Image or CompressedImage."""
    if isinstance(msg, CompressedImage):
        return ros_conversion.compressed_image_to_rgb(msg)
    return ros_conversion.image_to_rgb(msg)
