"""SkippingWorker: up to its capacity of jobs at once, jobs refused while all are busy,
alive after a raise, the capacity changed live. No ROS."""

from __future__ import annotations

import threading

from manipulation_policy.robot.skipping_worker import SkippingWorker

WAIT_SEC = 5.0


def test_a_job_runs_on_the_worker_thread_and_the_worker_is_free_after():
    done = threading.Event()
    seen = []

    def handle(job):
        seen.append((job, threading.current_thread().name))
        done.set()

    worker = SkippingWorker(handle, "test_worker")
    try:
        assert worker.try_submit(1)
        assert done.wait(WAIT_SEC)
        assert seen == [(1, "test_worker")]
        for _ in range(1000):  # busy clears right after the handler returns
            if not worker.busy:
                break
            threading.Event().wait(0.005)
        assert not worker.busy
    finally:
        assert worker.stop()


def test_jobs_are_refused_while_busy_never_queued():
    release, started = threading.Event(), threading.Event()
    seen = []

    def handle(job):
        seen.append(job)
        started.set()
        release.wait(WAIT_SEC)

    worker = SkippingWorker(handle, "test_worker")
    try:
        assert worker.try_submit("first")
        assert started.wait(WAIT_SEC)
        assert worker.busy
        assert not worker.try_submit("second")
        release.set()
    finally:
        assert worker.stop()
    assert seen == ["first"]


def test_a_raising_job_does_not_end_the_thread():
    done = threading.Event()

    def handle(job):
        if job == "bad":
            raise RuntimeError("boom")
        done.set()

    worker = SkippingWorker(handle, "test_worker")
    try:
        assert worker.try_submit("bad")
        for _ in range(1000):
            if worker.try_submit("good"):
                break
            threading.Event().wait(0.005)
        assert done.wait(WAIT_SEC)
    finally:
        assert worker.stop()


def test_no_job_is_taken_after_stop():
    worker = SkippingWorker(lambda job: None, "test_worker")
    assert worker.stop()
    assert not worker.try_submit(1)


def _two_at_once(worker, started, seen):
    assert worker.try_submit("a")
    assert worker.try_submit("b")
    for name in ("a", "b"):
        assert started[name].wait(WAIT_SEC), f"job {name} never started"
    assert sorted(seen) == ["a", "b"]


def _blocking_jobs(names):
    started = {name: threading.Event() for name in names}
    release = {name: threading.Event() for name in names}
    seen = []

    def handle(job):
        seen.append(job)
        started[job].set()
        release[job].wait(WAIT_SEC)

    return handle, started, release, seen


def test_capacity_two_runs_two_jobs_at_once_and_refuses_a_third():
    handle, started, release, seen = _blocking_jobs(["a", "b", "c"])
    worker = SkippingWorker(handle, "test_worker", capacity=2)
    try:
        # Both started while neither was released: they run at the same time.
        _two_at_once(worker, started, seen)
        assert worker.busy and worker.running == 2
        assert not worker.try_submit("c")
        release["a"].set()
        for _ in range(1000):  # a slot frees once "a" returns
            if worker.try_submit("c"):
                break
            threading.Event().wait(0.005)
        assert started["c"].wait(WAIT_SEC)
    finally:
        for event in release.values():
            event.set()
        assert worker.stop()
    assert sorted(seen) == ["a", "b", "c"]


def test_capacity_one_never_runs_two_jobs_at_once():
    handle, started, release, seen = _blocking_jobs(["a", "b"])
    worker = SkippingWorker(handle, "test_worker")
    try:
        assert worker.try_submit("a")
        assert started["a"].wait(WAIT_SEC)
        assert worker.busy and not worker.try_submit("b")
    finally:
        release["a"].set()
        assert worker.stop()
    assert seen == ["a"]


def test_lowering_the_capacity_live_keeps_running_jobs_and_refuses_until_below_it():
    handle, started, release, seen = _blocking_jobs(["a", "b", "c"])
    worker = SkippingWorker(handle, "test_worker", capacity=2)
    try:
        _two_at_once(worker, started, seen)
        worker.set_capacity(1)
        assert worker.running == 2 and worker.busy  # neither job was ended
        release["a"].set()
        for _ in range(1000):
            if worker.running == 1:
                break
            threading.Event().wait(0.005)
        assert worker.running == 1
        assert worker.busy and not worker.try_submit("c")  # one runs: the new limit
        release["b"].set()
        for _ in range(1000):
            if worker.try_submit("c"):
                break
            threading.Event().wait(0.005)
        assert started["c"].wait(WAIT_SEC)
        worker.set_capacity(3)
        assert not worker.busy
    finally:
        for event in release.values():
            event.set()
        assert worker.stop()
    assert sorted(seen) == ["a", "b", "c"]


def test_a_capacity_below_one_is_refused():
    worker = SkippingWorker(lambda job: None, "test_worker")
    try:
        for bad in (0, -1, 1.5, True):
            try:
                worker.set_capacity(bad)
            except ValueError as exc:
                assert "capacity" in str(exc)
            else:
                raise AssertionError(f"capacity {bad!r} accepted")
        assert worker.capacity == 1
    finally:
        assert worker.stop()
