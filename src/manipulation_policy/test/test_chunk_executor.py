"""ChunkExecutor on a fake clock: due times, exactly-once publishing, late steps, each
merge, underrun, refill, and answers to the wrong request. No ROS, no sleeps."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manipulation_policy.core.policy_types import (
    ActionChunk,
    PolicyAction,
    Pose,
    Quaternion,
    Vector3,
)
from manipulation_policy.robot.executor import (
    REFILL_LATENCY_MARGIN,
    ChunkExecutor,
    ChunkVerdict,
    DueCommand,
)
from manipulation_policy.robot.executor_settings import (
    ChunkMerge,
    ExecutorSettings,
    setting_problem,
)

T0 = 1_700_000_000.0  # node clock: a plausible wall time, so float rounding is real
PERIOD = 0.1


class FakeClock:
    """Seconds since T0 kept apart, so stepping never accumulates rounding."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return T0 + self.offset

    def at(self, offset: float) -> None:
        self.offset = offset


def step(x: float, gripper: float = 1.0, **parts) -> PolicyAction:
    return PolicyAction(
        eef_target=Pose(Vector3(x, 0.0, 0.0), Quaternion()), gripper_command=gripper, **parts
    )


def chunk_of(*xs: float, period: float = PERIOD, **parts) -> ActionChunk:
    return ActionChunk(tuple(step(x, **parts) for x in xs), period)


class Setup:
    """An executor on a fake clock; ``answer`` sends a request stamped ``stamp`` (seconds
    after T0) and hands back ``chunk`` as its answer at the current time."""

    def __init__(self, **settings_values) -> None:
        self.clock = FakeClock()
        self.executor = ChunkExecutor(self.clock, ExecutorSettings(**settings_values))
        self._ids = itertools.count()

    def send(self) -> str:
        request_id = f"r{next(self._ids)}"
        self.executor.request_sent(request_id)
        return request_id

    def answer(self, chunk: ActionChunk, stamp: float, request_id: str | None = None):
        request_id = request_id or self.send()
        return self.executor.accept(chunk, T0 + stamp, request_id)

    def due_at(self, offset: float) -> list[DueCommand]:
        self.clock.at(offset)
        return self.executor.due()

    def xs_at(self, offset: float) -> list[float]:
        return [c.action.eef_target.position.x for c in self.due_at(offset)]


# ------------------------------------------------------------ the timeline


def test_action_i_is_due_at_the_stamp_plus_i_periods_and_published_once():
    s = Setup()
    assert s.answer(chunk_of(0, 1, 2, 3), stamp=0.0).accepted
    for i in range(4):
        if i:
            assert s.due_at(i * PERIOD - 0.01) == []  # not before its time
        (command,) = s.due_at(i * PERIOD)
        assert command.step_index == i
        assert command.due_sec == pytest.approx(T0 + i * PERIOD)
        assert command.observation_stamp_sec == T0  # the header stamp
        assert command.request_id == "r0"
        assert command.action.eef_target.position.x == i
        assert s.due_at(i * PERIOD + 0.05) == []  # once only
    assert s.executor.counts()["published"] == 4


def test_steps_are_published_at_their_due_times():
    s = Setup()
    s.answer(chunk_of(0, 1, 2, 3), stamp=0.0)
    published = {t: s.xs_at(t) for t in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)}
    assert published == {0.0: [0], 0.05: [], 0.1: [1], 0.15: [], 0.2: [2], 0.3: [3]}


def test_a_late_chunk_skips_the_steps_already_due_but_the_latest_published_at_once():
    s = Setup()
    s.clock.at(0.35)  # the answer to an observation stamped 0.0 comes 350 ms late
    s.answer(chunk_of(0, 1, 2, 3, 4, 5), stamp=0.0)
    (command,) = s.executor.due()
    assert (command.step_index, command.due_sec) == (3, pytest.approx(T0 + 0.3))
    assert s.executor.counts()["skipped_late"] == 3
    assert s.xs_at(0.39) == []
    assert s.xs_at(0.4) == [4]


