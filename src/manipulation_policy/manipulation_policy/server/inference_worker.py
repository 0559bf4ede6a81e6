"""Model instances, each predicting one request at a time, and a bounded line of
requests waiting for them.

A model on a GPU gains nothing from concurrent calls on one instance and may break
under them, so each model instance (``model_slots``: one backend object, one
dedicated daemon thread) runs its predictions one by one, never on the asyncio
event loop. With one instance (the default) predictions run one at a time; with N
(``--model-instances``) up to N run at once, each on a free instance. Requests are
admitted only while fewer than ``max_queue`` wait behind those being predicted;
past that the caller is told at once (QueueFullError, answered 503), instead of
every request getting slower.

With ``max_batch_size > 1`` the requests waiting for the model run together
as one batch (``batching.MicroBatcher``: the backend's ``predict_batch`` when
it has one), up to one batch per instance at once; ``max_queue`` still counts
the requests waiting behind them.

Each model call (one prediction, or one batch) has a deadline. Python cannot
stop a thread, so a call past its deadline keeps its instance's thread; its
request (every request of its batch) is answered at once
(PredictionTimeoutError), and that instance is out of service until its backend
returns, while the others keep serving. When every instance is stuck the worker
is ``stuck``: it admits nothing (BackendStuckError), answers the requests that
were already waiting the same way, reports why, and recovers by itself when a
call ends. The model threads are daemons, so a backend that never returns
cannot keep the process alive at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Optional, Union

from manipulation_policy.core.policy_types import Observation
from manipulation_policy.server.batching import MicroBatcher, isolated_batch_call
from manipulation_policy.server.model_slots import (
    BackendCrashError,
    ModelInstance,
    ModelSlot,
    ModelThread,
    SlotPool,
    crash_error,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "BackendCrashError",
    "BackendStuckError",
    "ClientGoneError",
    "InferenceWorker",
    "ModelInstance",
    "ModelThread",
    "PredictionTimeoutError",
    "QueueFullError",
    "crash_error",
]

DEFAULT_DEADLINE_S = 10.0


class QueueFullError(Exception):
    """No room for another request; retry later."""


class ClientGoneError(Exception):
    """The client disconnected while its request waited; the model was not run."""


class PredictionTimeoutError(Exception):
    """This request's prediction passed its deadline (it may still be running)."""


class BackendStuckError(Exception):
    """Earlier predictions are still running past their deadline on every model
    instance; nothing can run now."""


