"""Micro-batching: observations that arrive together go to the model together.

Decoding a large model on a GPU is bound by reading its weights, so a batch
of 8 observations costs little more than one. The batcher collects waiting
requests into one batch and runs it as a single call on the model thread:

- a batch starts with the oldest waiting request and closes as soon as
  ``max_batch_size`` requests are in, or ``window_s`` after the oldest
  arrived, or at once when no more requests are expected: none admitted and
  still on its way (``more_coming``: being read or decoded), and fewer than
  the previous batch held are waiting (the robots of a fleet answered together
  come back together, a few milliseconds apart). So a lone robot never waits
  for the window, and a fleet's batches do not split in two;
- while a batch runs on each model instance (one, unless the worker serves
  several: ``acquire_model``), new requests wait and form the next batch;
- each request gets its own result or its own exception, never another's.

``isolated_batch_call`` is the model-side half: it calls the backend's
``predict_batch`` when it has one, and when a whole batch call fails it runs
each observation alone, so one bad observation fails only its own request.

How a batch reaches a model thread, and how long it may take there, is the
caller's (``call_model``, or the call ``acquire_model`` hands out: the
InferenceWorker's, with its deadline); what it raises (a timeout, a crash) is the
answer of every request in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from manipulation_policy.server.log_limits import printable

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WINDOW_MS = 10.0

# One observation's outcome: its result, or the exception that is its answer.
Outcome = Any
# Runs one batch on a model instance: items -> one outcome per item.
BatchCall = Callable[[list[Any]], Awaitable[Sequence[Outcome]]]


def batch_wait_s(
    pending: int,
    oldest_arrival: float,
    now: float,
    max_batch_size: int,
    window_s: float,
    more_coming: bool,
) -> float:
    """Seconds to keep collecting before the batch closes; 0 means close it now."""
    if pending <= 0:
        raise ValueError("no batch without a waiting request")
    if pending >= max_batch_size or not more_coming:
        return 0.0
    return max(0.0, oldest_arrival + window_s - now)


def isolated_batch_call(
    predict: Callable[[Any], Any],
    predict_batch: Optional[Callable[[Sequence[Any]], Sequence[Outcome]]],
    items: Sequence[Any],
) -> list[Outcome]:
    """One outcome per item: ``predict_batch`` when there is one and more than one
    item, else ``predict`` per item; an exception is the outcome of its item only.

    Runs on the model thread, where a BaseException (SystemExit from a backend) is
    just another failure: it too is caught, and is the outcome of its item only."""
    if predict_batch is not None and len(items) > 1:
        try:
            outcomes = list(predict_batch(list(items)))
            if len(outcomes) != len(items):
                raise RuntimeError(
                    f"predict_batch returned {len(outcomes)} answers for {len(items)} observations"
                )
            return outcomes
        except BaseException as exc:  # noqa: BLE001 - one at a time isolates the culprit
            # Bounded: the message and traceback may be a hostile backend's megabytes.
            logger.error(
                "predict_batch failed for %d observations (%s: %s); predicting each alone\n%s",
                len(items),
                type(exc).__name__,
                printable(str(exc), 1000),
                "".join(traceback.format_tb(exc.__traceback__))[-4000:],
            )
    outcomes: list[Outcome] = []
    for item in items:
        try:
            outcomes.append(predict(item))
        except BaseException as exc:  # noqa: BLE001 - the item's own answer (SystemExit too)
            outcomes.append(exc)
    return outcomes


@dataclass
class _Entry:
    item: Any
    future: asyncio.Future
    arrived: float
    client_gone: Optional[Callable[[], Awaitable[bool]]]


@dataclass(frozen=True)
class BatchStats:
    batches: int
    requests: int
    largest: int


class MicroBatcher:
    """Collects submitted items into batches and runs each batch on a model turn.

    Either ``call_model(run_batch, items)``, which awaits ``run_batch(items) ->
    outcomes`` run on the model's thread, one batch at a time; or
    ``acquire_model()``, which awaits a free model instance and returns the call that
    runs a batch there (``call(items) -> outcomes``), handed back with
    ``release_model(call)`` once its batch is over: as many batches at once as it
    hands out calls. A batch closes only once a model turn is free, so while every
    instance runs, new requests wait and form the next batch. What ``acquire_model``
    raises (no instance can run anything now) is the answer of every waiting caller,
    at once (nothing runs or is counted). An outcome that is an exception is raised to
    that item's caller alone, an exception raised by the call to every caller of the
    batch. ``submit`` returns ``(result, seconds the batch took)``. Everything else
    runs on the event loop, so no locks are needed.
    """

    def __init__(
        self,
        run_batch: Optional[Callable[[list[Any]], Sequence[Outcome]]] = None,
        call_model: Optional[
            Callable[[Callable[[list[Any]], Sequence[Outcome]], list[Any]], Awaitable]
        ] = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        window_s: float = DEFAULT_BATCH_WINDOW_MS / 1e3,
        more_coming: Callable[[], bool] = lambda: True,
        gone_error: Callable[[str], BaseException] = ConnectionAbortedError,
        acquire_model: Optional[Callable[[], Awaitable[BatchCall]]] = None,
        release_model: Callable[[BatchCall], None] = lambda call: None,
        on_batch: Optional[Callable[[int, float], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not window_s >= 0:
            raise ValueError(f"the batch window must be >= 0 s, got {window_s}")
        if acquire_model is None:
            if run_batch is None or call_model is None:
                raise ValueError("give run_batch and call_model, or acquire_model")
            acquire_model, release_model = _one_at_a_time(run_batch, call_model)
        self._acquire_model = acquire_model
        self._release_model = release_model
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self._more_coming = more_coming
        self._gone_error = gone_error
        self.on_batch = on_batch
        self._clock = clock
        self._pending: deque[_Entry] = deque()
        self._wakeup: Optional[asyncio.Event] = None
        self._collector: Optional[asyncio.Task] = None
        self._running_batches: set[asyncio.Task] = set()
        self._closed = False
        self.running = 0  # items in the batches running now
        self._last_size = 0
        self._batches = 0
        self._requests = 0
        self._largest = 0

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not yet running)."""
        return sum(1 for entry in self._pending if not entry.future.done())

    def stats(self) -> BatchStats:
        return BatchStats(self._batches, self._requests, self._largest)

    async def submit(
        self, item: Any, client_gone: Optional[Callable[[], Awaitable[bool]]] = None
    ) -> tuple[Any, float]:
        """Run ``item`` in the next batch that has room: (result, batch seconds).

        ``client_gone`` is asked just before the batch runs; a gone client's item is
        left out and its caller gets ``gone_error``.
        """
        if self._closed:
            raise RuntimeError("the batcher is closed")
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        future = loop.create_future()
        self._pending.append(_Entry(item, future, self._clock(), client_gone))
        self._wakeup.set()
        if self._collector is None or self._collector.done():
            self._collector = loop.create_task(self._collect(), name="micro-batcher")
        return await future  # a cancelled caller cancels its future: the batch skips it

    def close(self) -> None:
        """Fail whatever still waits; a batch already running finishes on its thread."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()  # the collector sees it is closed and stops
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(RuntimeError("the server is shutting down"))

    # --- collector (event loop) -------------------------------------------------------

    def _drop_finished(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    async def _collect(self) -> None:
        assert self._wakeup is not None
        while not self._closed:
            self._drop_finished()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                call = await self._acquire_model()
            except Exception as exc:  # noqa: BLE001 - the answer of every request waiting
                self._fail_waiting(exc)
                continue
            try:
                batch = [] if self._closed else await self._close_batch()
            except BaseException:
                self._release_model(call)
                raise
            if not batch:
                self._release_model(call)
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch, call))
            self._running_batches.add(task)  # a task only weakly referenced may vanish
            task.add_done_callback(self._running_batches.discard)

    async def _close_batch(self) -> list[_Entry]:
        """The next batch, once it is full, its window is over, or nobody else is on
        the way; empty when every waiting request went away meanwhile."""
        assert self._wakeup is not None
        while not self._closed:
            self._drop_finished()
            if not self._pending:
                return []
            wait = batch_wait_s(
                self.pending,
                self._pending[0].arrived,
                self._clock(),
                self.max_batch_size,
                self.window_s,
                self._more_coming() or self.pending < self._last_size,
            )
            if wait <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except asyncio.TimeoutError:
                pass
            # look again: full, window over, or nobody else on the way
        batch: list[_Entry] = []
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if not entry.future.done():
                batch.append(entry)
        return batch

    def _fail_waiting(self, exc: Exception) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(exc)

    async def _run(self, batch: list[_Entry], call: BatchCall) -> None:
        try:
            await self._run_on(batch, call)
        finally:
            self._release_model(call)

    async def _run_on(self, batch: list[_Entry], call: BatchCall) -> None:
        live: list[_Entry] = []
        for entry in batch:
            try:
                gone = entry.client_gone is not None and await entry.client_gone()
            except Exception as exc:  # noqa: BLE001 - that request's answer, not the collector's end
                gone, refusal = True, exc
            else:
                refusal = self._gone_error("client disconnected")
            if entry.future.done():
                continue
            if gone:
                entry.future.set_exception(refusal)
            else:
                live.append(entry)
        if not live:
            return
        self.running += len(live)
        self._last_size = len(live)
        started = time.perf_counter()
        try:
            outcomes = await call([entry.item for entry in live])
            if len(outcomes) != len(live):
                raise RuntimeError(f"{len(outcomes)} outcomes for a batch of {len(live)}")
        except Exception as exc:  # noqa: BLE001 - the batch failed as a whole: every caller hears it
            outcomes = [exc] * len(live)
        finally:
            self.running -= len(live)
        seconds = time.perf_counter() - started
        self._batches += 1
        self._requests += len(live)
        self._largest = max(self._largest, len(live))
        if self.on_batch is not None:
            self.on_batch(len(live), seconds)
        for entry, outcome in zip(live, outcomes, strict=True):
            if entry.future.done():
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result((outcome, seconds))


def _one_at_a_time(
    run_batch: Callable[[list[Any]], Sequence[Outcome]],
    call_model: Callable[[Callable[[list[Any]], Sequence[Outcome]], list[Any]], Awaitable],
) -> tuple[Callable[[], Awaitable[BatchCall]], Callable[[BatchCall], None]]:
    """acquire_model / release_model for one model that runs one batch at a time."""
    idle: list[asyncio.Event] = []  # made on the loop, at the first batch

    def call(items: list[Any]) -> Awaitable:
        return call_model(run_batch, items)

    async def acquire() -> BatchCall:
        if not idle:
            idle.append(asyncio.Event())
            idle[0].set()
        await idle[0].wait()
        idle[0].clear()
        return call

    def release(_call: BatchCall) -> None:
        idle[0].set()

    return acquire, release