def test_a_late_timer_tick_publishes_only_the_latest_due_step():
    s = Setup()
    s.answer(chunk_of(0, 1, 2, 3, 4), stamp=0.0)
    assert s.xs_at(0.0) == [0]
    assert s.xs_at(0.32) == [3]
    assert s.executor.counts()["skipped_late"] == 2


def test_a_chunk_of_one_is_published_on_arrival_and_opens_no_timeline():
    s = Setup(chunk_merge="crossfade")
    s.clock.at(0.5)
    s.answer(ActionChunk.of(step(7.0)), stamp=0.9)  # stamped ahead of the clock even
    (command,) = s.executor.due()
    assert (command.step_index, command.observation_stamp_sec) == (0, T0 + 0.9)
    assert s.executor.needs_refill()
    s.answer(ActionChunk.of(step(8.0)), stamp=1.0)
    assert s.xs_at(0.6) == [8.0]  # not blended with the one before
    assert [s.due_at(t) for t in (1.0, 5.0, 50.0)] == [[], [], []]  # no hold, no underrun
    assert s.executor.counts()["underruns"] == 0


def test_due_times_stay_exact_far_from_the_epoch():
    s = Setup()
    s.answer(chunk_of(*range(200), period=0.01), stamp=0.0)
    published = [c.step_index for i in range(200) for c in s.due_at(i * 0.01)]
    assert published == list(range(200))


# ------------------------------------------------------------ merging overlapping chunks


def test_replace_the_new_chunk_wins_at_once():
    s = Setup(chunk_merge="replace")
    s.answer(chunk_of(0, 0, 0, 0, 0, 0), stamp=0.0)
    assert s.xs_at(0.0) == [0] and s.xs_at(0.1) == [0]
    s.clock.at(0.23)
    s.answer(chunk_of(1, 2, 3, 4), stamp=0.15)
    assert s.xs_at(0.23) == [1]  # its step 0 (due 0.15): latency compensation
    assert s.xs_at(0.25) == [2]
    assert s.xs_at(0.35) == [3]
    assert s.executor.counts()["superseded"] == 4


@pytest.mark.parametrize("merge", list(ChunkMerge))
def test_a_new_chunk_takes_over_from_its_first_step_not_yet_due_while_a_command_serves(merge):
    s = Setup(chunk_merge=merge, crossfade_steps=1)
    s.answer(chunk_of(*[0.0] * 10), stamp=0.0)
    assert [s.xs_at(t) for t in (0.0, 0.1, 0.2)] == [[0], [0], [0]]
    # Stamped 0.12, it comes at 0.25: its steps due 0.12 and 0.22 are late, but the
    # old step published at 0.2 serves until 0.3, so no extra command now.
    s.clock.at(0.25)
    s.answer(chunk_of(10, 11, 12, 13), stamp=0.12)
    assert s.due_at(0.25) == []
    (command,) = s.due_at(0.32)
    assert command.step_index == 2 and command.due_sec == pytest.approx(T0 + 0.32)
    assert s.executor.counts()["skipped_late"] == 2
    assert s.executor.counts()["published"] == 4  # one per period: 0.0, 0.1, 0.2, 0.32


@pytest.mark.parametrize("merge", list(ChunkMerge))
def test_a_takeover_comes_when_the_serving_command_ends_with_the_step_due_nearest(merge):
    s = Setup(chunk_merge=merge, crossfade_steps=1)
    s.answer(chunk_of(*[0.0] * 10), stamp=0.0)
    assert [s.xs_at(t) for t in (0.0, 0.1, 0.2)] == [[0], [0], [0]]
    # Stamped 0.08, it comes at 0.25 while the step published at 0.2 serves until 0.3.
    # Its steps are due 0.18, 0.28, 0.38: the one due nearest 0.3 is step 2; it takes
    # over at 0.3, not at 0.28 (a period cut short) nor at 0.38 (a period and a half).
    s.clock.at(0.25)
    s.answer(chunk_of(10, 11, 12, 13), stamp=0.08)
    assert s.due_at(0.25) == [] and s.due_at(0.29) == []
    (command,) = s.due_at(0.3)
    assert command.step_index == 2 and command.due_sec == pytest.approx(T0 + 0.28)
    assert s.due_at(0.37) == []
    assert [c.step_index for c in s.due_at(0.38)] == [3]
    assert s.executor.counts()["skipped_late"] == 2


