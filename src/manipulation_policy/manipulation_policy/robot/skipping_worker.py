"""One worker thread that runs one job at a time and refuses jobs while busy.

The policy nodes hand the newest frame to it: while it runs the action source,
frames are skipped (never queued), so the thread that receives images and
joint states never waits for inference. No ROS.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Optional, TypeVar

WORKER_STOP_TIMEOUT_SEC = 5.0

Job = TypeVar("Job")


class SkippingWorker(Generic[Job]):
    """One thread that runs ``handle`` on one job at a time; refuses jobs while busy."""

    def __init__(self, handle: Callable[[Job], None], name: str):
        self._handle = handle
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._busy = False
        self._job: Optional[Job] = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy

    def try_submit(self, job: Job) -> bool:
        with self._lock:
            if self._busy or self._stopping:
                return False
            self._busy = True
            self._job = job
        self._wake.set()
        return True

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_SEC) -> bool:
        """Stop after the current job; True if the thread ended within ``timeout``."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._stopping:
                    return
                job, self._job = self._job, None
            try:
                if job is not None:
                    self._handle(job)
            except Exception:  # noqa: BLE001 - the handler reports its own errors; the
                pass  # thread must live on for the next job whatever happened
            finally:
                with self._lock:
                    self._busy = False
