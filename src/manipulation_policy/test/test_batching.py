"""Micro-batching logic (batching.py, the worker's use of it), with fake predict functions.

Each test runs its own event loop; waits are for conditions, bounded, never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.server.app import ServerConfig, batching_problem, create_app
from manipulation_policy.server.batching import MicroBatcher, batch_wait_s, isolated_batch_call
from manipulation_policy.server.inference_worker import (
    BackendCrashError,
    BackendStuckError,
    ClientGoneError,
    InferenceWorker,
    PredictionTimeoutError,
    QueueFullError,
)

BOUND_S = 5.0  # every wait in these tests ends well before this, or the test fails


class BadItem(Exception):
    pass


class Recorder:
    """run_batch for the batcher: records each batch; ``gate`` (if set) holds the first."""

    def __init__(self, hold_first: bool = False):
        self.batches: list[list] = []
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, items):
        self.batches.append(list(items))
        self.gate.wait(BOUND_S)
        return [BadItem(f"bad {item}") if item < 0 else item * 10 for item in items]


async def wait_until(condition, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, BOUND_S * 2))


@pytest.fixture
def model_call():
    """call_model for the batcher: the batch on one thread of its own, no deadline."""
    pool = ThreadPoolExecutor(1)

    async def call(function, items):
        return await asyncio.get_running_loop().run_in_executor(pool, function, items)

    yield call
    pool.shutdown(wait=False, cancel_futures=True)


# --- when a batch closes (pure) -------------------------------------------------------


def test_batch_closes_when_full_nobody_else_is_coming_or_the_window_is_over():
    # full: closes even though the window has 9 s left
    assert batch_wait_s(4, oldest_arrival=100.0, now=101.0, max_batch_size=4, window_s=10.0,
                        more_coming=True) == 0.0  # fmt: skip
    # nobody else admitted: a lone request does not wait for the window
    assert batch_wait_s(1, 100.0, 100.0, 8, 10.0, more_coming=False) == 0.0
    # others on their way: wait out what is left of the oldest request's window
    assert batch_wait_s(2, 100.0, 100.004, 8, 0.010, more_coming=True) == pytest.approx(0.006)
    assert batch_wait_s(2, 100.0, 100.5, 8, 0.010, more_coming=True) == 0.0
    with pytest.raises(ValueError):
        batch_wait_s(0, 100.0, 100.0, 8, 0.01, True)


# --- model side: batch call with isolation ------------------------------------------------


def test_isolated_call_uses_predict_batch_for_several_and_predict_for_one():
    calls = []

    def predict(x):
        calls.append(("one", x))
        return x + 1

    def predict_batch(xs):
        calls.append(("batch", tuple(xs)))
        return [x + 1 for x in xs]

    assert isolated_batch_call(predict, predict_batch, [1, 2, 3]) == [2, 3, 4]
    assert isolated_batch_call(predict, predict_batch, [7]) == [8]
    assert isolated_batch_call(predict, None, [4, 5]) == [5, 6]
    assert calls == [("batch", (1, 2, 3)), ("one", 7), ("one", 4), ("one", 5)]


def test_a_failing_batch_call_is_retried_one_by_one_so_only_the_culprit_fails():
    def predict(x):
        if x < 0:
            raise BadItem(f"bad {x}")
        return x * 2

    def predict_batch(xs):
        if any(x < 0 for x in xs):
            raise RuntimeError("the whole batch fails")
        return [x * 2 for x in xs]

    outcomes = isolated_batch_call(predict, predict_batch, [1, -1, 3])
    assert outcomes[0] == 2 and outcomes[2] == 6
    assert isinstance(outcomes[1], BadItem)

    # A batch answer of the wrong length is not trusted either.
    outcomes = isolated_batch_call(predict, lambda xs: [0], [1, 2])
    assert outcomes == [2, 4]

    # Per-observation exceptions from predict_batch stay with their observation.
    error = BadItem("own")
    assert isolated_batch_call(predict, lambda xs: [1, error], [5, 6]) == [1, error]


# --- the batcher ------------------------------------------------------------------------


def test_maximum_batch_size_closes_a_batch_before_the_window(model_call):
    recorder = Recorder()
    # A 30 s window with "more coming" forever: only the maximum can close the batch.
    batcher = MicroBatcher(recorder, model_call, max_batch_size=3, window_s=30.0,
                           more_coming=lambda: True)  # fmt: skip

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)))

    results = run(main())
    assert [result for result, _seconds in results] == [10, 20, 30]
    assert recorder.batches == [[1, 2, 3]]
    assert batcher.stats().batches == 1 and batcher.stats().largest == 3


def test_requests_waiting_behind_a_batch_form_batches_of_at_most_the_maximum(model_call):
    recorder = Recorder(hold_first=True)
    # No window: only the maximum splits the five that wait behind the first.
    batcher = MicroBatcher(recorder, model_call, max_batch_size=2, window_s=0.0,
                           more_coming=lambda: False)  # fmt: skip

    async def main():
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_until(lambda: batcher.running == 1)  # 1 runs alone (nobody else coming)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4, 5, 6)]
        await wait_until(lambda: batcher.pending == 5)
        recorder.gate.set()
        return await asyncio.gather(first, *rest)

    results = run(main())
    assert [result for result, _ in results] == [10, 20, 30, 40, 50, 60]
    assert recorder.batches == [[1], [2, 3], [4, 5], [6]]
    assert batcher.stats().batches == 4 and batcher.stats().requests == 6


def test_a_lone_request_does_not_wait_for_the_window(model_call):
    recorder = Recorder()
    batcher = MicroBatcher(recorder, model_call, max_batch_size=8, window_s=30.0,
                           more_coming=lambda: False)  # fmt: skip
    started = time.monotonic()
    assert run(batcher.submit(4))[0] == 40
    assert time.monotonic() - started < BOUND_S  # a 30 s window was not waited for


def test_after_a_batch_of_several_the_next_waits_for_the_fleet_to_come_back(model_call):
    recorder = Recorder()
    batcher = MicroBatcher(recorder, model_call, max_batch_size=8, window_s=30.0,
                           more_coming=lambda: False)  # fmt: skip

    async def main():
        # Three arrive together while nothing else is admitted: one batch, at once.
        await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)))
        # The fleet's robots come back a little apart: the first waits for the others
        # (nothing admitted, but the last batch held three).
        first = asyncio.ensure_future(batcher.submit(4))
        await wait_until(lambda: batcher.pending == 1)
        second = asyncio.ensure_future(batcher.submit(5))
        await wait_until(lambda: batcher.pending == 2)
        assert recorder.batches == [[1, 2, 3]]  # still waiting for the third
        third = asyncio.ensure_future(batcher.submit(6))
        return await asyncio.gather(first, second, third)

    results = run(main())
    assert [r for r, _ in results] == [40, 50, 60]
    assert recorder.batches == [[1, 2, 3], [4, 5, 6]]


def test_the_window_bounds_the_wait_for_requests_on_their_way(model_call):
    recorder = Recorder()
    window = 0.05
    batcher = MicroBatcher(recorder, model_call, max_batch_size=8, window_s=window,
                           more_coming=lambda: True)  # fmt: skip

    async def main():
        started = time.monotonic()
        result = await batcher.submit(1)
        return result, time.monotonic() - started

    (result, _), elapsed = run(main())
    assert result == 10 and recorder.batches == [[1]]
    assert window <= elapsed < BOUND_S  # waited for the window, then ran alone


def test_a_request_arriving_within_the_window_joins_the_batch(model_call):
    recorder = Recorder()
    batcher = MicroBatcher(recorder, model_call, max_batch_size=8, window_s=30.0,
                           more_coming=lambda: len(recorder.batches) == 0 and batcher.pending < 2)

    async def main():
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_until(lambda: batcher.pending == 1)
        second = asyncio.ensure_future(batcher.submit(2))
        return await asyncio.gather(first, second)

    results = run(main())
    assert [r for r, _ in results] == [10, 20]
    assert recorder.batches == [[1, 2]]


def test_each_request_gets_its_own_answer_or_its_own_error(model_call):
    recorder = Recorder()
    batcher = MicroBatcher(recorder, model_call, max_batch_size=4, window_s=30.0,
                           more_coming=lambda: True)  # fmt: skip

    async def main():
        return await asyncio.gather(
            *(batcher.submit(i) for i in (3, -1, 5, -2)), return_exceptions=True
        )

    results = run(main())
    assert recorder.batches == [[3, -1, 5, -2]]
    assert results[0][0] == 30 and results[2][0] == 50
    assert isinstance(results[1], BadItem) and str(results[1]) == "bad -1"
    assert isinstance(results[3], BadItem) and str(results[3]) == "bad -2"


def test_a_batch_that_fails_as_a_whole_fails_each_of_its_requests(model_call):
    def broken(items):
        raise RuntimeError("CUDA error: device-side assert triggered")

    batcher = MicroBatcher(broken, model_call, max_batch_size=2, window_s=30.0,
                           more_coming=lambda: True)  # fmt: skip

    async def main():
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, RuntimeError) and "CUDA" in str(r) for r in results)


def test_a_gone_client_is_left_out_of_the_batch(model_call):
    recorder = Recorder()
    batcher = MicroBatcher(recorder, model_call, max_batch_size=2, window_s=30.0,
                           more_coming=lambda: True, gone_error=ClientGoneError)  # fmt: skip

    async def gone():
        return True

    async def present():
        return False

    async def main():
        return await asyncio.gather(
            batcher.submit(1, gone), batcher.submit(2, present), return_exceptions=True
        )

    results = run(main())
    assert isinstance(results[0], ClientGoneError)
    assert results[1][0] == 20
    assert recorder.batches == [[2]]


def test_a_cancelled_request_is_left_out_and_close_fails_the_waiting(model_call):
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, model_call, max_batch_size=4, window_s=30.0,
                           more_coming=lambda: False)  # fmt: skip

    async def main():
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_until(lambda: batcher.running == 1)
        cancelled = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await wait_until(lambda: batcher.pending == 2)
        cancelled.cancel()
        await wait_until(lambda: batcher.pending == 1)
        recorder.gate.set()
        await first
        assert (await kept)[0] == 30
        recorder.gate.clear()
        blocker = asyncio.ensure_future(batcher.submit(4))
        await wait_until(lambda: batcher.running == 1)
        waiting = asyncio.ensure_future(batcher.submit(5))
        await wait_until(lambda: batcher.pending == 1)
        batcher.close()
        with pytest.raises(RuntimeError, match="shutting down"):
            await waiting
        recorder.gate.set()
        return await asyncio.gather(blocker, return_exceptions=True)

    run(main())
    assert recorder.batches[:2] == [[1], [3]]


def test_batcher_refuses_nonsense_settings(model_call):
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), model_call, max_batch_size=0)
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), model_call, window_s=-1.0)


# --- the worker with batching ----------------------------------------------------------


def test_worker_admits_max_queue_behind_the_running_batch_then_refuses():
    gate = threading.Event()

    def predict_batch(xs):
        gate.wait(BOUND_S)
        return list(xs)

    worker = InferenceWorker(lambda o: o, max_queue=2, max_batch_size=4,
                             predict_batch=predict_batch)  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        # Nothing running: one to run + 2 waiting, as without batching.
        with admitted(worker, 3):
            with pytest.raises(QueueFullError):
                with worker.admission():
                    pass
        # A batch of 3 running: 2 may still wait behind it.
        batch = [asyncio.ensure_future(one(x)) for x in (1, 2, 3)]
        await wait_until(lambda: worker.batcher.running == 3)
        with admitted(worker, 2):
            with pytest.raises(QueueFullError, match="5 requests"):
                with worker.admission():
                    pass
        gate.set()
        return await asyncio.gather(*batch)

    try:
        assert [r[0] for r in run(main())] == [1, 2, 3]
    finally:
        gate.set()
        worker.close()


def admitted(worker, count):
    stack = contextlib.ExitStack()
    for _ in range(count):
        stack.enter_context(worker.admission())
    return stack


def test_worker_batches_through_predict_batch_and_answers_each_request():
    batches = []

    def predict(x):
        if x < 0:
            raise BadItem(f"bad {x}")
        return x + 100

    def predict_batch(xs):
        batches.append(list(xs))
        return [BadItem(f"bad {x}") if x < 0 else x + 100 for x in xs]

    worker = InferenceWorker(predict, max_queue=8, predict_batch=predict_batch,
                             max_batch_size=8, batch_window_s=30.0)  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        return await asyncio.gather(*(one(x) for x in (1, 2, -3, 4)), return_exceptions=True)

    try:
        results = run(main())
    finally:
        worker.close()
    # All four were admitted before any predicted: one batch, each its own answer.
    assert batches == [[1, 2, -3, 4]]
    assert [r[0] for i, r in enumerate(results) if i != 2] == [101, 102, 104]
    assert isinstance(results[2], BadItem)
    assert worker.queue_depth == 0 and worker.busy == 0


class Exit(BaseException):
    """A BaseException that is not an Exception, as SystemExit."""


def test_a_batch_past_the_deadline_answers_each_request_then_the_worker_recovers():
    gate = threading.Event()
    batches = []

    def predict_batch(xs):
        batches.append(list(xs))
        if len(batches) == 1:
            gate.wait(BOUND_S)  # the first batch hangs until released
        return [x + 100 for x in xs]

    # A 30 s window: the requests behind the stuck batch must not wait for it either.
    worker = InferenceWorker(lambda x: x + 100, max_queue=8, deadline_s=0.3,
                             predict_batch=predict_batch, max_batch_size=4,
                             batch_window_s=30.0)  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        started = time.monotonic()
        stuck = [asyncio.ensure_future(one(x)) for x in (1, 2, 3)]
        await wait_until(lambda: worker.busy == 1)
        assert worker.health_problem() is None  # running, not yet late
        behind = [asyncio.ensure_future(one(x)) for x in (4, 5)]  # admitted, waiting
        outcomes = await asyncio.gather(*stuck, *behind, return_exceptions=True)
        told_after = time.monotonic() - started
        # Every request of the batch at its deadline; those behind it at the same time.
        assert [type(o) for o in outcomes] == [PredictionTimeoutError] * 3 + [
            BackendStuckError
        ] * 2
        assert told_after < 2.0  # the deadline (0.3 s), not the hang (5 s)
        assert worker.busy == 1 and "batch" in worker.health_problem()
        with pytest.raises(BackendStuckError):
            worker.try_admit()  # new requests: refused while it hangs
        gate.set()
        await wait_until(lambda: worker.busy == 0)
        assert worker.health_problem() is None
        # As many as the last batch held: the batcher does not wait for more of the fleet.
        return await asyncio.gather(one(6), one(7), one(8))

    try:
        later = run(main())
    finally:
        gate.set()
        worker.close()
    assert [r[0] for r in later] == [106, 107, 108]
    assert batches == [[1, 2, 3], [6, 7, 8]]  # the requests told 503 never ran
    assert worker.queue_depth == 0


def test_a_base_exception_in_a_batch_is_the_answer_of_its_own_request_only():
    def predict(x):
        if x < 0:
            raise Exit("from predict")
        return x + 100

    def predict_batch(xs):
        if any(x < 0 for x in xs):
            raise Exit("from predict_batch")
        return [x + 100 for x in xs]

    worker = InferenceWorker(predict, max_queue=8, predict_batch=predict_batch,
                             max_batch_size=8, batch_window_s=30.0)  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        first = await asyncio.gather(*(one(x) for x in (1, -2, 3)), return_exceptions=True)
        return first, await asyncio.gather(one(4), one(5), one(6))

    try:
        first, after = run(main())
    finally:
        worker.close()
    assert first[0][0] == 101 and first[2][0] == 103
    assert isinstance(first[1], BackendCrashError) and "Exit: from predict" in str(first[1])
    assert [a[0] for a in after] == [104, 105, 106]  # the model thread and the batcher go on


def test_an_answer_that_is_a_base_exception_never_reaches_the_event_loop_as_one():
    worker = InferenceWorker(lambda x: x, max_queue=8, max_batch_size=8, batch_window_s=30.0,
                             predict_batch=lambda xs: [Exit("an answer"), xs[1]])  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        return await asyncio.gather(one(1), one(2), return_exceptions=True)

    try:
        outcomes = run(main())
    finally:
        worker.close()
    assert isinstance(outcomes[0], BackendCrashError) and outcomes[1][0] == 2


# --- which backends the server batches ----------------------------------------------------


class OneAtATime:
    name = "one-at-a-time"

    def predict(self, observation):
        return StubBackend().predict(observation)

    def describe(self):
        return {"backend": self.name}


class DeclinesBatching(StubBackend):
    batches_observations = False


@pytest.mark.parametrize(
    ("backend", "config", "reason"),
    [
        (StubBackend(), ServerConfig(), None),
        (StubBackend(), ServerConfig(max_batch_size=1), "max_batch_size is 1"),
        (OneAtATime(), ServerConfig(), "no predict_batch"),
        (DeclinesBatching(), ServerConfig(), "one observation at a time"),
    ],
)
def test_the_server_batches_only_backends_that_predict_together(backend, config, reason):
    found = batching_problem(backend, config)
    assert found is None if reason is None else reason in found
    worker = create_app(backend, config).state.worker
    try:
        assert (worker.batcher is not None) is (reason is None)
    finally:
        worker.close()