def test_takeovers_keep_one_command_per_period_on_average_whatever_the_phase():
    """Observations from a camera at 1.5 frames a period, 2, 3 or 4 frames apart, each
    answered 2.2 periods after its stamp: the new grids' phases against the old one's
    are 0, 1/3 and 2/3 of a period. Ticks every tenth of a period."""
    s = Setup()
    frame = PERIOD * 2 / 3
    published: list[float] = []
    frames, tick = 0, 0
    for n, gap in enumerate([2, 3, 4, 3] * 50):
        stamp = frames * frame
        arrival = stamp + 2.2 * PERIOD
        while (tick + 1) * PERIOD / 10 < arrival:
            tick += 1
            published += [tick * PERIOD / 10] * len(s.due_at(tick * PERIOD / 10))
        s.clock.at(arrival)
        s.answer(chunk_of(*[float(n)] * 8), stamp=stamp)
        published += [arrival] * len(s.executor.due())
        frames += gap
    published = published[20:]
    intervals = [b - a for a, b in zip(published, published[1:], strict=False)]
    mean = (published[-1] - published[0]) / (len(published) - 1)
    assert mean == pytest.approx(PERIOD, rel=0.02)
    assert 0.5 * PERIOD - 0.011 <= min(intervals) and max(intervals) <= 1.5 * PERIOD + 0.011


def test_a_chunk_replaced_before_it_published_passes_on_the_command_that_serves():
    s = Setup()
    s.answer(chunk_of(*[0.0] * 10), stamp=0.0)
    assert [s.xs_at(t) for t in (0.0, 0.1, 0.2)] == [[0], [0], [0]]  # serves until 0.3
    s.clock.at(0.24)
    s.answer(chunk_of(10, 11, 12, 13), stamp=0.03)
    s.clock.at(0.25)
    # Replaced before any due(): its successor's late step (due 0.24) must wait too.
    s.answer(chunk_of(20, 21, 22, 23), stamp=0.04)
    assert s.due_at(0.25) == []
    assert s.xs_at(0.34) == [23]
    assert s.executor.counts()["published"] == 4  # one per period: 0.0, 0.1, 0.2, 0.34


def test_temporal_ensemble_weighs_every_covering_chunk_as_act_does():
    m = 0.5
    s = Setup(chunk_merge="temporal_ensemble", ensemble_weight=m)
    s.answer(chunk_of(*[1.0] * 10), stamp=0.0)
    s.due_at(0.0)
    s.clock.at(0.2)
    s.answer(chunk_of(*[2.0] * 10), stamp=0.2)
    s.clock.at(0.4)
    s.answer(chunk_of(*[4.0] * 10), stamp=0.4)
    # At 0.4: three predictions, oldest first, weights exp(-0.5 * i):
    # (1 * 1 + 2 * e^-0.5 + 4 * e^-1) / (1 + e^-0.5 + e^-1) = 3.68460 / 1.97441 = 1.86617
    assert s.xs_at(0.4) == pytest.approx([1.8661671])
    # From 1.0 the first chunk has ended:
    # (2 * 1 + 4 * e^-0.5) / (1 + e^-0.5) = 4.42612 / 1.60653 = 2.75508
    assert s.xs_at(1.0) == pytest.approx([2.7550813])
    # From 1.2 only the newest covers its steps.
    assert s.xs_at(1.2) == pytest.approx([4.0])


def test_temporal_ensemble_holds_a_misaligned_older_step_for_its_period():
    s = Setup(chunk_merge="temporal_ensemble", ensemble_weight=0.0)
    s.answer(chunk_of(0, 10, 20, 30), stamp=0.0)
    s.clock.at(0.15)
    s.answer(chunk_of(100, 200, 300), stamp=0.15)
    # due 0.15: the older chunk's step 1 (due 0.1) is in effect; equal weights.
    assert s.xs_at(0.15) == pytest.approx([55.0])
    assert s.xs_at(0.25) == pytest.approx([110.0])  # with the older step 2


