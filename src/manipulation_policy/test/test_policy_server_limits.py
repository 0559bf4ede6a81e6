"""The real server pushed by hostile clients and faulty backends: every push ends as a
bounded, clear answer (never a 500 for bad input, never an answer outside the contract,
never a hang), and the server stays healthy or says why it is not."""

from __future__ import annotations

import json
import random
import resource
import signal
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from server_test_backends import BAD_ANSWERS
from waiting import wait_until

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.core.contract import InferResponse
from manipulation_policy.server.process import ServerProcess

TEST_DIR = str(Path(__file__).resolve().parent)
SCRIPTED = "server_test_backends:ScriptedBackend"
NO_KEY = {API_KEY_ENV: ""}


def scripted_server(*args: str, env=NO_KEY, **kwargs) -> ServerProcess:
    return ServerProcess(
        "--backend", SCRIPTED, *args, env=env, extra_pythonpath=[TEST_DIR], **kwargs
    )  # fmt: skip


def infer(url: str, instruction: str = "", timeout: float = 20.0, **fields) -> requests.Response:
    body = {"instruction": instruction, **fields}
    return requests.post(f"{url}/infer", json=body, timeout=timeout)


def predicting(url: str) -> bool:
    """The server's policy_server_inference_in_progress gauge is 1 (read by the
    Prometheus parser: a text search would also match the metric's HELP line)."""
    text = requests.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "policy_server_inference_in_progress":
            return family.samples[0].value == 1
    raise AssertionError("no policy_server_inference_in_progress in /metrics")


def error_count(url: str, kind: str, headers=None) -> float:
    text = requests.get(f"{url}/metrics", headers=headers, timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'policy_server_errors_total{{kind="{kind}"}} '):
            return float(line.split()[1])
    return 0.0


@pytest.fixture(scope="module")
def scripted():
    with scripted_server("--no-access-log") as server:
        yield server