class InferenceWorker:
    """Runs ``predict`` calls (or batches) on the model instances' threads, at most one
    per instance at a time, bounds how many requests wait and how long one model
    call may take.

    ``predict`` is the model's predict (one instance, with ``predict_batch``), or one
    ``ModelInstance`` per instance. Admission and waiting happen on the event loop
    thread; only ``predict`` (``predict_batch``) runs on the model threads.
    """

    def __init__(
        self,
        predict: Union[Callable[[Observation], Any], Sequence[ModelInstance]],
        max_queue: int,
        deadline_s: float = DEFAULT_DEADLINE_S,
        clock: Callable[[], float] = time.monotonic,
        *,
        predict_batch: Optional[Callable[[list[Observation]], list]] = None,
        max_batch_size: int = 1,
        batch_window_s: float = 0.0,
        on_batch: Optional[Callable[[int, float], None]] = None,
    ):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if callable(predict):
            instances: Sequence[ModelInstance] = [ModelInstance(predict, predict_batch)]
        else:
            if predict_batch is not None:
                raise ValueError("predict_batch is given per ModelInstance")
            instances = list(predict)
        self._slots = SlotPool(instances)
        self.max_queue = max_queue
        self.deadline_s = deadline_s
        self._clock = clock
        self._admitted = 0
        self._batcher = self._make_batcher(max_batch_size, batch_window_s, on_batch)

    @property
    def model_instances(self) -> int:
        return len(self._slots)

    @property
    def queue_depth(self) -> int:
        """Admitted requests not being predicted right now (decoding or waiting)."""
        return max(self._admitted - self.in_prediction, 0)

    @property
    def busy(self) -> int:
        """Model instances running a prediction (or a batch) now: 0 or 1 with one."""
        return self._slots.busy

    @property
    def in_prediction(self) -> int:
        """Requests whose prediction is running now (whole batches when batching)."""
        if self._batcher is not None:
            return self._batcher.running
        return self._slots.running_for_callers()

    @property
    def max_batch_size(self) -> int:
        return self._batcher.max_batch_size if self._batcher is not None else 1

    @property
    def batcher(self) -> Optional[MicroBatcher]:
        return self._batcher

    def stuck_instances(self) -> int:
        """Model instances whose running call is past its deadline."""
        now = self._clock()
        return sum(
            slot.overdue(now, self.deadline_s) is not None for slot in self._slots.slots
        )

    def instances_report(self) -> list[dict[str, Any]]:
        """Each instance: busy, stuck (past its deadline), model calls so far."""
        now = self._clock()
        return [
            {
                "busy": slot.busy,
                "stuck": slot.overdue(now, self.deadline_s) is not None,
                "calls": slot.calls,
            }
            for slot in self._slots.slots
        ]

    def stuck_for(self) -> Optional[float]:
        """Seconds every instance's running call has been past its deadline (the least
        overdue one's), else None: one instance that can still serve is enough."""
        now = self._clock()
        overdue = [slot.overdue(now, self.deadline_s) for slot in self._slots.slots]
        if any(late is None for late in overdue):
            return None
        return min(overdue)  # type: ignore[type-var]

    def health_problem(self) -> Optional[str]:
        """Why the server cannot serve predictions now, or None when it can."""
        overdue = self.stuck_for()
        if overdue is None:
            return None
        running = overdue + self.deadline_s
        what = "a batch of predictions" if self._batcher is not None else "a prediction"
        if self.model_instances == 1:
            return (
                f"{what} has been running for {running:.1f} s, past the "
                f"{self.deadline_s:g} s deadline; /infer answers 503 until the backend returns"
            )
        return (
            f"all {self.model_instances} model instances are stuck: on each {what} has "
            f"been running for {running:.1f} s or more, past the {self.deadline_s:g} s "
            "deadline; /infer answers 503 until a backend returns"
        )

    def refusal(self) -> Optional[Exception]:
        """Why ``try_admit`` would refuse a request now (BackendStuckError or
        QueueFullError), or None; takes no place."""
        # Those running + a free instance's next one + max_queue waiting behind them.
        # Only touched on the event loop: no lock needed.
        problem = self.health_problem()
        if problem is not None:
            return BackendStuckError(problem)
        running = max(self.in_prediction + self._slots.free, 1)
        if self._admitted >= self.max_queue + running:
            return QueueFullError(
                f"{self._admitted} requests already admitted (queue limit {self.max_queue})"
            )
        return None

    def try_admit(self) -> None:
        """Take a place for one request, or raise BackendStuckError / QueueFullError."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        self._admitted += 1

    def release(self) -> None:
        """Give back the place taken by ``try_admit``."""
        self._admitted -= 1

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        self.try_admit()
        try:
            yield
        finally:
            self.release()

    async def predict(
        self,
        observation: Observation,
        client_gone: Optional[Callable[[], Awaitable[bool]]] = None,
    ) -> tuple[Any, float]:
        """Run the model on ``observation`` when its turn comes: (its answer, seconds in
        predict, or in its batch). The answer is what ``predict`` returned (an action chunk
        from ``backends.predictor``), unchecked: the caller checks it.

        ``client_gone`` is asked just before the model runs, so that a request
        whose client gave up while waiting does not cost a prediction.
        """
        if self._batcher is not None:
            return await self._batcher.submit(observation, client_gone)
        slot = await self._slots.acquire(self._stuck_error)
        try:
            if client_gone is not None and await client_gone():
                raise ClientGoneError("client disconnected before its turn")
            predict = functools.partial(_timed_predict, slot.instance.predict)
            return await self._call_on(slot, predict, observation)
        finally:
            self._slots.give_back(slot)

    def _stuck_error(self) -> BackendStuckError:
        """Every instance is still running a call whose caller left (its deadline
        passed, or it was cancelled)."""
        fallback = (
            "the previous prediction is still running"
            if self.model_instances == 1
            else "every model instance is still running an earlier prediction"
        )
        return BackendStuckError(self.health_problem() or fallback)

    async def _call_on(
        self, slot: ModelSlot, function: Callable[[Any], Any], argument: Any
    ) -> Any:
        """``function(argument)`` on ``slot``'s thread, waited for at most the deadline."""
        future = slot.run(function, argument, self._clock())
        try:
            # shield: a timeout or a cancelled request must not cancel the call's
            # future, whose state tells whether the instance is still busy.
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), self.deadline_s
            )
        except asyncio.TimeoutError:
            raise PredictionTimeoutError(
                f"the backend did not answer within the {self.deadline_s:g} s deadline"
            ) from None

    def close(self) -> None:
        """Stop taking work; a prediction already running is not waited for."""
        if self._batcher is not None:
            self._batcher.close()
        self._slots.close()

    # --- micro-batching (max_batch_size > 1) ---------------------------------------

    def _make_batcher(self, max_batch_size, window_s, on_batch) -> Optional[MicroBatcher]:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_size == 1:
            return None
        return MicroBatcher(
            acquire_model=self._batch_turn,
            release_model=self._end_batch_turn,
            max_batch_size=max_batch_size,
            window_s=window_s,
            # Admitted requests still being read or decoded will join: worth the window.
            more_coming=lambda: self._admitted > self._batcher.pending + self._batcher.running,
            gone_error=ClientGoneError,
            on_batch=on_batch,
        )

    async def _batch_turn(self) -> Callable[[list], Awaitable[list]]:
        """A free instance for the next batch: the call that runs a batch on it."""
        slot = await self._slots.acquire(self._stuck_error)
        run_batch = functools.partial(_run_batch, slot.instance)
        return functools.partial(self._call_on, slot, run_batch)

    def _end_batch_turn(self, call: functools.partial) -> None:
        self._slots.give_back(call.args[0])


def _timed_predict(predict: Callable[[Observation], Any], observation: Observation):
    started = time.perf_counter()
    answer = predict(observation)
    return answer, time.perf_counter() - started


def _run_batch(instance: ModelInstance, observations: Sequence[Observation]) -> list:
    """On the model thread: one outcome per observation (its answer or its exception)."""
    outcomes = isolated_batch_call(instance.predict, instance.predict_batch, observations)
    # An answer that is a SystemExit or the like must not reach the event loop as one.
    return [
        crash_error(o) if isinstance(o, BaseException) and not isinstance(o, Exception) else o
        for o in outcomes
    ]