def test_crossfade_ramps_from_the_old_timeline_to_the_new_linearly():
    s = Setup(chunk_merge="crossfade", crossfade_steps=4)
    s.answer(chunk_of(*[0.0] * 10), stamp=0.0)
    s.due_at(0.0)
    s.clock.at(0.2)
    s.answer(chunk_of(*[1.0] * 8), stamp=0.2)
    ramp = [x for t in (0.2, 0.3, 0.4, 0.5, 0.6) for x in s.xs_at(t)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_crossfade_needs_no_fade_where_the_old_timeline_has_ended():
    s = Setup(chunk_merge="crossfade", crossfade_steps=4)
    s.answer(chunk_of(0.0, 0.0), stamp=0.0)
    s.clock.at(0.1)
    s.answer(chunk_of(1.0, 1.0, 1.0, 1.0), stamp=0.1)
    assert s.xs_at(0.1) == pytest.approx([0.25])  # old step 1 still in effect; new weighs 1/4
    assert s.xs_at(0.2) == pytest.approx([1.0])  # old chunk over at 0.2


def test_crossfade_from_a_timeline_that_was_itself_fading():
    s = Setup(chunk_merge="crossfade", crossfade_steps=2)
    s.answer(chunk_of(*[0.0] * 10), stamp=0.0)
    s.clock.at(0.1)
    s.answer(chunk_of(*[1.0] * 10), stamp=0.1)
    assert s.xs_at(0.1) == pytest.approx([0.5])
    s.clock.at(0.2)
    s.answer(chunk_of(*[2.0] * 10), stamp=0.2)
    # old timeline at 0.2 is 1.0 (its fade done); new weight 1/2
    assert s.xs_at(0.2) == pytest.approx([1.5])
    assert s.xs_at(0.3) == pytest.approx([2.0])


@pytest.mark.parametrize("merge", list(ChunkMerge))
def test_gripper_and_flags_follow_the_newest_chunk(merge):
    s = Setup(chunk_merge=merge, crossfade_steps=4)
    s.answer(chunk_of(*[0.0] * 10, gripper=0.0, joint_deltas=(0.5,)), stamp=0.0)
    s.due_at(0.0)
    s.clock.at(0.1)
    s.answer(chunk_of(*[1.0] * 10, gripper=1.0), stamp=0.1)
    (command,) = s.due_at(0.1)
    assert command.action.gripper_command == 1.0
    assert command.action.joint_deltas is None


def test_chunks_in_another_frame_are_not_blended():
    s = Setup(chunk_merge="temporal_ensemble", ensemble_weight=0.0)
    s.answer(chunk_of(*[0.0] * 10), stamp=0.0)
    s.clock.at(0.1)
    odom = PolicyAction(reference_frame="odom", eef_target=Pose(Vector3(0.5, 0.0, 0.0)))
    s.answer(ActionChunk((odom,) * 5, PERIOD), stamp=0.1)
    s.clock.at(0.2)
    s.answer(chunk_of(*[1.0] * 10), stamp=0.2)
    assert s.xs_at(0.2) == [1.0]


# ------------------------------------------------------------ underrun and refill


def test_a_timeline_that_runs_dry_publishes_one_hold_and_counts_the_underrun():
    s = Setup()
    s.answer(chunk_of(0, 1, 2), stamp=0.0)
    assert [s.xs_at(t) for t in (0.0, 0.1, 0.2)] == [[0], [1], [2]]
    assert s.due_at(0.29) == []  # the last step has its period
    (hold,) = s.due_at(0.3)
    assert hold.is_underrun_hold and hold.action.is_hold
    assert (hold.request_id, hold.observation_stamp_sec) == ("r0", T0)
    assert hold.due_sec == pytest.approx(T0 + 0.3)
    assert s.due_at(0.4) == [] and s.due_at(2.0) == []
    assert s.executor.counts()["underruns"] == 1
    s.answer(chunk_of(5, 6), stamp=2.0)
    assert s.xs_at(2.0) == [5] and s.xs_at(2.1) == [6]
    assert s.due_at(2.2)[0].is_underrun_hold
    assert s.executor.counts()["underruns"] == 2


def test_no_hold_follows_a_step_published_late_in_the_same_call():
    s = Setup()
    s.clock.at(1.0)
    s.answer(chunk_of(0, 1, 2), stamp=0.0)  # its whole timeline has passed
    assert [c.step_index for c in s.executor.due()] == [2]
    assert s.due_at(1.05) == []
    assert s.due_at(1.1)[0].is_underrun_hold


def test_a_fed_timeline_never_runs_dry():
    s = Setup()
    s.answer(chunk_of(*range(5)), stamp=0.0)
    s.due_at(0.0)
    s.clock.at(0.3)
    s.answer(chunk_of(*range(10, 15)), stamp=0.3)
    published = [c for t in range(10) for c in s.due_at(0.3 + t * PERIOD)]
    assert [c.step_index for c in published[:5]] == [0, 1, 2, 3, 4]
    assert published[5].is_underrun_hold  # only after the second chunk's end, at 0.8
    assert published[5].due_sec == pytest.approx(T0 + 0.8)


def test_refill_when_the_remaining_timeline_falls_to_the_horizon():
    s = Setup(refill_horizon_sec=0.25)
    assert s.executor.needs_refill()  # nothing on the timeline
    request_id = s.send()
    assert not s.executor.needs_refill()  # an answer is awaited
    s.answer(chunk_of(*range(10)), stamp=0.0, request_id=request_id)
    s.clock.at(0.7)
    assert s.executor.remaining_sec() == pytest.approx(0.3)
    assert not s.executor.needs_refill()
    s.clock.at(0.75)
    assert s.executor.needs_refill()


def test_the_default_horizon_follows_the_measured_round_trip():
    s = Setup()
    assert s.executor.refill_horizon_sec() == 0.0
    request_id = s.send()
    s.clock.at(0.12)
    s.answer(chunk_of(*range(10)), stamp=0.0, request_id=request_id)
    assert s.executor.refill_horizon_sec() == pytest.approx(REFILL_LATENCY_MARGIN * 0.12)
    s.clock.at(1.0 - REFILL_LATENCY_MARGIN * 0.12 - 0.01)
    assert not s.executor.needs_refill()
    s.clock.at(1.0 - REFILL_LATENCY_MARGIN * 0.12)
    assert s.executor.needs_refill()


def test_a_failed_request_frees_the_refill():
    s = Setup(refill_horizon_sec=0.0)
    request_id = s.send()
    s.executor.request_failed(request_id)
    assert s.executor.needs_refill()


def test_clear_drops_the_timeline_without_an_underrun():
    s = Setup()
    s.answer(chunk_of(0, 1, 2), stamp=0.0)
    s.due_at(0.0)
    s.executor.clear()
    assert [s.due_at(t) for t in (0.1, 0.2, 0.5)] == [[], [], []]
    assert s.executor.counts()["underruns"] == 0


# ------------------------------------------------------------ answers to the wrong request


def test_an_answer_to_no_request_sent_here_is_refused_as_foreign():
    s = Setup()
    s.send()
    verdict = s.answer(chunk_of(1), stamp=0.0, request_id="someone-else")
    assert verdict.verdict is ChunkVerdict.FOREIGN and "someone-else" in verdict.detail
    assert s.due_at(0.0) == []
    assert s.executor.counts()["refused_foreign"] == 1


def test_a_late_answer_to_an_earlier_request_is_never_taken_for_the_newer_one():
    s = Setup()
    timed_out = s.send()
    s.executor.request_failed(timed_out)
    newer = s.send()
    late = s.answer(chunk_of(1), stamp=0.0, request_id=timed_out)
    assert late.verdict is ChunkVerdict.STALE
    assert "not the one awaited ('r1')" in late.detail
    assert s.due_at(0.0) == []
    assert s.answer(chunk_of(2), stamp=0.1, request_id=newer).accepted
    assert s.xs_at(0.1) == [2]


def test_an_answer_after_its_request_failed_is_stale():
    s = Setup()
    request_id = s.send()
    s.executor.request_failed(request_id)
    assert s.answer(chunk_of(1), stamp=0.0, request_id=request_id).verdict is ChunkVerdict.STALE


def test_a_second_answer_to_the_same_request_is_stale():
    s = Setup()
    request_id = s.send()
    assert s.answer(chunk_of(1, 2), stamp=0.0, request_id=request_id).accepted
    again = s.answer(chunk_of(3, 4), stamp=0.0, request_id=request_id)
    assert again.verdict is ChunkVerdict.STALE
    assert s.xs_at(0.0) == [1]


def test_an_answer_about_an_older_observation_than_the_timeline_s_is_stale():
    s = Setup(refill_horizon_sec=10.0)
    s.answer(chunk_of(1, 2), stamp=0.5)
    verdict = s.answer(chunk_of(3, 4), stamp=0.4)
    assert verdict.verdict is ChunkVerdict.STALE and "older than the timeline" in verdict.detail
    assert s.executor.needs_refill()  # the request was answered: the next may go
    assert s.executor.counts()["refused_stale"] == 1


def test_a_request_id_is_used_once():
    s = Setup()
    s.executor.request_sent("a")
    with pytest.raises(ValueError, match="used already"):
        s.executor.request_sent("a")


# ------------------------------------------------------------ several requests in flight


def sent_at(s: Setup, stamp: float) -> str:
    """A request for the observation stamped ``stamp`` (seconds after T0), sent now."""
    request_id = f"p{stamp:g}"
    s.executor.request_sent(request_id, T0 + stamp)
    return request_id


def test_two_outstanding_requests_are_both_accepted_in_stamp_order():
    s = Setup(refill_horizon_sec=0.0)
    first, second = sent_at(s, 0.0), sent_at(s, 0.2)
    assert s.executor.in_flight() == 2
    s.clock.at(0.3)
    assert s.executor.accept(chunk_of(*range(8)), T0, first).accepted
    assert s.executor.in_flight() == 1
    s.clock.at(0.5)
    assert s.executor.accept(chunk_of(*range(10, 18)), T0 + 0.2, second).accepted
    assert s.executor.in_flight() == 0
    assert s.xs_at(0.5) == [13]  # the newer chunk owns the timeline: its step at 0.5
    assert s.executor.counts()["accepted"] == 2


def test_an_older_request_s_answer_after_a_newer_one_s_was_accepted_is_stale():
    s = Setup(refill_horizon_sec=0.0)
    older, newer = sent_at(s, 0.0), sent_at(s, 0.2)
    s.clock.at(0.3)
    assert s.executor.accept(chunk_of(*range(10, 18)), T0 + 0.2, newer).accepted
    late = s.executor.accept(chunk_of(*range(8)), T0, older)
    assert late.verdict is ChunkVerdict.STALE and "older than the timeline" in late.detail
    assert s.executor.in_flight() == 0  # answered, if unusable
    assert s.xs_at(0.3) == [11]
    assert s.executor.counts()["refused_stale"] == 1


def test_a_failed_request_frees_its_place_and_only_its_own():
    s = Setup(refill_horizon_sec=0.0)
    first, second = sent_at(s, 0.0), sent_at(s, 0.1)
    assert not s.executor.needs_refill(max_in_flight=2)
    s.executor.request_failed(first)
    assert s.executor.in_flight() == 1
    assert s.executor.needs_refill(max_in_flight=2)
    assert s.executor.accept(chunk_of(1), T0, first).verdict is ChunkVerdict.STALE
    assert "not the one awaited ('p0.1')" in s.executor.accept(chunk_of(1), T0, first).detail
    assert s.executor.accept(chunk_of(1, 2), T0 + 0.1, second).accepted


def test_clear_drops_every_outstanding_request():
    s = Setup()
    first, second = sent_at(s, 0.0), sent_at(s, 0.1)
    s.executor.clear()
    assert s.executor.in_flight() == 0
    for request_id, stamp in ((first, 0.0), (second, 0.1)):
        verdict = s.executor.accept(chunk_of(1, 2), T0 + stamp, request_id)
        assert verdict.verdict is ChunkVerdict.STALE


def test_the_projected_timeline_counts_what_the_requests_in_flight_will_cover():
    s = Setup(refill_horizon_sec=0.25)
    first = sent_at(s, 0.0)
    s.clock.at(0.2)
    s.executor.accept(chunk_of(*range(8)), T0, first)  # 8 x 0.1: dry at 0.8
    s.clock.at(0.55)
    assert s.executor.projected_remaining_sec() == pytest.approx(0.25)
    assert s.executor.needs_refill(max_in_flight=2)
    sent_at(s, 0.55)  # expected to cover up to 0.55 + 0.8
    assert s.executor.remaining_sec() == pytest.approx(0.25)
    assert s.executor.projected_remaining_sec() == pytest.approx(0.8)
    assert not s.executor.needs_refill(max_in_flight=2)
    s.clock.at(1.1)  # the accepted timeline ran dry; the one in flight is late
    assert s.executor.projected_remaining_sec() == pytest.approx(0.25)
    assert s.executor.needs_refill(max_in_flight=2)
    sent_at(s, 1.1)
    assert not s.executor.needs_refill(max_in_flight=2)
    assert not s.executor.needs_refill(max_in_flight=3)  # 1.1 + 0.8 - 1.1 > 0.25


def test_a_request_without_a_stamp_or_before_a_multi_step_chunk_covers_nothing():
    s = Setup(refill_horizon_sec=0.0)
    sent_at(s, 0.0)
    assert s.executor.projected_remaining_sec() == 0.0  # no chunk's span known yet
    assert s.executor.needs_refill(max_in_flight=2)
    s.send()  # no stamp
    s.answer(chunk_of(*range(4)), stamp=0.0, request_id="p0")
    assert s.executor.in_flight() == 1
    assert s.executor.projected_remaining_sec() == pytest.approx(0.4)


def test_with_one_in_flight_the_rule_is_the_old_one():
    s = Setup(refill_horizon_sec=0.25)
    first = sent_at(s, 0.0)
    assert not s.executor.needs_refill()  # the default: one in flight
    s.executor.accept(chunk_of(*range(10)), T0, first)
    sent_at(s, 0.5)
    s.clock.at(0.9)  # the timeline has 0.1 left: still no send while one is outstanding
    assert not s.executor.needs_refill(max_in_flight=1)
    assert s.executor.needs_refill(max_in_flight=3) is False  # projected: 0.5 + 1.0 - 0.9


# ------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "name, value",
    [
        ("chunk_merge", "average"),
        ("ensemble_weight", -0.1),
        ("ensemble_weight", math.inf),
        ("ensemble_weight", "0.1"),
        ("crossfade_steps", 0),
        ("crossfade_steps", 2.0),
        ("refill_horizon_sec", -1.0),
        ("refill_horizon_sec", math.nan),
    ],
)
def test_an_invalid_setting_is_refused_naming_it(name, value):
    problem = setting_problem(name, value)
    assert problem and problem.startswith(name)
    with pytest.raises(ValueError, match=f"^{name}"):
        ExecutorSettings(**{name: value})


