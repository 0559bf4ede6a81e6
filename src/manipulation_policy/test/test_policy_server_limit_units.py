"""The server's limits without a process: lone surrogates, bounded metric labels, one-line
CLI refusals, the API key file, backend answer checks, the inference deadline, bounded
logging."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import pytest
from server_test_backends import BAD_ANSWERS

from manipulation_policy.core.api_key import ApiKeyUnusable
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.json_body import parse_json_body
from manipulation_policy.core.policy_types import Observation, PolicyAction, Pose, Vector3
from manipulation_policy.policy_server import build_parser
from manipulation_policy.server.answer import BackendAnswerError, checked_response
from manipulation_policy.server.auth import load_api_key
from manipulation_policy.server.inference_worker import (
    BackendStuckError,
    InferenceWorker,
    PredictionTimeoutError,
    QueueFullError,
)
from manipulation_policy.server.log_limits import AccessLogRedactor, RateLimitFilter, printable
from manipulation_policy.server.metrics import ServerMetrics, counter_values
from manipulation_policy.server.middleware import RefusalPacer

# ------------------------------------------------------------ request text


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"reference_frame": "\\ud800"}', "reference_frame"),
        (b'{"reference_frame": "\xed\xa0\x80"}', "reference_frame"),
        (b'{"joint_states": {"name": ["a", "\\udc00"]}}', "joint_states.name[1]"),
        (b'{"extra": {"\\ud800": 1}}', "extra.<key>"),
        ('{"instruction": "\ud800"}'.encode("utf-16", "surrogatepass"), "instruction"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(raw, field):
    with pytest.raises(InputError) as caught:
        parse_json_body(raw)
    assert caught.value.field == field


def test_surrogate_pairs_are_ordinary_text():
    assert parse_json_body(b'{"instruction": "\\ud83d\\ude00 pick"}') == {"instruction": "😀 pick"}


# ------------------------------------------------------------------ metrics


def test_request_metric_labels_are_bounded_whatever_the_method():
    metrics = ServerMetrics()
    for index in range(500):
        metrics.observe_request("other", f"M{index}", 405, 0.001)
    metrics.observe_request("/infer", "POST", 200, 0.001)
    assert set(counter_values(metrics.requests)) == {
        ("other", "other", "405"),
        ("/infer", "POST", "200"),
    }


# ---------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--port", "0"], "--port"),
        (["--port", "http"], "--port"),
        (["--graceful-timeout", "-5"], "--graceful-timeout"),
        (["--graceful-timeout", "inf"], "--graceful-timeout"),
        (["--inference-timeout", "0"], "--inference-timeout"),
        (["--inference-timeout", "nan"], "--inference-timeout"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--max-image-pixels", "1e9"], "--max-image-pixels"),
    ],
)
def test_bad_command_line_values_are_one_line_refusals(capsys, argv, named):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("policy_server: error:"), err
    assert named in err


def test_good_command_line_values_are_taken():
    args = build_parser().parse_args(
        ["--port", "65535", "--graceful-timeout", "0", "--inference-timeout", "2.5"]
    )
    assert (args.port, args.graceful_timeout, args.inference_timeout) == (65535, 0.0, 2.5)


def test_api_key_file_that_is_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "key"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            load_api_key(str(fifo), {})
        except ApiKeyUnusable as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock the open() of the old code, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("loading the key from a FIFO blocked")
    assert "not a regular file" in outcome["error"]


def test_api_key_file_over_the_size_limit_is_refused(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k" * 100_000)
    with pytest.raises(ApiKeyUnusable, match="over"):
        load_api_key(str(key_file), {})


# ----------------------------------------------------------- backend answers


@pytest.mark.parametrize("kind", sorted(BAD_ANSWERS))
def test_backend_answers_outside_the_contract_name_the_field(kind):
    action, field = BAD_ANSWERS[kind]
    with pytest.raises(BackendAnswerError) as caught:
        checked_response(action)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "action, field",
    [
        (
            PolicyAction(eef_target=Pose(position=Vector3(x=float("nan")))),
            "eef_target_pose.position.x",
        ),
        (PolicyAction(eef_target="up"), "eef_target_pose"),
        (PolicyAction(joint_deltas=(0.1, True)), "joint_deltas[1]"),
        (PolicyAction(joint_deltas=(0.0,) * 300), "joint_deltas"),
        (PolicyAction(confidence=10**400), "confidence"),
        (PolicyAction(reference_frame="f" * 257), "reference_frame"),
        (PolicyAction(eef_target_mode="sideways"), "eef_target_mode"),
    ],
)
def test_more_broken_answers_name_the_field(action, field):
    with pytest.raises(BackendAnswerError) as caught:
        checked_response(action)
    assert caught.value.field == field


def test_a_good_answer_passes_unchanged():
    action = PolicyAction(confidence=1.0, gripper_command=0.0, joint_deltas=(0.1, -2))
    body = checked_response(action, request_id="r", inference_time_ms=1.5)
    assert body["joint_deltas"] == [0.1, -2] and body["confidence"] == 1.0
    assert body["request_id"] == "r" and body["gripper_active"] is True


# ------------------------------------------------------------------ deadline


def test_prediction_past_its_deadline_times_out_marks_the_worker_stuck_and_recovers():
    release = threading.Event()

    def predict(observation: Observation) -> PolicyAction:
        if observation.instruction == "hang":
            release.wait(30)
        return PolicyAction()

    worker = InferenceWorker(predict, max_queue=4, deadline_s=0.2)

    async def scenario():
        started = time.monotonic()
        with pytest.raises(PredictionTimeoutError):
            await worker.predict(Observation(instruction="hang"))
        assert time.monotonic() - started < 2
        assert "deadline" in worker.health_problem()
        with pytest.raises(BackendStuckError):
            worker.try_admit()
        with pytest.raises(BackendStuckError):
            await worker.predict(Observation())
        release.set()
        for _ in range(200):
            if worker.health_problem() is None:
                break
            await asyncio.sleep(0.01)
        assert worker.health_problem() is None
        action, _ = await worker.predict(Observation())
        return action

    assert asyncio.run(scenario()) == PolicyAction()
    worker.close()


def test_model_thread_is_a_daemon_and_survives_base_exceptions():
    def predict(observation: Observation) -> PolicyAction:
        if observation.instruction == "exit":
            raise SystemExit(3)
        return PolicyAction(confidence=0.5)

    worker = InferenceWorker(predict, max_queue=1)

    async def scenario():
        with pytest.raises(Exception, match="SystemExit"):
            await worker.predict(Observation(instruction="exit"))
        return await worker.predict(Observation())

    action, _ = asyncio.run(scenario())
    assert action.confidence == 0.5
    model_threads = [t for t in threading.enumerate() if t.name == "policy-inference"]
    assert model_threads and all(t.daemon for t in model_threads)
    worker.close()


def test_admission_counts_one_running_plus_the_queue():
    worker = InferenceWorker(lambda observation: PolicyAction(), max_queue=1)
    worker.try_admit()
    worker.try_admit()
    with pytest.raises(QueueFullError):
        worker.try_admit()
    worker.release()
    worker.try_admit()
    worker.close()


# ------------------------------------------------------------------ logging


def _record(msg: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_rate_limit_lets_one_line_per_kind_through_and_counts_the_rest():
    now = [0.0]
    limiter = RateLimitFilter(interval_s=10, clock=lambda: now[0])
    error = OSError(24, "Too many open files")
    passed = [
        limiter.filter(_record("accept failed\nsocket: %s", i, exc=error)) for i in range(1000)
    ]
    assert passed.count(True) == 1
    assert limiter.filter(_record("another kind")) is True
    now[0] = 11.0
    record = _record("accept failed\nsocket: %s", 1, exc=error)
    assert limiter.filter(record) is True
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert "999 more like this" in record.getMessage()
    assert "Too many open files" in record.getMessage()


def test_access_log_hides_the_query_and_clips_the_path():
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", "/infer?api_key=SECRET&x=1", "1.1", 401), None,
    )  # fmt: skip
    AccessLogRedactor().filter(record)
    assert "SECRET" not in record.getMessage() and "/infer?<query hidden>" in record.getMessage()
    record.args = ("c", "GET", "/" + "a" * 10_000, "1.1", 404)
    AccessLogRedactor().filter(record)
    assert len(record.getMessage()) < 400


def test_clip_bounds_text_and_makes_it_valid_unicode():
    assert printable("short") == "short"
    clipped = printable("x" * 10_000, 100)
    assert len(clipped) < 150 and "10000 characters" in clipped
    printable("\ud800").encode("utf-8")  # no UnicodeEncodeError


# ---------------------------------------------------------------- refusals


def test_a_connection_refused_again_within_the_cooldown_waits_out_the_rest():
    now = [100.0]
    pacer = RefusalPacer(cooldown_s=0.5, max_clients=2, clock=lambda: now[0])
    client = ("127.0.0.1", 4000)
    assert pacer.delay_for(client) == 0.0  # first refusal: at once
    pacer.refused(client)
    now[0] += 0.1
    assert pacer.delay_for(client) == pytest.approx(0.4)
    assert pacer.delay_for(("127.0.0.1", 4001)) == 0.0  # other connections unaffected
    now[0] += 0.5
    assert pacer.delay_for(client) == 0.0
    assert pacer.delay_for(None) == 0.0
    for port in range(10):  # memory stays bounded
        pacer.refused(("127.0.0.1", port))
    assert len(pacer._last_refused) == 2
