"""FrameScheduler with fake clocks: the rate, the timer's pick-up, staleness, EEF pose, task.

No ROS, no sleeps: time moves only when a test moves it.
"""

from __future__ import annotations

import threading

import pytest

from manipulation_policy.core.policy_types import Pose, Quaternion, Vector3
from manipulation_policy.robot.scheduling import (
    RATE_TOLERANCE,
    EefUse,
    FrameInfo,
    FrameScheduler,
    ScheduleSettings,
    StampedPose,
    Verdict,
    eef_pose_use,
    task_active_at_start,
)

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC  # node clock: a plausible wall time
POSE = Pose(Vector3(0.4, -0.1, 0.3), Quaternion(0.0, 0.0, 0.0, 1.0))


class FakeClock:
    def __init__(self, start_ns: int = 0):
        self.ns = start_ns

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * SEC)


class Setup:
    """A scheduler on fake clocks; ``frame()`` makes a new frame stamped now (or ``age`` ago)."""

    def __init__(self, rate: float = 10.0, max_age: float = 0.5, task_active: bool = True):
        self.monotonic = FakeClock(5 * SEC)
        self.node_clock = FakeClock(T0)
        self.scheduler = FrameScheduler(self.monotonic, self.node_clock, task_active)
        self.settings = ScheduleSettings(rate, max_age, "base_link")
        self._sequence = 0

    def advance(self, seconds: float) -> None:
        self.monotonic.advance(seconds)
        self.node_clock.advance(seconds)

    def frame(self, age: float = 0.0) -> FrameInfo:
        self._sequence += 1
        return FrameInfo(self._sequence, self.node_clock.ns - round(age * SEC))

    def decide(self, frame, eef=None):
        return self.scheduler.decide(frame, eef, self.settings)

    def offer(self, frame, eef=None, worker_free: bool = True):
        """decide, and on HAND_OVER tell the scheduler the worker's answer (as the node does)."""
        decision = self.decide(frame, eef)
        if decision.verdict is Verdict.HAND_OVER:
            self.scheduler.handed_over(frame, worker_free)
        return decision


@pytest.fixture
def setup():
    return Setup()


# ---------------------------------------------------------------- the rate


def test_the_first_frame_is_handed_over_on_arrival(setup):
    assert setup.offer(setup.frame()).verdict is Verdict.HAND_OVER
    assert setup.scheduler.counts()["handed_over"] == 1


def test_frames_inside_one_period_are_held_back_and_the_next_tick_picks_up_the_newest(setup):
    setup.offer(setup.frame())  # 10 Hz: period 0.1 s
    setup.advance(0.03)
    held = setup.frame()
    assert setup.offer(held).verdict is Verdict.RATE_CAPPED
    setup.advance(0.03)
    newest = setup.frame()
    assert setup.offer(newest).verdict is Verdict.RATE_CAPPED
    setup.advance(0.04)  # the timer's tick, one period after the hand-over
    decision = setup.offer(newest)
    assert decision.verdict is Verdict.HAND_OVER
    assert setup.offer(newest).verdict is Verdict.RATE_CAPPED  # a new period began
    setup.advance(0.1)
    assert setup.offer(newest).verdict is Verdict.ALREADY_USED  # each frame once
    assert setup.offer(held).verdict is Verdict.HAND_OVER  # only the newest is ever offered
    assert setup.scheduler.counts()["handed_over"] == 3


def test_the_cap_tolerates_jitter_just_below_one_period(setup):
    setup.offer(setup.frame())
    setup.advance(0.1 * RATE_TOLERANCE - 1e-6)
    assert setup.offer(setup.frame()).verdict is Verdict.RATE_CAPPED
    setup.advance(2e-6)
    assert setup.offer(setup.frame()).verdict is Verdict.HAND_OVER


