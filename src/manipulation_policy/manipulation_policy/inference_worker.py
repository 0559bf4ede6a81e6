"""One model, one prediction at a time, a bounded line of requests waiting for it.

A model on a GPU gains nothing from concurrent calls and may break under them,
so predictions run one by one on a dedicated thread, never on the asyncio
event loop. Requests are admitted only while fewer than ``max_queue`` wait
behind the one being predicted; past that the caller is told at once
(QueueFullError, answered 503), instead of every request getting slower.

With ``max_batch_size > 1`` the requests waiting for the model run together
as one batch (``batching.MicroBatcher``: the backend's ``predict_batch`` when
it has one); ``max_queue`` still counts the requests waiting behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .batching import MicroBatcher, isolated_batch_call
from .policy_types import Observation, PolicyAction


class QueueFullError(Exception):
    """No room for another request; retry later."""


class ClientGoneError(Exception):
    """The client disconnected while its request waited; the model was not run."""


class InferenceWorker:
    """Serialises ``predict`` calls (or batches) on one thread and bounds how many requests wait.

    Admission (``admission()``) and waiting happen on the event loop thread;
    only ``predict`` runs on the worker thread.
    """

    def __init__(
        self,
        predict: Callable[[Observation], PolicyAction],
        max_queue: int,
        *,
        predict_batch: Optional[Callable[[list[Observation]], list]] = None,
        max_batch_size: int = 1,
        batch_window_s: float = 0.0,
        on_batch: Optional[Callable[[int, float], None]] = None,
    ):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self._predict = predict
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-inference")
        self._model_turn: Optional[asyncio.Lock] = None
        self._admitted = 0
        self._busy = 0
        self._batcher = self._make_batcher(predict_batch, max_batch_size, batch_window_s, on_batch)

    @property
    def queue_depth(self) -> int:
        """Admitted requests not being predicted right now (decoding or waiting)."""
        return max(self._admitted - self.in_prediction, 0)

    @property
    def busy(self) -> int:
        """1 while the backend runs a prediction (or a batch)."""
        return 1 if self.in_prediction else 0

    @property
    def in_prediction(self) -> int:
        """Requests whose prediction is running now (a whole batch when batching)."""
        return self._batcher.running if self._batcher is not None else self._busy

    @property
    def max_batch_size(self) -> int:
        return self._batcher.max_batch_size if self._batcher is not None else 1

    @property
    def batcher(self) -> Optional[MicroBatcher]:
        return self._batcher

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold a place for one request; raises QueueFullError when none is left."""
        # The prediction (or batch) running + max_queue waiting behind it. Only touched
        # on the event loop: no lock needed.
        if self._admitted >= self.max_queue + max(self.in_prediction, 1):
            raise QueueFullError(
                f"{self._admitted} requests already admitted (queue limit {self.max_queue})"
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def predict(
        self,
        observation: Observation,
        client_gone: Optional[Callable[[], Awaitable[bool]]] = None,
    ) -> tuple[PolicyAction, float]:
        """Run the model on ``observation`` when its turn comes: (action, seconds in predict).

        ``client_gone`` is asked just before the model runs, so that a request
        whose client gave up while waiting does not cost a prediction.
        """
        if self._batcher is not None:
            return await self._batcher.submit(observation, client_gone)
        if self._model_turn is None:
            self._model_turn = asyncio.Lock()
        async with self._model_turn:
            if client_gone is not None and await client_gone():
                raise ClientGoneError("client disconnected before its turn")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._timed_predict, observation)

    def _timed_predict(self, observation: Observation) -> tuple[PolicyAction, float]:
        self._busy = 1
        started = time.perf_counter()
        try:
            action = self._predict(observation)
        finally:
            self._busy = 0
        return action, time.perf_counter() - started

    def close(self) -> None:
        """Stop taking work; a prediction already running finishes on its thread."""
        if self._batcher is not None:
            self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- micro-batching (max_batch_size > 1) ---------------------------------------

    def _make_batcher(self, predict_batch, max_batch_size, window_s, on_batch):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_size == 1:
            return None
        predict = self._predict

        def run_batch(observations: list[Observation]) -> list:
            self._busy = 1
            try:
                return isolated_batch_call(predict, predict_batch, observations)
            finally:
                self._busy = 0

        return MicroBatcher(
            run_batch,
            self._executor,
            max_batch_size=max_batch_size,
            window_s=window_s,
            # Admitted requests still being read or decoded will join: worth the window.
            more_coming=lambda: self._admitted > self._batcher.pending + self._batcher.running,
            gone_error=ClientGoneError,
            on_batch=on_batch,
        )