def test_settings_from_parameter_values():
    values = {"chunk_merge": "crossfade", "crossfade_steps": 3, "unrelated": 1}
    settings_ = ExecutorSettings.from_values(values)
    assert settings_.chunk_merge is ChunkMerge.CROSSFADE
    assert (settings_.crossfade_steps, settings_.refill_horizon_sec) == (3, None)
    fine = [("ensemble_weight", 0), ("refill_horizon_sec", 0.0), ("crossfade_steps", 1)]
    assert [setting_problem(name, value) for name, value in fine] == [None] * 3


# ------------------------------------------------------------ properties

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0.0, 0.25)),
        st.tuples(st.just("send"), st.just(0)),
        st.tuples(st.just("fail"), st.just(0)),
        st.tuples(
            st.just("answer"),
            st.tuples(
                st.integers(0, 4),  # which request, counted back from the newest
                st.integers(1, 6),  # chunk length
                st.sampled_from([0.05, 0.1, 0.2]),
            ),
        ),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations, merge=st.sampled_from(list(ChunkMerge)))
def test_every_step_is_published_at_most_once_never_early_and_newer_never_before_older(
    ops, merge
):
    s = Setup(chunk_merge=merge, crossfade_steps=3)
    sent: list[tuple[str, float]] = []  # request id, observation stamp (its send time)
    published: list[tuple[DueCommand, float]] = []
    outstanding: set[str] = set()  # several may be in flight (pipelining)
    for op, arg in ops:
        if op == "advance":
            s.clock.at(s.clock.offset + arg)
        elif op == "send":
            request_id = f"r{len(sent)}"
            s.executor.request_sent(request_id, T0 + s.clock.offset)
            sent.append((request_id, s.clock.offset))
            outstanding.add(request_id)
        elif op == "fail" and sent:
            s.executor.request_failed(sent[-1][0])
            outstanding.discard(sent[-1][0])
        elif op == "answer" and sent:
            back, length, period = arg
            request_id, stamp = sent[max(0, len(sent) - 1 - back)]
            chunk = ActionChunk(tuple(step(i) for i in range(length)), period)
            s.executor.accept(chunk, T0 + stamp, request_id)
            outstanding.discard(request_id)
        published += [(c, s.clock()) for c in s.executor.due()]
        assert s.executor.in_flight() == len(outstanding)
        assert s.executor.projected_remaining_sec() >= s.executor.remaining_sec()
    steps = [(c, now) for c, now in published if not c.is_underrun_hold]
    keys = [(c.request_id, c.step_index) for c, _ in steps]
    assert len(keys) == len(set(keys))
    assert all(c.due_sec <= now + 1e-6 for c, now in steps)
    stamps = [c.observation_stamp_sec for c, _ in steps]
    assert stamps == sorted(stamps)
    for request_id in {c.request_id for c, _ in steps}:
        mine = [c for c, _ in steps if c.request_id == request_id]
        assert [c.due_sec for c in mine] == sorted(c.due_sec for c in mine)
    holds = [c.is_underrun_hold for c, _ in published]
    # one hold per dry spell
    assert not any(a and b for a, b in zip(holds, holds[1:], strict=False))
    counts = s.executor.counts()
    assert (counts["published"], counts["underruns"]) == (len(steps), sum(holds))


