"""SkippingWorker: one job at a time, jobs refused while busy, alive after a raise. No ROS."""

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