# ------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "raw",
    [b'{"reference_frame": "\\ud800"}', b'{"reference_frame": "\xed\xa0\x80"}'],
    ids=["escape", "raw-bytes"],
)
def test_lone_surrogate_in_echoed_text_is_a_4xx_naming_it_not_a_500(scripted, raw):
    answer = requests.post(
        f"{scripted.base_url}/infer",
        data=raw,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    # Like NaN: a JSON text no strict parser would take, named like any bad field.
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "reference_frame"


def test_error_bodies_are_bounded_whatever_the_input(scripted):
    huge = "j" * (7 * 1024 * 1024)
    answer = infer(scripted.base_url, image="AAAA", image_encoding=huge, timeout=30)
    assert 400 <= answer.status_code < 500
    assert len(answer.content) < 2048, len(answer.content)
    assert answer.json()["error"]


def test_backend_exception_message_is_clipped_in_the_500(scripted):
    answer = infer(scripted.base_url, "raise huge")
    assert answer.status_code == 500
    assert answer.json()["error"] == "backend_error"
    assert len(answer.content) < 2048
    assert len(scripted.log()) < 100_000  # nor is the 2 MB message logged


def test_base_exception_from_the_backend_is_a_counted_json_500(scripted):
    before = error_count(scripted.base_url, "backend_error")
    answer = infer(scripted.base_url, "raise base")
    assert answer.status_code == 500
    assert answer.json()["error"] == "backend_error"
    assert "CustomBaseError" in answer.json()["detail"]
    assert error_count(scripted.base_url, "backend_error") == before + 1
    assert infer(scripted.base_url).status_code == 200  # the model thread survived it


# ------------------------------------------------------ backend answer checks


@pytest.mark.parametrize("kind", sorted(BAD_ANSWERS))
def test_backend_answer_outside_the_contract_is_a_500_naming_the_field(scripted, kind):
    before = error_count(scripted.base_url, "backend_error")
    answer = infer(scripted.base_url, f"answer {kind}")
    assert answer.status_code == 500, answer.text
    body = answer.json()
    assert body["error"] == "backend_error"
    assert body["field"] == BAD_ANSWERS[kind][1]
    assert error_count(scripted.base_url, "backend_error") == before + 1


def test_every_good_answer_validates_against_the_response_model(scripted):
    answer = infer(scripted.base_url, "move", request_id="r-1")
    assert answer.status_code == 200
    InferResponse.model_validate(answer.json(), strict=True)


# --------------------------------------------------------------- deadlines


def test_stuck_prediction_is_504_then_unhealthy_then_recovers():
    with scripted_server("--inference-timeout", "1") as server:
        url = server.base_url
        outcome = {}

        def queued_behind():
            wait_until(lambda: predicting(url))
            began = time.monotonic()
            outcome["answer"] = infer(url, timeout=20)
            outcome["seconds"] = time.monotonic() - began

        queued = threading.Thread(target=queued_behind, daemon=True)
        queued.start()
        started = time.monotonic()
        answer = infer(url, "sleep 4")
        waited = time.monotonic() - started
        queued.join(10)
        # The request queued behind the hung one is told at the deadline, not at its end.
        assert outcome["answer"].status_code == 503, outcome["answer"].text
        assert outcome["answer"].json()["error"] == "backend_stuck"
        assert outcome["seconds"] < 3.0
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"] == "inference_timeout"
        assert "deadline" in answer.json()["detail"]
        assert waited < 3.0
        # While the backend is still inside that call: unhealthy with a reason, and
        # /infer refused at once instead of queued behind it.
        health = requests.get(f"{url}/health", timeout=5)
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert "deadline" in health.json()["reason"]
        refused = infer(url, timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"] == "backend_stuck"
        assert "Retry-After" in refused.headers
        # The call ends: healthy again, predictions again.
        wait_until(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, 10)
        assert infer(url).status_code == 200


def test_shutdown_is_bounded_by_the_graceful_timeout_with_a_hung_backend():
    server = scripted_server("--inference-timeout", "600", "--graceful-timeout", "1")
    with server:
        session = requests.Session()
        try:
            session.post(f"{server.base_url}/infer", json={"instruction": "sleep 3600"}, timeout=1)
        except requests.exceptions.ReadTimeout:
            pass
        wait_until(lambda: predicting(server.base_url))
        started = time.monotonic()
        server.terminate()
        server.process.wait(timeout=15)
        assert time.monotonic() - started < 8
        assert server.process.returncode == 0
    assert "Traceback" not in server.log()


def _sigint_as_in_a_terminal() -> None:
    # A test run started in the background (`make test &`) ignores SIGINT, and a
    # child inherits that; a server started from a terminal has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_with_one_line_and_no_traceback():
    server = scripted_server(preexec_fn=_sigint_as_in_a_terminal)
    with server:
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=15)
    assert server.process.returncode == 130
    assert "Traceback" not in server.log()
    assert "KeyboardInterrupt" not in server.log()


# --------------------------------------------------------------- admission


def test_queue_full_is_answered_before_the_body_is_read():
    with scripted_server("--max-queue", "0") as server:
        url = server.base_url
        busy = requests.Session()
        runner = threading.Thread(
            target=lambda: busy.post(f"{url}/infer", json={"instruction": "sleep 2"}, timeout=20),
            daemon=True,
        )
        runner.start()
        wait_until(lambda: predicting(url))
        # Headers promise 100000 bytes; only 10 come. The 503 must not wait for the rest.
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(
                b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{\"joint_st"
            )
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 503"), head[:200]
        runner.join(20)


def test_a_client_ignoring_retry_after_is_paced_per_connection():
    with scripted_server("--max-queue", "0", "--no-access-log") as server:
        url = server.base_url
        runner = threading.Thread(
            target=lambda: infer(url, "sleep 3", timeout=20), daemon=True
        )
        runner.start()
        wait_until(lambda: predicting(url))
        with requests.Session() as hammering:
            started = time.monotonic()
            first = hammering.post(f"{url}/infer", json={}, timeout=10)
            first_s = time.monotonic() - started
            second = hammering.post(f"{url}/infer", json={}, timeout=10)
            second_s = time.monotonic() - started - first_s
        fresh_started = time.monotonic()
        fresh = infer(url, timeout=10)  # a new connection: refused at once
        fresh_s = time.monotonic() - fresh_started
        assert [first.status_code, second.status_code, fresh.status_code] == [503] * 3
        assert first_s < 0.4 and fresh_s < 0.4
        assert second_s >= 0.4  # waited out the rest of the 0.5 s cooldown
        runner.join(20)


def test_urllib_client_sees_the_413_not_a_connection_reset():
    with scripted_server("--max-body-bytes", "100000", "--no-access-log") as server:
        # urllib sends Connection: close and writes the whole body before it reads.
        body = json.dumps({"instruction": "x" * 9_000_000}).encode()
        for _ in range(3):
            request = urllib.request.Request(
                f"{server.base_url}/infer", data=body, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=10)
            assert caught.value.code == 413
            assert json.loads(caught.value.read())["error"] == "payload_too_large"


def test_urllib_client_without_the_key_sees_the_401_not_a_connection_reset(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret")
    with scripted_server("--api-key-file", str(key_file), "--no-access-log") as server:
        body = json.dumps({"instruction": "pick", "pad": "x" * 4_000_000}).encode()
        for _ in range(3):
            request = urllib.request.Request(
                f"{server.base_url}/infer", data=body, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=10)
            assert caught.value.code == 401
            assert json.loads(caught.value.read())["error"] == "unauthorized"


# ------------------------------------------------------- metrics and logs


def test_random_methods_do_not_grow_the_metrics_even_unauthenticated(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    with scripted_server("--api-key-file", str(key_file), "--no-access-log") as server:
        url = server.base_url

        def series() -> int:
            text = requests.get(f"{url}/metrics", headers=auth, timeout=5).text
            return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

        before = series()
        rng = random.Random(7)
        with requests.Session() as session:
            for _ in range(150):
                method = "".join(rng.choice(string.ascii_uppercase) for _ in range(8))
                session.request(method, f"{url}/infer", timeout=5)
        assert series() <= before + 40  # one 'other' method per endpoint/status at most


def test_query_string_never_reaches_the_access_log():
    with scripted_server() as server:
        requests.get(f"{server.base_url}/health?api_key=TOPSECRETKEY", timeout=5)
        wait_until(lambda: "/health" in server.log())
        assert "TOPSECRETKEY" not in server.log()


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))


def test_connection_flood_past_the_file_limit_logs_a_few_lines_and_recovers():
    server = scripted_server("--no-access-log", preexec_fn=_low_file_limit)
    with server:
        idle = []
        try:
            for _ in range(300):
                sock = socket.socket()
                sock.settimeout(2)
                sock.connect((server.host, server.port))  # the backlog takes them
                idle.append(sock)
            time.sleep(3)  # let the server hit its file limit again and again
            flooded_log = len(server.log())
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: _health_ok(server.base_url), 15)
    assert flooded_log < 20_000, server.log()[-3000:]
    assert server.log().count("Traceback") <= 2


def _health_ok(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False
