"""The e-stop and input-watchdog state (robot/safety_stops.py), on an injected clock."""

from __future__ import annotations

from manipulation_policy.robot.safety_stops import (
    ESTOP_REASON,
    EstopGate,
    InputWatchdog,
    SafetyStops,
)

SEC = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 5 * SEC

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * SEC)


def test_a_disarmed_watchdog_finds_nothing_wrong():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    clock.advance(100.0)
    assert watchdog.problem(1.0) is None


def test_a_camera_is_watched_once_its_first_frame_came():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    watchdog.arm()
    clock.advance(10.0)
    assert watchdog.problem(1.0) is None  # nothing seen, nothing acted on: no stop
    watchdog.camera_frame_received()
    clock.advance(0.9)
    assert watchdog.problem(1.0) is None
    clock.advance(0.2)
    assert watchdog.problem(1.0) == "no camera frame for 1.10 s (input_timeout_sec=1)"


def test_each_of_several_cameras_is_watched_and_a_stopped_one_is_named():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    watchdog.watch_cameras(("wrist", "front"))
    watchdog.arm()
    watchdog.camera_frame_received("wrist")
    watchdog.camera_frame_received("front")
    watchdog.camera_frame_received()  # the unnamed camera is not one of them: ignored
    clock.advance(0.6)
    watchdog.camera_frame_received("wrist")  # the front camera stops
    clock.advance(0.5)
    assert watchdog.problem(1.0) == (
        "no camera frame from front for 1.10 s (input_timeout_sec=1)"
    )
    watchdog.camera_frame_received("front")
    assert watchdog.problem(1.0) is None
    clock.advance(1.2)
    assert watchdog.problem(1.0).startswith("no camera frame from wrist for 1.70 s")


def test_a_frame_before_activation_does_not_count_against_it():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    watchdog.camera_frame_received()
    clock.advance(30.0)
    watchdog.arm()  # 30 s after the last frame: the timeout counts from here
    clock.advance(0.5)
    assert watchdog.problem(1.0) is None
    clock.advance(0.6)
    assert watchdog.problem(1.0).startswith("no camera frame for 1.10 s")


def test_a_camera_that_stops_trips_it_and_one_that_resumes_clears_it():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    watchdog.arm()
    for _ in range(20):
        clock.advance(0.1)
        watchdog.camera_frame_received()
        assert watchdog.problem(0.5) is None
    clock.advance(0.51)
    assert watchdog.problem(0.5).startswith("no camera frame for 0.51 s")
    watchdog.camera_frame_received()
    assert watchdog.problem(0.5) is None


def test_joint_states_are_watched_once_the_first_arrived():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    watchdog.arm()

    def camera_runs(seconds: float) -> None:
        for _ in range(round(seconds / 0.1)):
            clock.advance(0.1)
            watchdog.camera_frame_received()

    camera_runs(3.0)
    assert watchdog.problem(1.0) is None  # a robot without joint states is not held
    watchdog.joint_state_received()
    camera_runs(0.9)
    assert watchdog.problem(1.0) is None
    camera_runs(0.2)
    assert watchdog.problem(1.0).startswith("no joint state for 1.1")
    watchdog.joint_state_received()
    assert watchdog.problem(1.0) is None


def test_the_timeout_is_read_at_each_check():
    clock = Clock()
    watchdog = InputWatchdog(clock)
    watchdog.arm()
    watchdog.camera_frame_received()
    clock.advance(2.0)
    assert watchdog.problem(1.0) is not None
    assert watchdog.problem(5.0) is None


def test_estop_engages_on_true_and_releases_only_on_an_explicit_false():
    stops = SafetyStops()
    assert stops.hold_reason() is None
    change = stops.set_estop(True)
    assert change is not None and change.holding and change.reason == ESTOP_REASON
    assert stops.set_estop(True) is None  # repeated: no change
    assert stops.hold_reason() == ESTOP_REASON
    change = stops.set_estop(False)
    assert change is not None and not change.holding and change.reason is None
    assert stops.hold_reason() is None
    assert stops.counts()["estop_engaged"] == 1


def test_releasing_the_estop_still_holds_while_inputs_are_stale():
    stops = SafetyStops()
    stops.set_estop(True)
    assert stops.set_input_problem("no camera frame for 2.00 s") is not None
    assert stops.hold_reason() == ESTOP_REASON  # the e-stop says it first
    change = stops.set_estop(False)
    assert change.holding and change.reason == "no camera frame for 2.00 s"
    change = stops.set_input_problem(None)
    assert change is not None and not change.holding
    assert stops.hold_reason() is None


def test_a_watchdog_trip_is_one_change_however_often_it_is_seen():
    stops = SafetyStops()
    assert stops.set_input_problem("no camera frame for 1.10 s") is not None
    assert stops.set_input_problem("no camera frame for 1.20 s") is None
    assert stops.hold_reason() == "no camera frame for 1.20 s"  # the newest words
    assert stops.set_input_problem(None) is not None
    assert stops.set_input_problem(None) is None
    assert stops.counts()["watchdog_trips"] == 1
    stops.set_input_problem("no joint state for 1.00 s")
    stops.clear_input_problem()
    assert stops.hold_reason() is None


class Seconds:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_estop_gate_opens_at_once_once_the_topic_was_heard():
    clock = Seconds()
    gate = EstopGate(clock, settle_sec=0.5)
    gate.arm()
    assert gate.is_open(heard=True, publishers=lambda: 1)


def test_the_estop_gate_waits_the_settle_time_when_nobody_publishes():
    clock = Seconds()
    gate = EstopGate(clock, settle_sec=0.5)
    assert gate.is_open(heard=False, publishers=lambda: 0)  # not armed: not active
    gate.arm()
    assert not gate.is_open(heard=False, publishers=lambda: 0)
    clock.now += 0.49
    assert not gate.is_open(heard=False, publishers=lambda: 0)
    clock.now += 0.02
    assert gate.is_open(heard=False, publishers=lambda: 0)


def test_a_publisher_that_has_not_delivered_yet_keeps_it_shut_for_twice_as_long():
    clock = Seconds()
    gate = EstopGate(clock, settle_sec=0.5)
    gate.arm()
    clock.now += 0.6
    assert not gate.is_open(heard=False, publishers=lambda: 1)
    clock.now += 0.41
    assert gate.is_open(heard=False, publishers=lambda: 1)  # bounded: never shut for good


def test_any_estop_message_is_hearing_it():
    stops = SafetyStops()
    assert not stops.estop_heard
    assert stops.set_estop(False) is None  # no change, but heard
    assert stops.estop_heard
