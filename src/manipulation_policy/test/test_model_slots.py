"""Model instances without a server: the slot pool, and the inference worker with
several instances (each its own predict on its own thread), batching included.

Backends that must run at once meet at a threading.Barrier, which breaks (an
error) when they do not: concurrency is proven, never timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from manipulation_policy.core.policy_types import Observation
from manipulation_policy.server.app import ServerConfig
from manipulation_policy.server.inference_worker import (
    BackendStuckError,
    InferenceWorker,
    ModelInstance,
    PredictionTimeoutError,
    QueueFullError,
)
from manipulation_policy.server.model_slots import MAX_MODEL_INSTANCES, SlotPool

BOUND_S = 10.0


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, BOUND_S * 2))


async def wait_until(condition) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def named(name: str, barrier: threading.Barrier | None = None, gate=None) -> ModelInstance:
    """An instance answering (its name, the thread it ran on); it meets ``barrier``
    first and waits for ``gate`` when the observation's instruction is ``hold``."""

    def predict(observation: Observation):
        if barrier is not None:
            barrier.wait()
        if gate is not None and observation.instruction == "hold":
            gate.wait(BOUND_S)
        return name, threading.current_thread().name

    return ModelInstance(predict)


def admitted(worker, count):
    stack = contextlib.ExitStack()
    for _ in range(count):
        stack.enter_context(worker.admission())
    return stack


# --------------------------------------------------------------------- the pool


def test_the_pool_hands_out_each_free_slot_then_lines_callers_up_in_order():
    pool = SlotPool([named("a"), named("b")])

    async def main():
        first, second = await pool.acquire(RuntimeError), await pool.acquire(RuntimeError)
        assert {first.index, second.index} == {0, 1} and pool.free == 0
        order = []

        async def later(tag):
            slot = await pool.acquire(RuntimeError)
            order.append(tag)
            return slot

        third = asyncio.ensure_future(later("third"))
        fourth = asyncio.ensure_future(later("fourth"))
        await asyncio.sleep(0.01)
        assert pool.take() is None  # callers wait: nobody jumps the line
        pool.give_back(second)
        assert (await third) is second
        pool.give_back(first)
        assert (await fourth) is first
        return order

    try:
        assert run(main()) == ["third", "fourth"]
    finally:
        pool.close()


def test_the_pool_refuses_callers_only_when_every_slot_is_left_running():
    gate = threading.Event()
    pool = SlotPool([named("a"), named("b")])

    async def main():
        slots = [await pool.acquire(RuntimeError) for _ in range(2)]
        for slot in slots:
            slot.run(lambda _: gate.wait(BOUND_S), None, 0.0)
        waiting = asyncio.ensure_future(pool.acquire(lambda: BackendStuckError("stuck")))
        pool.give_back(slots[0])  # its caller left: out of service, one still held
        await asyncio.sleep(0.01)
        assert not waiting.done() and pool.in_service() == 1
        pool.give_back(slots[1])  # both left running: the caller in line is told
        with pytest.raises(BackendStuckError):
            await waiting
        gate.set()
        await wait_until(lambda: pool.free == 2)
        return await pool.acquire(RuntimeError)

    try:
        assert run(main()).index in (0, 1)
    finally:
        gate.set()
        pool.close()


def test_instance_counts_outside_1_to_16_are_refused():
    with pytest.raises(ValueError):
        SlotPool([])
    with pytest.raises(ValueError):
        SlotPool([named("a")] * (MAX_MODEL_INSTANCES + 1))
    for count in (0, MAX_MODEL_INSTANCES + 1):
        with pytest.raises(ValueError, match="model_instances"):
            ServerConfig(model_instances=count)


# ------------------------------------------------------------- the worker, N instances


def test_two_instances_predict_at_once_each_with_its_own_predict_and_thread():
    barrier = threading.Barrier(2, timeout=BOUND_S)
    worker = InferenceWorker([named("a", barrier), named("b", barrier)], max_queue=4)

    async def main():
        return await asyncio.gather(*(worker.predict(Observation()) for _ in range(2)))

    try:
        answers = [answer for answer, _ in run(main())]
    finally:
        worker.close()
    assert sorted(answers) == [("a", "policy-inference-0"), ("b", "policy-inference-1")]


def test_a_third_request_waits_for_a_free_instance():
    gate = threading.Event()
    worker = InferenceWorker([named("a", gate=gate), named("b", gate=gate)], max_queue=4)

    async def main():
        held = [asyncio.ensure_future(worker.predict(Observation(instruction="hold")))
                for _ in range(2)]  # fmt: skip
        await wait_until(lambda: worker.busy == 2)
        third = asyncio.ensure_future(worker.predict(Observation()))
        await asyncio.sleep(0.05)
        assert not third.done() and worker.in_prediction == 2
        gate.set()
        return await asyncio.gather(*held, third)

    try:
        answers = run(main())
    finally:
        gate.set()
        worker.close()
    assert len(answers) == 3 and worker.busy == 0


