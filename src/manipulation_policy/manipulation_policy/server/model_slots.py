"""Model instances: one daemon thread each, and the event-loop side that hands them out.

A model instance (``--model-instances``, Triton's instance group) is one backend
object with its own model thread: up to N predictions (or N batches) run at once,
one per instance. A caller takes a free slot (``SlotPool.acquire``, in arrival
order), runs its call on that slot's thread and gives the slot back. A slot
whose call outlived its caller (a deadline passed, the request was cancelled) is
out of service until its backend returns: Python cannot stop a thread. When every
slot is out of service, a caller waiting for one is told at once (the ``stuck``
exception it passed) instead of waiting for a backend that may never return.

Everything but the model threads runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Optional

MAX_MODEL_INSTANCES = 16
THREAD_NAME = "policy-inference"


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

    def __init__(self, name: str = THREAD_NAME):
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


@dataclass(frozen=True)
class ModelInstance:
    """What one model instance runs: its backend's ``predict`` (and ``predict_batch``)."""

    predict: Callable[[Any], Any]
    predict_batch: Optional[Callable[[Sequence[Any]], Sequence[Any]]] = None


class ModelSlot:
    """One model instance, its thread, and its call in progress."""

    def __init__(self, index: int, instance: ModelInstance, thread_name: str):
        self.index = index
        self.instance = instance
        self.thread = ModelThread(thread_name)
        self.current: Optional[Future] = None  # the last call handed to the thread
        self.since = 0.0  # when it was handed over (the worker's clock)
        self.held = False  # a caller has it, from acquire to give_back
        self.calls = 0
        self.last_used = 0  # acquire order, to hand out the one idle the longest

    @property
    def busy(self) -> bool:
        """Its thread is running a call (one whose caller may have left)."""
        return self.current is not None and not self.current.done()

    @property
    def free(self) -> bool:
        return not self.held and not self.busy

    @property
    def out_of_service(self) -> bool:
        """Its thread still runs a call whose caller left (deadline or cancellation)."""
        return not self.held and self.busy

    def overdue(self, now: float, deadline_s: float) -> Optional[float]:
        """Seconds its running call has been past ``deadline_s``, else None."""
        if not self.busy:
            return None
        late = now - self.since - deadline_s
        return late if late >= 0 else None

    def run(self, function: Callable[..., Any], argument: Any, now: float) -> Future:
        self.since = now
        self.calls += 1
        self.current = self.thread.submit(function, argument)
        return self.current


class SlotPool:
    """N model slots handed out one caller at a time, in arrival order."""

    def __init__(self, instances: Sequence[ModelInstance]):
        if not 1 <= len(instances) <= MAX_MODEL_INSTANCES:
            raise ValueError(
                f"model instances must be 1 to {MAX_MODEL_INSTANCES}, got {len(instances)}"
            )
        # One instance keeps the thread name it always had.
        names = (
            [THREAD_NAME]
            if len(instances) == 1
            else [f"{THREAD_NAME}-{index}" for index in range(len(instances))]
        )
        self.slots = [
            ModelSlot(index, instance, name)
            for index, (instance, name) in enumerate(zip(instances, names, strict=True))
        ]
        self._line: deque[asyncio.Event] = deque()  # callers waiting, first in line first
        self._acquired = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def busy(self) -> int:
        return sum(slot.busy for slot in self.slots)

    @property
    def free(self) -> int:
        return sum(slot.free for slot in self.slots)

    def running_for_callers(self) -> int:
        """Slots running a call whose caller still waits for it."""
        return sum(slot.held and slot.busy for slot in self.slots)

    def in_service(self) -> int:
        """Slots that are free or held (not left running by a caller gone)."""
        return sum(not slot.out_of_service for slot in self.slots)

    def take(self) -> Optional[ModelSlot]:
        """A free slot (the one idle the longest), now held; None when none is free or
        callers are already waiting for one."""
        if self._line:
            return None
        return self._take()

    def _take(self) -> Optional[ModelSlot]:
        free = [slot for slot in self.slots if slot.free]
        if not free:
            return None
        slot = min(free, key=lambda s: s.last_used)
        slot.held = True
        self._acquired += 1
        slot.last_used = self._acquired
        return slot

    async def acquire(self, stuck: Callable[[], BaseException]) -> ModelSlot:
        """The next free slot, after those who came first; ``stuck()`` is raised when it
        is this caller's turn and every slot is out of service."""
        slot = self.take()
        if slot is not None:
            return slot
        turn = asyncio.Event()
        self._line.append(turn)
        try:
            while True:
                if self._line[0] is turn:
                    slot = self._take()
                    if slot is not None:
                        return slot
                    if self.in_service() == 0:
                        raise stuck()
                turn.clear()
                await turn.wait()
        finally:
            self._line.remove(turn)
            self._changed()  # the next in line looks again

    def give_back(self, slot: ModelSlot) -> None:
        """The caller is done with ``slot``. A call still running there keeps it out of
        service: the line is told again when that call returns."""
        slot.held = False
        if slot.busy:
            assert slot.current is not None
            self._when_done(slot.current)
        self._changed()

    def _when_done(self, future: Future) -> None:
        loop = asyncio.get_running_loop()

        def done(_future: Future) -> None:  # on the model thread
            try:
                loop.call_soon_threadsafe(self._changed)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        future.add_done_callback(done)

    def _changed(self) -> None:
        if self._line:
            self._line[0].set()

    def close(self) -> None:
        for slot in self.slots:
            slot.thread.close()
