"""Worker threads that run up to ``capacity`` jobs at once and refuse jobs while all are busy.

The policy nodes hand the newest frame to it: while every thread runs the action
source, frames are skipped (never queued), so the thread that receives images and
joint states never waits for inference. With a capacity above one (the remote
node's ``remote_max_in_flight``), several observations are answered at once.
Threads are started lazily, one per job running at once, up to the capacity; the
capacity changes live, and lowering it never ends a running job (jobs are refused
until fewer run than the new capacity). No ROS.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

WORKER_STOP_TIMEOUT_SEC = 5.0

Job = TypeVar("Job")


class SkippingWorker(Generic[Job]):
    """Threads that run ``handle`` on up to ``capacity`` jobs at once; refuse jobs while
    all are busy."""

    def __init__(self, handle: Callable[[Job], None], name: str, capacity: int = 1):
        self._handle = handle
        self._name = name
        self._lock = threading.Condition()
        self._stopping = False
        self._capacity = _checked(capacity)
        self._running = 0  # jobs handed over and not yet finished
        self._handling = 0  # threads running a job (the others wait for one, or soon will)
        self._jobs: deque[Job] = deque()  # handed over, not yet taken by a thread
        self._threads: list[threading.Thread] = []
        self._start_thread()  # the first one at once, as before (a ready worker)

    @property
    def busy(self) -> bool:
        """No free slot: as many jobs run as the capacity allows (or more, after it was
        lowered)."""
        with self._lock:
            return self._running >= self._capacity

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def capacity(self) -> int:
        with self._lock:
            return self._capacity

    def set_capacity(self, capacity: int) -> None:
        """Up to ``capacity`` jobs at once from now on; running jobs go on whatever it is."""
        with self._lock:
            self._capacity = _checked(capacity)

    def try_submit(self, job: Job) -> bool:
        with self._lock:
            if self._stopping or self._running >= self._capacity:
                return False
            self._running += 1
            self._jobs.append(job)
            if len(self._threads) - self._handling < len(self._jobs):
                self._start_thread()  # every thread is busy: one more, within the capacity
            self._lock.notify()
        return True

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_SEC) -> bool:
        """Stop after the current jobs; True if every thread ended within ``timeout``."""
        with self._lock:
            self._stopping = True
            self._jobs.clear()
            self._lock.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _start_thread(self) -> None:
        number = len(self._threads) + 1
        name = self._name if number == 1 else f"{self._name}_{number}"
        thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._handling += 1
            try:
                self._handle(job)
            except Exception:  # noqa: BLE001 - the handler reports its own errors; the
                pass  # thread must live on for the next job whatever happened
            finally:
                with self._lock:
                    self._handling -= 1
                    self._running -= 1


def _checked(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
    return capacity