def test_admission_is_n_running_plus_max_queue():
    gate = threading.Event()
    worker = InferenceWorker([named("a", gate=gate), named("b", gate=gate)], max_queue=1)

    async def one(instruction=""):
        with worker.admission():
            return await worker.predict(Observation(instruction=instruction))

    async def main():
        # Nothing running: both instances may start one, and one may wait.
        with admitted(worker, 3):
            with pytest.raises(QueueFullError, match="3 requests"):
                worker.try_admit()
        running = [asyncio.ensure_future(one("hold")) for _ in range(2)]
        await wait_until(lambda: worker.busy == 2)
        with admitted(worker, 1):  # the one waiting
            assert worker.queue_depth == 1
            with pytest.raises(QueueFullError, match="3 requests"):
                worker.try_admit()
        gate.set()
        return await asyncio.gather(*running)

    try:
        run(main())
    finally:
        gate.set()
        worker.close()


def test_one_stuck_instance_leaves_the_other_serving_then_both_stuck_refuse_then_recover():
    gate = threading.Event()
    worker = InferenceWorker(
        [named("a", gate=gate), named("b", gate=gate)], max_queue=8, deadline_s=0.2
    )

    async def main():
        with pytest.raises(PredictionTimeoutError):
            await worker.predict(Observation(instruction="hold"))
        await wait_until(lambda: worker.stuck_instances() == 1)
        assert worker.health_problem() is None and worker.refusal() is None
        served = [await worker.predict(Observation()) for _ in range(3)]
        assert len({answer for answer, _ in served}) == 1  # the instance not stuck
        # A request waiting while the second one gets stuck: told at once, as today.
        second = asyncio.ensure_future(worker.predict(Observation(instruction="hold")))
        await wait_until(lambda: worker.busy == 2)
        behind = asyncio.ensure_future(worker.predict(Observation()))
        with pytest.raises(PredictionTimeoutError):
            await second
        with pytest.raises(BackendStuckError):
            await behind
        await wait_until(lambda: worker.health_problem() is not None)
        assert "all 2 model instances are stuck" in worker.health_problem()
        with pytest.raises(BackendStuckError):
            worker.try_admit()
        gate.set()
        await wait_until(lambda: worker.busy == 0)
        assert worker.health_problem() is None and worker.stuck_instances() == 0
        return await asyncio.gather(*(worker.predict(Observation()) for _ in range(2)))

    try:
        answers = run(main())
    finally:
        gate.set()
        worker.close()
    assert len(answers) == 2


def test_two_instances_run_two_batches_at_once():
    barrier = threading.Barrier(2, timeout=BOUND_S)
    batches = []

    def instance(name):
        def predict_batch(xs):
            batches.append((name, list(xs)))
            barrier.wait()  # both batches inside predict_batch at once
            return [(name, x, "batch") for x in xs]

        # Alone: what the batcher falls back to when predict_batch fails (a broken barrier).
        return ModelInstance(lambda x: (name, x, "alone"), predict_batch)

    worker = InferenceWorker([instance("a"), instance("b")], max_queue=8,
                             max_batch_size=2, batch_window_s=30.0)  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        return await asyncio.gather(*(one(x) for x in range(4)))

    try:
        results = run(main())
    finally:
        worker.close()
    assert [result for result, _ in results] == [
        ("a", 0, "batch"), ("a", 1, "batch"), ("b", 2, "batch"), ("b", 3, "batch")
    ]
    assert sorted(len(xs) for _, xs in batches) == [2, 2]
    assert worker.queue_depth == 0 and worker.busy == 0


def test_while_every_instance_runs_a_batch_new_requests_form_the_next_one():
    gate = threading.Event()
    batches = []

    def instance(name):
        def predict_batch(xs):
            batches.append(list(xs))
            if xs[0] < 10:
                gate.wait(BOUND_S)
            return [x + 100 for x in xs]

        return ModelInstance(lambda x: x + 100, predict_batch)

    # No window: the three waiting form one batch because all three wait when an
    # instance frees, not because the batcher waits for them.
    worker = InferenceWorker([instance("a"), instance("b")], max_queue=8,
                             max_batch_size=4, batch_window_s=0.0)  # fmt: skip

    async def one(x):
        with worker.admission():
            return await worker.predict(x)

    async def main():
        first = [asyncio.ensure_future(one(x)) for x in (1, 2)]
        await wait_until(lambda: worker.busy == 1)
        second = [asyncio.ensure_future(one(x)) for x in (3, 4)]
        await wait_until(lambda: worker.busy == 2)
        later = [asyncio.ensure_future(one(x)) for x in (11, 12, 13)]
        await wait_until(lambda: worker.batcher.pending == 3)
        gate.set()
        return await asyncio.gather(*first, *second, *later)

    try:
        results = run(main())
    finally:
        gate.set()
        worker.close()
    assert [r for r, _ in results] == [101, 102, 103, 104, 111, 112, 113]
    assert batches == [[1, 2], [3, 4], [11, 12, 13]]
