"""Action chunks on a timeline, from policy answer to due commands: pure logic, no ROS.

The node tells the executor when it sends an observation (``request_sent``), hands
it every answer (``accept``), and calls ``due`` on arrival and on each timer tick;
what ``due`` returns is published, each command once. ``needs_refill`` says when
to send the next observation.

- Timeline: action i of a chunk is due at its observation's stamp + i * period.
  The newest accepted chunk owns the timeline; older ones only lend values to
  its steps (``ExecutorSettings.chunk_merge``).
- Late steps: of the steps that became due since the last call, only the latest
  is published (at once: latency compensation); the others are skipped.
- Takeover: a new chunk that arrives while a command of the previous timeline
  still serves (its period has not ended) takes over when that period ends, with
  its step whose due time is nearest that moment (published then, or at its due
  time if later); its earlier steps are skipped. So a takeover is never a second
  command for a period already served, and the interval between commands stays
  within half a period of one period, on average one period, whatever the phase
  of the new chunk's grid (its camera stamp) against the old one's.
- A chunk of one (single-step models, upstream's answers) is published on arrival,
  exactly as before chunks existed, is never blended, and opens no timeline: no
  underrun follows it and a refill is always in order once it is out.
- Underrun: when every step of a chunk is out and its last one has had its period
  with no newer chunk, one hold is published and counted.
- Requests: an answer is taken only for an outstanding request (sent, not yet
  answered, failed or cleared) and only if its observation is no older than the
  newest accepted one's; a late answer to a request no longer awaited never counts.
  Several requests may be outstanding (pipelining: ``remote_max_in_flight``); once a
  newer observation's chunk was accepted, an older one's answer is stale.
- Refill: the next observation is due when the *projected* timeline, the accepted
  one extended by what the outstanding requests are expected to cover (each one's
  observation stamp + the span of the newest multi-step chunk), has no more than
  the refill horizon left, and fewer requests than allowed are outstanding. With
  one allowed, that is: none outstanding and the timeline itself near its end.

The clock is the node clock that observation stamps are on, in seconds.
Thread-safe: the answer arrives on the worker, ``due`` runs on the timer.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from manipulation_policy.core.policy_types import ActionChunk, PolicyAction
from manipulation_policy.robot.action_blending import blend, crossfade_weight, ensemble_weights
from manipulation_policy.robot.executor_settings import ChunkMerge, ExecutorSettings

SecondsClock = Callable[[], float]

# Stamps and periods are floats: a step this close to now counts as due.
DUE_TOLERANCE_SEC = 1e-6
# Request ids remembered to tell a late answer (stale) from one never asked (foreign).
REMEMBERED_REQUESTS = 64
# The automatic refill horizon: this many times the slowest of the recent round trips.
LATENCY_WINDOW = 8
REFILL_LATENCY_MARGIN = 1.5


class ChunkVerdict(enum.Enum):
    ACCEPTED = "accepted"
    FOREIGN = "answers no request sent here"
    STALE = "answers an earlier request, or is older than the chunk on the timeline"


@dataclass(frozen=True)
class Acceptance:
    verdict: ChunkVerdict
    request_id: str
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.verdict is ChunkVerdict.ACCEPTED


@dataclass(frozen=True)
class DueCommand:
    """One command to publish, and where it comes from."""

    action: PolicyAction
    request_id: str
    observation_stamp_sec: float  # the command's header.stamp
    due_sec: float
    step_index: Optional[int]  # None: the hold published when the timeline ran dry

    @property
    def is_underrun_hold(self) -> bool:
        return self.step_index is None


@dataclass(eq=False)
class _Scheduled:
    """An accepted chunk on the timeline, and how far it has been published."""

    chunk: ActionChunk
    stamp_sec: float
    request_id: str
    next_step: int = 0
    first_published: Optional[int] = None
    last_published_sec: float = 0.0
    previous: Optional[_Scheduled] = None  # crossfade: the timeline it fades from
    # Until when a command of the timeline this chunk replaced serves the robot.
    served_until_sec: float = -math.inf
    # Takeover: no step of this chunk goes out before then (the end of the period of
    # the command that served when it arrived).
    not_before_sec: float = -math.inf

    @property
    def period(self) -> float:
        return self.chunk.action_period_sec

    @property
    def multi_step(self) -> bool:
        return len(self.chunk) > 1

    @property
    def end_sec(self) -> float:
        return self.stamp_sec + len(self.chunk) * self.period

    @property
    def all_out(self) -> bool:
        return self.next_step >= len(self.chunk)

    def due_sec(self, step: int) -> float:
        return self.stamp_sec + step * self.period

    def served_until(self) -> float:
        """The end of the period of this chunk's last published step."""
        if not self.multi_step or self.first_published is None:
            return -math.inf
        return self.due_sec(self.next_step - 1) + self.period

    def step_at(self, t: float) -> Optional[int]:
        """The step in effect at ``t`` (each lasts one period from its due time)."""
        step = math.floor((t - self.stamp_sec + DUE_TOLERANCE_SEC) / self.period)
        return step if 0 <= step < len(self.chunk) else None

    def dry_at_sec(self) -> float:
        """When the timeline runs dry: the last step's period after it was published."""
        if not self.all_out:
            return self.end_sec
        return max(self.end_sec, self.last_published_sec + self.period)