# ------------------------------------------------------------ real-time chunking


def test_pending_is_the_unpublished_rest_of_the_plan_and_the_measured_delay():
    s = Setup()
    assert s.executor.pending("base_link", 0) == ((), None)  # no plan, nothing measured
    request_id = s.send()
    s.clock.at(0.15)
    s.executor.accept(chunk_of(0, 1, 2, 3, 4), T0 + 0.1, request_id)
    s.due_at(0.2)  # publishes step 1 (due 0.2); step 0 was late
    actions, delay = s.executor.pending("base_link", 0)
    assert [a.eef_target.position.x for a in actions] == [2, 3, 4]
    assert delay == pytest.approx(0.15)
    s.due_at(0.5)
    assert s.executor.pending("base_link", 0)[0] == ()  # all out


def test_pending_is_empty_when_the_plan_does_not_fit_the_request():
    s = Setup()
    s.answer(chunk_of(0, 1, 2, joint_deltas=(0.1, 0.2)), stamp=0.0)
    assert len(s.executor.pending("base_link", 2)[0]) == 3
    assert s.executor.pending("base_link", 3)[0] == ()  # a joint was added since
    assert s.executor.pending("odom", 2)[0] == ()  # another frame


def test_pending_named_joint_values_fit_any_joint_count_unnamed_ones_must_match():
    s = Setup()
    s.answer(chunk_of(0, 1, 2, joint_positions=(0.1,), joint_names=("elbow",)), stamp=0.0)
    assert len(s.executor.pending("base_link", 3)[0]) == 3  # named: which joint is said
    s = Setup()
    s.answer(chunk_of(0, 1, 2, joint_positions=(0.1, 0.2)), stamp=0.0)
    assert len(s.executor.pending("base_link", 2)[0]) == 3
    assert s.executor.pending("base_link", 3)[0] == ()  # one per joint, and a joint was added