@pytest.mark.parametrize("rate", [0.05, 1.0, 30.0, 1000.0])
def test_a_steady_stream_is_capped_at_the_rate(rate):
    setup = Setup(rate=rate, max_age=3600.0)
    camera_period = min(0.01, 0.25 / rate)  # several frames per period
    seconds = 40 / rate
    handed = 0
    for _ in range(round(seconds / camera_period)):
        setup.advance(camera_period)
        handed += setup.offer(setup.frame()).verdict is Verdict.HAND_OVER
    # Each hand-over waits at least 0.9 periods and at most 0.9 periods + one camera period.
    assert seconds * rate <= handed <= seconds * rate / RATE_TOLERANCE + 1, handed


def test_the_period_follows_a_changed_rate(setup):
    setup.offer(setup.frame())
    setup.advance(0.05)
    assert setup.offer(setup.frame()).verdict is Verdict.RATE_CAPPED
    setup.settings = ScheduleSettings.from_values(
        {"inference_rate": 20, "max_observation_age_sec": 0.5, "reference_frame": "base_link"}
    )
    assert setup.offer(setup.frame()).verdict is Verdict.HAND_OVER


def test_a_busy_worker_skips_the_frame_without_starting_a_period(setup):
    frame = setup.frame()
    assert setup.offer(frame, worker_free=False).verdict is Verdict.HAND_OVER
    assert setup.scheduler.counts()["busy_skipped"] == 1
    # Not used and no period started: the very next call (a tick) offers it again.
    assert setup.offer(frame).verdict is Verdict.HAND_OVER
    counts = setup.scheduler.counts()
    assert counts["handed_over"] == 1 and counts["busy_skipped"] == 1


def test_without_frames_nothing_is_handed_over(setup):
    assert setup.decide(None).verdict is Verdict.NO_FRAME


# ---------------------------------------------------------------- staleness


@pytest.mark.parametrize(
    ("age", "verdict"),
    [(0.0, Verdict.HAND_OVER), (0.5, Verdict.HAND_OVER), (0.500001, Verdict.STALE),
     (2.0, Verdict.STALE), (-0.5, Verdict.HAND_OVER), (-0.6, Verdict.STALE)],
)  # fmt: skip
def test_frames_older_or_newer_than_the_max_age_are_stale(setup, age, verdict):
    decision = setup.offer(setup.frame(age=age))
    assert decision.verdict is verdict
    assert decision.frame_age_ns == round(age * SEC)
    assert setup.scheduler.counts()["stale_skipped"] == (verdict is Verdict.STALE)


def test_a_stale_frame_is_counted_at_each_look_and_never_starts_a_period(setup):
    stale = setup.frame(age=2.0)
    for _ in range(3):
        assert setup.offer(stale).verdict is Verdict.STALE
    assert setup.scheduler.counts()["stale_skipped"] == 3
    assert setup.offer(setup.frame()).verdict is Verdict.HAND_OVER  # no cap from stale ones


def test_staleness_is_judged_on_the_node_clock_not_the_monotonic_one(setup):
    frame = setup.frame()
    setup.monotonic.advance(100.0)  # e.g. simulated time standing still
    assert setup.offer(frame).verdict is Verdict.HAND_OVER
    frame = setup.frame()
    setup.node_clock.advance(0.6)
    setup.monotonic.advance(1.0)
    assert setup.offer(frame).verdict is Verdict.STALE


# ---------------------------------------------------------------- the EEF pose


@pytest.mark.parametrize(
    ("frame_id", "age", "use"),
    [("base_link", 0.0, EefUse.USED), ("", 0.2, EefUse.USED), ("base_link", 0.5, EefUse.USED),
     ("base_link", 0.51, EefUse.STALE), ("base_link", -0.51, EefUse.STALE),
     ("tool0", 0.0, EefUse.WRONG_FRAME), ("tool0", 9.0, EefUse.WRONG_FRAME)],
)  # fmt: skip
def test_the_eef_pose_goes_along_only_fresh_and_in_the_reference_frame(
    setup, frame_id, age, use
):
    eef = StampedPose(POSE, setup.node_clock.ns - round(age * SEC), frame_id)
    decision = setup.offer(setup.frame(), eef)
    assert decision.verdict is Verdict.HAND_OVER  # a pose never holds back the frame
    assert decision.eef is use
    assert decision.eef_pose == (POSE if use is EefUse.USED else None)
    if use is EefUse.WRONG_FRAME:
        assert decision.eef_frame_id == "tool0"


