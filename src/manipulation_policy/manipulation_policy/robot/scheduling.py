"""When a policy node hands a camera frame to its worker: pure decisions, no ROS.

``FrameScheduler`` answers, each time a frame arrives or the node's timer
ticks, whether the newest frame goes to the worker now, and if not why not:

- the rate: a frame is handed over as soon as it arrives unless the last one
  was handed over less than one period (1 / ``inference_rate``, less a jitter
  tolerance) ago; the timer's next call picks up a frame held back that way;
- the task: with ``wait_for_task`` nothing is handed over until a task came,
  and a task ends after ``max_steps`` published decisions or when cleared;
- freshness: a frame (or an end-effector pose) whose stamp is further than
  ``max_observation_age_sec`` from the node clock, either way, is not used;
  an end-effector pose in another frame than ``reference_frame`` neither.
  Several end-effector poses may be offered (the aggregated observation's
  ``base_to_ee``, then the one on ``eef_pose_topic``): the first usable goes.

Two clocks are injected, each a callable returning nanoseconds: a monotonic
one for the rate, and the node clock (ROS time, simulated time included) that
message stamps are compared with. Thread-safe: the executor decides, the
worker counts published steps, a parameter change starts a task.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from manipulation_policy.core.policy_types import Pose

NanosecondClock = Callable[[], int]

# Frames arrive with jitter: one a little early still counts as on time.
RATE_TOLERANCE = 0.9


@dataclass(frozen=True)
class FrameInfo:
    """What scheduling needs to know of a received camera frame."""

    sequence: int  # arrival number: each frame is used at most once
    stamp_ns: int  # header stamp, node-clock nanoseconds


@dataclass(frozen=True)
class StampedPose:
    pose: Pose
    stamp_ns: int
    frame_id: str


@dataclass(frozen=True)
class ScheduleSettings:
    inference_rate: float  # Hz, > 0
    max_observation_age_sec: float  # > 0
    reference_frame: str

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ScheduleSettings:
        return cls(
            inference_rate=float(values["inference_rate"]),
            max_observation_age_sec=float(values["max_observation_age_sec"]),
            reference_frame=values["reference_frame"],
        )

    @property
    def min_interval_ns(self) -> float:
        return RATE_TOLERANCE * 1e9 / self.inference_rate

    @property
    def max_age_ns(self) -> int:
        return int(self.max_observation_age_sec * 1e9)


class Verdict(enum.Enum):
    HAND_OVER = "hand over"
    RATE_CAPPED = "too soon after the last hand-over"
    NO_TASK = "no task"
    NO_FRAME = "no frame yet"
    ALREADY_USED = "the newest frame was used already"
    STALE = "the newest frame is too old (or from the future)"


class EefUse(enum.Enum):
    USED = "used"
    ABSENT = "no pose received"
    WRONG_FRAME = "in another frame than reference_frame"
    STALE = "too old (or from the future)"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    frame_age_ns: int = 0  # now - stamp of the frame judged (STALE, HAND_OVER)
    eef_pose: Optional[Pose] = None  # the pose to send with the frame (HAND_OVER)
    eef: EefUse = EefUse.ABSENT
    eef_frame_id: str = ""  # the pose's frame (WRONG_FRAME)
    task_generation: int = 0  # the task the hand-over belongs to (HAND_OVER)


def task_active_at_start(wait_for_task: bool, task_given: bool) -> bool:
    """Without wait_for_task the instruction parameter is a task from the start."""
    return task_given or not wait_for_task


def eef_pose_use(
    eef: Optional[StampedPose], now_ns: int, settings: ScheduleSettings
) -> tuple[EefUse, Optional[Pose]]:
    """Whether the cached end-effector pose may go with a frame: a stale one, or one in
    another frame, would turn a delta into a wrong absolute target. An empty frame id
    is taken as reference_frame."""
    if eef is None:
        return EefUse.ABSENT, None
    if eef.frame_id and eef.frame_id != settings.reference_frame:
        return EefUse.WRONG_FRAME, None
    if abs(now_ns - eef.stamp_ns) > settings.max_age_ns:
        return EefUse.STALE, None
    return EefUse.USED, eef.pose


EefOffer = Union[None, StampedPose, Sequence[StampedPose]]


def first_usable_eef(
    offer: EefOffer, now_ns: int, settings: ScheduleSettings
) -> tuple[EefUse, Optional[Pose], str]:
    """The first usable of the poses offered (preferred first), as (USED, pose, its frame);
    when none is, why the first one is not (and its frame), or ABSENT for none offered."""
    candidates = () if offer is None else (offer,) if isinstance(offer, StampedPose) else offer
    first: Optional[tuple[EefUse, Optional[Pose], str]] = None
    for candidate in candidates:
        use, pose = eef_pose_use(candidate, now_ns, settings)
        if use is EefUse.USED:
            return use, pose, candidate.frame_id
        if first is None:
            first = (use, None, candidate.frame_id)
    return first if first is not None else (EefUse.ABSENT, None, "")


class FrameScheduler:
    def __init__(
        self,
        monotonic_ns: NanosecondClock,
        node_clock_ns: NanosecondClock,
        task_active: bool = True,
    ):
        self._monotonic_ns = monotonic_ns
        self._node_clock_ns = node_clock_ns
        self._lock = threading.Lock()
        self._last_used_sequence: Optional[int] = None
        self._last_hand_over_ns: Optional[int] = None
        self._task_active = task_active
        self._task_generation = 0
        self._task_steps = 0
        self._counts = {"stale_skipped": 0, "busy_skipped": 0, "handed_over": 0}

    # ------------------------------------------------------------ frames

    def decide(
        self,
        frame: Optional[FrameInfo],
        eef: EefOffer,
        settings: ScheduleSettings,
    ) -> Decision:
        """Whether the newest ``frame`` goes to the worker now (see the module docstring).

        A HAND_OVER must be followed by ``handed_over`` with the worker's answer.
        """
        with self._lock:
            if self._last_hand_over_ns is not None and (
                self._monotonic_ns() - self._last_hand_over_ns < settings.min_interval_ns
            ):
                return Decision(Verdict.RATE_CAPPED)
            if not self._task_active:
                return Decision(Verdict.NO_TASK)
            if frame is None:
                return Decision(Verdict.NO_FRAME)
            if frame.sequence == self._last_used_sequence:
                return Decision(Verdict.ALREADY_USED)
            now_ns = self._node_clock_ns()
            age_ns = now_ns - frame.stamp_ns
            if abs(age_ns) > settings.max_age_ns:
                self._counts["stale_skipped"] += 1
                return Decision(Verdict.STALE, frame_age_ns=age_ns)
            eef_use, pose, eef_frame_id = first_usable_eef(eef, now_ns, settings)
            return Decision(
                Verdict.HAND_OVER,
                frame_age_ns=age_ns,
                eef_pose=pose,
                eef=eef_use,
                eef_frame_id=eef_frame_id,
                task_generation=self._task_generation,
            )

    def handed_over(self, frame: FrameInfo, accepted: bool) -> None:
        """The worker took ``frame`` (its period starts now), or was busy (the frame stays
        the candidate for the next call)."""
        with self._lock:
            if accepted:
                self._last_used_sequence = frame.sequence
                self._last_hand_over_ns = self._monotonic_ns()
                self._counts["handed_over"] += 1
            else:
                self._counts["busy_skipped"] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------ the task

    @property
    def task_active(self) -> bool:
        with self._lock:
            return self._task_active

    @property
    def task_generation(self) -> int:
        with self._lock:
            return self._task_generation

    def start_task(self) -> None:
        """A new task (instruction): decisions of earlier tasks no longer count."""
        with self._lock:
            self._task_active = True
            self._task_generation += 1
            self._task_steps = 0

    def clear_task(self) -> bool:
        """End the current task (upstream's empty instruction); True if one was active."""
        with self._lock:
            was_active, self._task_active = self._task_active, False
            self._task_generation += 1
            return was_active

    def is_current(self, generation: int) -> bool:
        """Whether task ``generation`` is still the task being worked on: an answer to an
        observation of an ended or replaced task is not to be published."""
        with self._lock:
            return generation == self._task_generation and self._task_active

    def count_step(self, generation: int, max_steps: int) -> bool:
        """One decision of task ``generation`` was published; True when that ended the
        task (``max_steps`` > 0 reached). Steps of an earlier or ended task are ignored."""
        with self._lock:
            if generation != self._task_generation or not self._task_active:
                return False
            self._task_steps += 1
            if 0 < max_steps <= self._task_steps:
                self._task_active = False
                return True
            return False
