"""When a policy node publishes only holds, whatever its policy says. No ROS.

Two causes, either one enough:

- the emergency stop (``/manipulation/estop``, std_msgs/Bool): engaged by a true,
  released only by an explicit false;
- the input watchdog: no camera frame (from any one of several cameras), or no joint
  state, received within ``input_timeout_sec`` (from activation, or from the last one,
  whichever is later).
  Each input is watched once its first message arrived: before that the node has
  nothing to act on and commands nothing (it logs that it waits for images), and a
  robot that publishes no joint states is not held forever. Receipt time counts,
  not the message's stamp: a stamp says how old the picture is
  (``max_observation_age_sec`` judges that), not whether the camera still runs.

While a cause holds, the node starts no inference, drops the planned steps and
publishes a hold instead of any action.

A stop latched before the node started reaches it only once DDS has matched the two
(tens of milliseconds, more on a loaded machine). So that no inference starts in that
window, an activated node first waits until it has heard the e-stop topic, or
``ESTOP_SETTLE_SEC`` has passed with no publisher on it, or twice that in any case
(``EstopGate``). ``SafetyStops`` keeps the state; the ROS glue
(``nodes/node_safety.py``) logs and reports each change it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

ESTOP_REASON = "emergency stop engaged"
ESTOP_SETTLE_SEC = 0.5


class InputWatchdog:
    """Receipt times of the camera (or of each of several named cameras) and the joint
    states against a timeout.

    ``clock_ns`` is monotonic. Disarmed (not active), it finds nothing wrong."""

    def __init__(self, clock_ns: Callable[[], int]) -> None:
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._armed_ns: Optional[int] = None
        # Camera name -> receipt time of its newest frame; "" is the one unnamed camera.
        self._camera_ns: dict[str, Optional[int]] = {"": None}
        self._joint_state_ns: Optional[int] = None

    def arm(self) -> None:
        """Start watching (the node was activated): the camera has a timeout from now."""
        with self._lock:
            self._armed_ns = self._clock_ns()

    def disarm(self) -> None:
        with self._lock:
            self._armed_ns = None

    def watch_cameras(self, names: tuple[str, ...]) -> None:
        """Watch each of these named cameras instead of the one unnamed camera."""
        with self._lock:
            self._camera_ns = {name: None for name in names} if names else {"": None}

    def camera_frame_received(self, name: str = "") -> None:
        with self._lock:
            if name in self._camera_ns:
                self._camera_ns[name] = self._clock_ns()

    def joint_state_received(self) -> None:
        with self._lock:
            self._joint_state_ns = self._clock_ns()

    def problem(self, timeout_sec: float) -> Optional[str]:
        """What is stale ("no camera frame for 1.20 s (input_timeout_sec=1)", "no camera
        frame from wrist for ..."), or None."""
        with self._lock:
            armed, cameras, joints = self._armed_ns, dict(self._camera_ns), self._joint_state_ns
        if armed is None:
            return None
        now = self._clock_ns()
        watched = [
            ("camera frame" + (f" from {name}" if name else ""), last)
            for name, last in cameras.items()
        ]
        for what, last in (*watched, ("joint state", joints)):
            if last is not None and now - max(last, armed) > timeout_sec * 1e9:
                return (f"no {what} for {(now - max(last, armed)) / 1e9:.2f} s "
                        f"(input_timeout_sec={timeout_sec:g})")
        return None


class EstopGate:
    """Whether the e-stop's state is known yet after an activation (see the module
    docstring). ``clock`` is monotonic, in seconds."""

    def __init__(self, clock: Callable[[], float], settle_sec: float = ESTOP_SETTLE_SEC):
        self._clock = clock
        self._settle_sec = settle_sec
        self._opened_at: Optional[float] = None

    def arm(self) -> None:
        """Activation: from now on, wait."""
        self._opened_at = self._clock()

    def is_open(self, heard: bool, publishers: Callable[[], int]) -> bool:
        """``heard``: an e-stop message arrived (before activation too); ``publishers``:
        how many publishers the topic has now (asked only when it matters)."""
        if heard or self._opened_at is None:
            return True
        waited = self._clock() - self._opened_at
        if waited >= 2 * self._settle_sec:
            return True
        return waited >= self._settle_sec and publishers() == 0


@dataclass(frozen=True)
class StopChange:
    """A change of the hold state: ``holding`` after it, and why (None once released)."""

    holding: bool
    reason: Optional[str]


class SafetyStops:
    """The e-stop and the watchdog's verdict, and the one question they answer:
    why only holds may go out now (``hold_reason``), if at all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._estop = False
        self._estop_heard = False
        self._input_problem: Optional[str] = None
        self._counts = {"estop_engaged": 0, "watchdog_trips": 0}

    @property
    def estop_engaged(self) -> bool:
        with self._lock:
            return self._estop

    @property
    def estop_heard(self) -> bool:
        """Whether any e-stop message (true or false) has arrived."""
        with self._lock:
            return self._estop_heard

    @property
    def input_problem(self) -> Optional[str]:
        with self._lock:
            return self._input_problem

    def hold_reason(self) -> Optional[str]:
        with self._lock:
            return self._reason()

    def _reason(self) -> Optional[str]:
        if self._estop:
            return ESTOP_REASON
        return self._input_problem

    def set_estop(self, engaged: bool) -> Optional[StopChange]:
        """Engage (True) or release (False, explicitly); the change, or None if none."""
        with self._lock:
            self._estop_heard = True
            if engaged == self._estop:
                return None
            self._estop = engaged
            if engaged:
                self._counts["estop_engaged"] += 1
            return StopChange(self._reason() is not None, self._reason())

    def set_input_problem(self, problem: Optional[str]) -> Optional[StopChange]:
        """The watchdog's newest verdict; a change when inputs went stale or came back."""
        with self._lock:
            was_stale = self._input_problem is not None
            self._input_problem = problem
            if was_stale == (problem is not None):
                return None
            if problem is not None:
                self._counts["watchdog_trips"] += 1
            return StopChange(self._reason() is not None, self._reason())

    def clear_input_problem(self) -> None:
        """Forget the watchdog's verdict (the node stopped watching: deactivated)."""
        with self._lock:
            self._input_problem = None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
