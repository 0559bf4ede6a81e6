"""One model, one prediction at a time, a bounded line of requests waiting for it.

A model on a GPU gains nothing from concurrent calls and may break under them,
so predictions run one by one on a dedicated thread, never on the asyncio
event loop. Requests are admitted only while fewer than ``max_queue`` wait
behind the one being predicted; past that the caller is told at once
(QueueFullError, answered 503), instead of every request getting slower.

With ``max_batch_size > 1`` the requests waiting for the model run together
as one batch (``batching.MicroBatcher``: the backend's ``predict_batch`` when
it has one); ``max_queue`` still counts the requests waiting behind it.

Each model call (one prediction, or one batch) has a deadline. Python cannot
stop a thread, so a call past its deadline keeps the model thread; its
request (every request of its batch) is answered at once
(PredictionTimeoutError), and until the backend returns the worker is
``stuck``: it admits nothing (BackendStuckError), answers the requests that
were already waiting the same way, reports why, and recovers by itself when
the call ends. The model thread is a daemon, so a backend that never returns
cannot keep the process alive at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Optional

from manipulation_policy.core.policy_types import Observation
from manipulation_policy.server.batching import MicroBatcher, isolated_batch_call

DEFAULT_DEADLINE_S = 10.0


class QueueFullError(Exception):
    """No room for another request; retry later."""


class ClientGoneError(Exception):
    """The client disconnected while its request waited; the model was not run."""


class PredictionTimeoutError(Exception):
    """This request's prediction passed its deadline (it may still be running)."""


class BackendStuckError(Exception):
    """An earlier prediction is still running past its deadline; nothing can run now."""


class BackendCrashError(Exception):
    """The backend raised a BaseException that is not an Exception (e.g. SystemExit)."""


def crash_error(exc: BaseException) -> BackendCrashError:
    return BackendCrashError(f"{type(exc).__name__}: {exc}")


class ModelThread:
    """A daemon thread that runs submitted calls one by one, in order.

    Unlike a ThreadPoolExecutor, whose threads the interpreter joins at exit,
    a call that never returns does not keep the process alive, and no failure
    of a call (a BaseException included) ends the thread.
    """

    def __init__(self, name: str = "policy-inference"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, function, args))
        return future

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            future, function, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
            except BaseException as exc:  # noqa: BLE001 - SystemExit etc. must not end the thread
                future.set_exception(crash_error(exc))
            else:
                future.set_result(result)

    def close(self) -> None:
        """Stop after the call in progress (never waits for it)."""
        self._calls.put(None)


class InferenceWorker:
    """Serialises ``predict`` calls (or batches) on one thread, bounds how many
    requests wait and how long one model call may take.

    Admission and waiting happen on the event loop thread; only ``predict``
    (``predict_batch``) runs on the model thread.
    """

    def __init__(
        self,
        predict: Callable[[Observation], Any],
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
        self._predict = predict
        self._predict_batch = predict_batch
        self.max_queue = max_queue
        self.deadline_s = deadline_s
        self._clock = clock
        self._thread = ModelThread()
        self._model_turn: Optional[asyncio.Lock] = None
        self._admitted = 0
        # The last call handed to the model thread (a prediction or a batch), and when.
        self._current: Optional[Future] = None
        self._current_since = 0.0
        self._batcher = self._make_batcher(max_batch_size, batch_window_s, on_batch)

    @property
    def queue_depth(self) -> int:
        """Admitted requests not being predicted right now (decoding or waiting)."""
        return max(self._admitted - self.in_prediction, 0)

    @property
    def busy(self) -> int:
        """1 while the backend runs a prediction (or a batch)."""
        return int(self._current is not None and not self._current.done())

    @property
    def in_prediction(self) -> int:
        """Requests whose prediction is running now (a whole batch when batching)."""
        if self._batcher is not None:
            return self._batcher.running
        return self.busy

    @property
    def max_batch_size(self) -> int:
        return self._batcher.max_batch_size if self._batcher is not None else 1

    @property
    def batcher(self) -> Optional[MicroBatcher]:
        return self._batcher

    def stuck_for(self) -> Optional[float]:
        """Seconds the running call has been past its deadline, else None."""
        if not self.busy:
            return None
        overdue = self._clock() - self._current_since - self.deadline_s
        return overdue if overdue >= 0 else None

    def health_problem(self) -> Optional[str]:
        """Why the server cannot serve predictions now, or None when it can."""
        overdue = self.stuck_for()
        if overdue is None:
            return None
        running = overdue + self.deadline_s
        what = "a batch of predictions" if self._batcher is not None else "a prediction"
        return (
            f"{what} has been running for {running:.1f} s, past the "
            f"{self.deadline_s:g} s deadline; /infer answers 503 until the backend returns"
        )

    def refusal(self) -> Optional[Exception]:
        """Why ``try_admit`` would refuse a request now (BackendStuckError or
        QueueFullError), or None; takes no place."""
        # The prediction (or batch) running + max_queue waiting behind it. Only touched
        # on the event loop: no lock needed.
        problem = self.health_problem()
        if problem is not None:
            return BackendStuckError(problem)
        if self._admitted >= self.max_queue + max(self.in_prediction, 1):
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
        if self._model_turn is None:
            self._model_turn = asyncio.Lock()
        async with self._model_turn:
            self._check_free()
            if client_gone is not None and await client_gone():
                raise ClientGoneError("client disconnected before its turn")
            return await self._call_model(self._timed_predict, observation)

    def _check_free(self) -> None:
        """Raise BackendStuckError while an earlier call still holds the model thread
        (its caller gave up on it: deadline or cancellation)."""
        if self.busy:
            raise BackendStuckError(
                self.health_problem() or "the previous prediction is still running"
            )

    async def _call_model(self, function: Callable[[Any], Any], argument: Any) -> Any:
        """``function(argument)`` on the model thread, waited for at most the deadline."""
        self._current_since = self._clock()
        self._current = self._thread.submit(function, argument)
        try:
            # shield: a timeout or a cancelled request must not cancel the call's
            # future, whose state tells whether the model thread is still busy.
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self._current)), self.deadline_s
            )
        except asyncio.TimeoutError:
            raise PredictionTimeoutError(
                f"the backend did not answer within the {self.deadline_s:g} s deadline"
            ) from None

    def _timed_predict(self, observation: Observation) -> tuple[Any, float]:
        started = time.perf_counter()
        answer = self._predict(observation)
        return answer, time.perf_counter() - started

    def close(self) -> None:
        """Stop taking work; a prediction already running is not waited for."""
        if self._batcher is not None:
            self._batcher.close()
        self._thread.close()

    # --- micro-batching (max_batch_size > 1) ---------------------------------------

    def _make_batcher(self, max_batch_size, window_s, on_batch) -> Optional[MicroBatcher]:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_size == 1:
            return None
        return MicroBatcher(
            self._run_batch,
            self._call_model,
            max_batch_size=max_batch_size,
            window_s=window_s,
            # Admitted requests still being read or decoded will join: worth the window.
            more_coming=lambda: self._admitted > self._batcher.pending + self._batcher.running,
            gone_error=ClientGoneError,
            before_batch=self._check_free,
            on_batch=on_batch,
        )

    def _run_batch(self, observations: Sequence[Observation]) -> list:
        """On the model thread: one outcome per observation (its answer or its exception)."""
        outcomes = isolated_batch_call(self._predict, self._predict_batch, observations)
        # An answer that is a SystemExit or the like must not reach the event loop as one.
        return [
            crash_error(o) if isinstance(o, BaseException) and not isinstance(o, Exception) else o
            for o in outcomes
        ]