class ChunkExecutor:
    def __init__(self, clock: SecondsClock, settings: Optional[ExecutorSettings] = None):
        self._clock = clock
        self._settings = settings or ExecutorSettings()
        self._lock = threading.Lock()
        self._sent: OrderedDict[str, float] = OrderedDict()  # request id -> sent at
        # Request id -> its observation's stamp (None: not given), in the order sent.
        self._outstanding: OrderedDict[str, Optional[float]] = OrderedDict()
        self._span_sec = 0.0  # the newest accepted multi-step chunk's len x period
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._timeline: list[_Scheduled] = []  # oldest first; the last one is the newest
        self._hold_published = False
        self._counts = {
            "accepted": 0,
            "refused_stale": 0,
            "refused_foreign": 0,
            "published": 0,
            "skipped_late": 0,
            "superseded": 0,
            "underruns": 0,
        }

    # ------------------------------------------------------------ settings

    @property
    def settings(self) -> ExecutorSettings:
        return self._settings

    def update_settings(self, settings: ExecutorSettings) -> None:
        """New settings (a parameter change) take effect from the next chunk."""
        with self._lock:
            self._settings = settings

    # ------------------------------------------------------------ requests

    def request_sent(
        self, request_id: str, observation_stamp_sec: Optional[float] = None
    ) -> None:
        """An observation (stamped ``observation_stamp_sec``, node clock) went to the
        policy: its answer is awaited, as are those of the others outstanding."""
        with self._lock:
            if request_id in self._sent:
                raise ValueError(f"request id {request_id!r} was used already")
            self._sent[request_id] = self._clock()
            while len(self._sent) > REMEMBERED_REQUESTS:
                forgotten, _ = self._sent.popitem(last=False)
                self._outstanding.pop(forgotten, None)
            self._outstanding[request_id] = observation_stamp_sec

    def request_failed(self, request_id: str) -> None:
        """The request timed out or failed: its answer is no longer awaited (a late one is
        stale)."""
        with self._lock:
            self._outstanding.pop(request_id, None)

    def in_flight(self) -> int:
        """How many requests are outstanding."""
        with self._lock:
            return len(self._outstanding)

    def accept(
        self, chunk: ActionChunk, observation_stamp_sec: float, request_id: str
    ) -> Acceptance:
        """Put an answer on the timeline, or say why not. Call ``due`` right after."""
        with self._lock:
            refusal = self._refusal(observation_stamp_sec, request_id)
            self._outstanding.pop(request_id, None)  # answered, usable or not
            if refusal is not None:
                self._counts[f"refused_{refusal.verdict.name.lower()}"] += 1
                return refusal
            now = self._clock()
            self._latencies.append(now - self._sent[request_id])
            self._schedule(_Scheduled(chunk, observation_stamp_sec, request_id))
            if len(chunk) > 1:
                self._span_sec = len(chunk) * chunk.action_period_sec
            self._counts["accepted"] += 1
            return Acceptance(ChunkVerdict.ACCEPTED, request_id)

    def _refusal(self, stamp_sec: float, request_id: str) -> Optional[Acceptance]:
        if request_id not in self._sent:
            return Acceptance(ChunkVerdict.FOREIGN, request_id, f"no request {request_id!r} sent")
        if request_id not in self._outstanding:
            awaited = ", ".join(map(repr, self._outstanding)) or "none"
            return Acceptance(
                ChunkVerdict.STALE,
                request_id,
                f"request {request_id!r} is not the one awaited ({awaited})",
            )
        newest = self._newest
        if newest is not None and stamp_sec < newest.stamp_sec - DUE_TOLERANCE_SEC:
            return Acceptance(
                ChunkVerdict.STALE,
                request_id,
                f"its observation ({stamp_sec:.6f}) is older than the timeline's "
                f"({newest.stamp_sec:.6f})",
            )
        return None

    # ------------------------------------------------------------ the timeline

    @property
    def _newest(self) -> Optional[_Scheduled]:
        return self._timeline[-1] if self._timeline else None

    def _schedule(self, new: _Scheduled) -> None:
        """The new chunk owns the timeline; older ones stay only to lend values to it
        (temporal_ensemble: all of them; crossfade: the one it fades from)."""
        old = self._newest
        if old is not None:
            self._counts["superseded"] += len(old.chunk) - old.next_step
            # A chunk replaced before it published anything passes on what it inherited.
            new.served_until_sec = max(old.served_until(), old.served_until_sec)
            self._plan_takeover(new)
        merge = self._settings.chunk_merge
        frame = new.chunk.reference_frame
        blends = new.multi_step and merge is not ChunkMerge.REPLACE
        # Only chunks in the same frame can be blended; a chunk of one is never blended.
        kept = [
            s
            for s in self._timeline
            if blends and s.multi_step and s.chunk.reference_frame == frame
        ]
        if merge is ChunkMerge.CROSSFADE:
            new.previous = kept[-1] if kept else None  # under crossfade: the old newest
            kept = []
        self._timeline = kept + [new]
        self._hold_published = False

    def due(self) -> list[DueCommand]:
        """The commands due now, each returned once (see the module docstring)."""
        with self._lock:
            now = self._clock()
            newest = self._newest
            commands = []
            if newest is None:
                return commands
            if not newest.all_out:
                step = self._latest_due_step(newest, now)
                if step is not None and now + DUE_TOLERANCE_SEC >= newest.not_before_sec:
                    self._counts["skipped_late"] += step - newest.next_step
                    commands.append(self._publish(newest, step, now))
            elif (
                newest.multi_step
                and not self._hold_published
                and now + DUE_TOLERANCE_SEC >= newest.dry_at_sec()
            ):
                self._hold_published = True
                self._counts["underruns"] += 1
                commands.append(
                    DueCommand(
                        PolicyAction.hold(newest.chunk.reference_frame),
                        newest.request_id,
                        newest.stamp_sec,
                        newest.dry_at_sec(),
                        None,
                    )
                )
            self._prune()
            return commands

    def _plan_takeover(self, new: _Scheduled) -> None:
        """A multi-step chunk takes over from the previous timeline when the period of
        that timeline's last command ends, with its step due nearest then. If that
        moment has passed (a tick late, or the timeline ran dry), the late rule still
        holds: no step before that one, and the latest due step goes at once."""
        handover = new.served_until_sec
        if not new.multi_step or handover == -math.inf:
            return  # nothing was published before it
        nearest = math.floor((handover - new.stamp_sec) / new.period + 0.5 + DUE_TOLERANCE_SEC)
        first = min(max(nearest, 0), len(new.chunk) - 1)
        self._counts["skipped_late"] += first
        new.next_step = first
        new.not_before_sec = handover

    @staticmethod
    def _latest_due_step(scheduled: _Scheduled, now: float) -> Optional[int]:
        if not scheduled.multi_step:
            return 0  # published on arrival, whatever its stamp says
        step = scheduled.step_at(now)
        if step is None and now >= scheduled.end_sec:
            step = len(scheduled.chunk) - 1
        return step if step is not None and step >= scheduled.next_step else None

    def _publish(self, scheduled: _Scheduled, step: int, now: float) -> DueCommand:
        if scheduled.first_published is None:
            scheduled.first_published = step
        scheduled.next_step = step + 1
        scheduled.last_published_sec = now
        self._counts["published"] += 1
        return DueCommand(
            self._merged_action(scheduled, step),
            scheduled.request_id,
            scheduled.stamp_sec,
            scheduled.due_sec(step),
            step,
        )

    def _merged_action(self, scheduled: _Scheduled, step: int) -> PolicyAction:
        if self._settings.chunk_merge is ChunkMerge.TEMPORAL_ENSEMBLE:
            t = scheduled.due_sec(step)
            in_effect = [(s, s.step_at(t)) for s in self._timeline]  # oldest first
            actions = [s.chunk.actions[i] for s, i in in_effect if i is not None]
            return blend(actions, ensemble_weights(len(actions), self._settings.ensemble_weight))
        return self._crossfaded(scheduled, step)

    def _crossfaded(self, scheduled: _Scheduled, step: int) -> PolicyAction:
        """The action of ``scheduled`` at ``step``, faded in from the timeline it replaced
        (without a previous timeline: replace)."""
        own = scheduled.chunk.actions[step]
        previous = scheduled.previous
        if previous is None or scheduled.first_published is None:
            return own
        faded_steps = step - scheduled.first_published + 1
        alpha = crossfade_weight(faded_steps, self._settings.crossfade_steps)
        previous_step = previous.step_at(scheduled.due_sec(step))
        if alpha >= 1.0 or previous_step is None:
            return own
        return blend([self._crossfaded(previous, previous_step), own], [1.0 - alpha, alpha])

    def _prune(self) -> None:
        """Forget what can no longer lend a value: every later due time is at or after the
        newest chunk's stamp (observations are accepted in stamp order)."""
        newest = self._timeline[-1]
        self._timeline = [s for s in self._timeline if s.end_sec > newest.stamp_sec or s is newest]
        scheduled = newest
        while scheduled.previous is not None:
            if scheduled.previous.end_sec <= scheduled.stamp_sec:
                scheduled.previous = None
                break
            scheduled = scheduled.previous
        if (
            newest.first_published is not None
            and newest.next_step >= newest.first_published + self._settings.crossfade_steps
        ):
            newest.previous = None

    # ------------------------------------------------------------ refill

    def refill_horizon_sec(self) -> float:
        """The setting, or REFILL_LATENCY_MARGIN times the slowest recent round trip
        (request sent to answer accepted); 0 before any was measured."""
        with self._lock:
            return self._refill_horizon()

    def _refill_horizon(self) -> float:
        if self._settings.refill_horizon_sec is not None:
            return self._settings.refill_horizon_sec
        return REFILL_LATENCY_MARGIN * max(self._latencies, default=0.0)

    def remaining_sec(self) -> float:
        """How long until the timeline runs dry (0 without a multi-step chunk on it)."""
        with self._lock:
            return self._remaining(self._clock())

    def _remaining(self, now: float) -> float:
        newest = self._newest
        if newest is None or not newest.multi_step:
            return 0.0
        return max(0.0, newest.dry_at_sec() - now)

    def projected_remaining_sec(self) -> float:
        """How long until the timeline runs dry once the outstanding requests' chunks
        are on it: each is expected to cover its observation's stamp + the newest
        multi-step chunk's span (nothing without a stamp, or before such a chunk).
        Without outstanding requests, ``remaining_sec``."""
        with self._lock:
            return self._projected_remaining(self._clock())

    def _projected_remaining(self, now: float) -> float:
        remaining = self._remaining(now)
        if self._span_sec <= 0.0:
            return remaining
        covered = [stamp + self._span_sec for stamp in self._outstanding.values()
                   if stamp is not None]
        return max([remaining, *(end - now for end in covered)])

    def needs_refill(self, max_in_flight: int = 1) -> bool:
        """Whether to send the next observation now: fewer than ``max_in_flight`` answers
        are awaited and the projected timeline has no more than the refill horizon left
        (with one allowed: no answer awaited, the timeline near its end)."""
        with self._lock:
            if len(self._outstanding) >= max_in_flight:
                return False
            return (self._projected_remaining(self._clock())
                    <= self._refill_horizon() + DUE_TOLERANCE_SEC)

    # ------------------------------------------------------------ real-time chunking

    def pending(
        self, reference_frame: str, joint_count: int
    ) -> tuple[tuple[PolicyAction, ...], Optional[float]]:
        """What the next observation can tell a policy that conditions on the robot's
        plan (``Observation.pending_actions`` / ``pending_delay_sec``): the newest
        chunk's steps not yet published, oldest first, and the expected delay before
        the next answer takes over (the slowest recent round trip; None before one
        was measured). No actions when there is no multi-step plan, or when the plan
        does not fit the request (another frame, another number of joints): a
        policy is better off without context than with a wrong one."""
        with self._lock:
            newest = self._newest
            delay = max(self._latencies) if self._latencies else None
            if newest is None or not newest.multi_step or newest.all_out:
                return (), delay
            actions = newest.chunk.actions[newest.next_step:]
        fits = all(
            a.reference_frame == reference_frame
            and (
                bool(a.joint_names)  # named joint values need not be one per joint
                or all(v is None or len(v) == joint_count
                       for v in (a.joint_deltas, a.joint_positions))
            )
            for a in actions
        )
        return (actions if fits else ()), delay

    # ------------------------------------------------------------ the rest

    def clear(self) -> None:
        """Drop the timeline and the awaited answers (a new task, an e-stop): nothing
        planned before is published, and no underrun is counted for it."""
        with self._lock:
            self._timeline = []
            self._outstanding.clear()
            self._hold_published = False

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