def test_no_eef_pose_is_no_pose(setup):
    decision = setup.offer(setup.frame())
    assert decision.eef is EefUse.ABSENT and decision.eef_pose is None
    assert eef_pose_use(None, T0, setup.settings) == (EefUse.ABSENT, None)


# ---------------------------------------------------------------- the task


@pytest.mark.parametrize(
    ("wait_for_task", "task_given", "active"),
    [(False, False, True), (False, True, True), (True, False, False), (True, True, True)],
)
def test_a_task_at_start(wait_for_task, task_given, active):
    assert task_active_at_start(wait_for_task, task_given) is active


def test_without_a_task_no_frame_is_handed_over_until_one_starts():
    setup = Setup(task_active=False)
    frame = setup.frame()
    assert setup.offer(frame).verdict is Verdict.NO_TASK
    setup.scheduler.start_task()
    decision = setup.offer(frame)
    assert decision.verdict is Verdict.HAND_OVER
    assert decision.task_generation == setup.scheduler.task_generation == 1


def test_max_steps_ends_the_task_and_a_new_task_starts_counting_afresh(setup):
    setup.scheduler.start_task()
    generation = setup.scheduler.task_generation
    assert [setup.scheduler.count_step(generation, 3) for _ in range(3)] == [False, False, True]
    assert not setup.scheduler.task_active
    assert setup.offer(setup.frame()).verdict is Verdict.NO_TASK
    assert not setup.scheduler.count_step(generation, 3)  # a late step of the ended task

    setup.scheduler.start_task()
    assert setup.scheduler.task_active
    assert not setup.scheduler.count_step(setup.scheduler.task_generation, 3)


def test_only_the_active_task_s_answers_are_current(setup):
    setup.scheduler.start_task()
    first = setup.scheduler.task_generation
    assert setup.scheduler.is_current(first)
    setup.scheduler.count_step(first, 1)  # max_steps reached: the task ended
    assert not setup.scheduler.is_current(first)
    setup.scheduler.start_task()
    second = setup.scheduler.task_generation
    assert setup.scheduler.is_current(second) and not setup.scheduler.is_current(first)
    setup.scheduler.clear_task()
    assert not setup.scheduler.is_current(second)


@pytest.mark.parametrize("max_steps", [0, -1, -1_000_000_000])
def test_max_steps_zero_or_less_means_until_cleared(setup, max_steps):
    generation = setup.scheduler.task_generation
    assert not any(setup.scheduler.count_step(generation, max_steps) for _ in range(1000))
    assert setup.scheduler.task_active
    assert setup.scheduler.clear_task()
    assert not setup.scheduler.task_active
    assert not setup.scheduler.clear_task()  # nothing left to clear


def test_steps_of_an_earlier_task_do_not_count_for_the_new_one(setup):
    setup.scheduler.start_task()
    old = setup.scheduler.task_generation
    decision = setup.offer(setup.frame())  # its decision is still being computed...
    assert decision.task_generation == old
    setup.scheduler.start_task()  # ...when a new task arrives
    new = setup.scheduler.task_generation
    assert not setup.scheduler.count_step(old, 1)  # the old task's output: not a step
    assert setup.scheduler.task_active
    assert setup.scheduler.count_step(new, 1)


def test_a_cleared_task_ignores_the_step_that_was_in_flight(setup):
    generation = setup.scheduler.task_generation
    setup.scheduler.clear_task()
    assert not setup.scheduler.count_step(generation, 1)
    setup.scheduler.start_task()
    assert setup.scheduler.task_generation == generation + 2


def test_steps_counted_from_many_threads_end_the_task_exactly_once(setup):
    setup.scheduler.start_task()
    generation = setup.scheduler.task_generation
    endings: list[bool] = []
    lock = threading.Lock()

    def worker():
        for _ in range(250):
            ended = setup.scheduler.count_step(generation, 500)
            with lock:
                endings.append(ended)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
    assert endings.count(True) == 1 and not setup.scheduler.task_active
