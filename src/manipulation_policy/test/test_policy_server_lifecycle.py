"""The real server under load and failure: backend errors, a full queue (503), clients that
give up, SIGTERM with a request in flight, backends that fail to load."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from waiting import wait_until

from manipulation_policy import policy_server
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.server.process import ServerProcess, ServerStartError

TEST_DIR = str(Path(__file__).resolve().parent)
SCRIPTED = "server_test_backends:ScriptedBackend"
NO_KEY = {API_KEY_ENV: ""}


def scripted_server(*args: str) -> ServerProcess:
    return ServerProcess(
        "--backend", SCRIPTED, "--no-access-log", *args,
        env=NO_KEY, extra_pythonpath=[TEST_DIR],
    )  # fmt: skip


def infer(url: str, instruction: str = "", timeout: float = 20.0) -> requests.Response:
    return requests.post(f"{url}/infer", json={"instruction": instruction}, timeout=timeout)


def gauge(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class Background:
    """A request sent on its own thread; ``result()`` joins it (bounded)."""

    def __init__(self, function, *args, **kwargs):
        self._outcome = {}

        def run():
            try:
                self._outcome["value"] = function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - handed to the test thread
                self._outcome["error"] = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 30.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background request did not finish"
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


@pytest.fixture(scope="module")
def scripted():
    with scripted_server() as server:
        yield server


# ------------------------------------------------------------- backend errors


def test_backend_refusing_the_input_is_422_naming_the_field(scripted):
    answer = infer(scripted.base_url, "need image")
    assert answer.status_code == 422
    assert answer.json()["field"] == "image"
    assert "camera image" in answer.json()["detail"]


def test_backend_failure_is_a_json_500_and_the_server_lives_on(scripted):
    answer = infer(scripted.base_url, "raise")
    assert answer.status_code == 500
    assert answer.json()["error"] == "backend_error"
    assert "simulated CUDA error" in answer.json()["detail"]
    assert infer(scripted.base_url, "").status_code == 200


def test_non_finite_backend_output_is_a_500_not_invalid_json(scripted):
    answer = infer(scripted.base_url, "nan")
    assert answer.status_code == 500
    assert answer.json()["error"] == "backend_error"
    assert "confidence" in answer.json()["detail"]


def test_backend_errors_are_counted(scripted):
    def backend_errors() -> int:
        info = requests.get(f"{scripted.base_url}/info", timeout=5).json()
        return info["errors_by_kind"].get("backend_error", 0)

    before = backend_errors()
    assert infer(scripted.base_url, "raise").status_code == 500
    assert infer(scripted.base_url, "nan").status_code == 500
    assert infer(scripted.base_url, "").status_code == 200
    assert backend_errors() == before + 2
    assert requests.get(f"{scripted.base_url}/info", timeout=5).json()["backend"]["model"] == (
        "scripted-test-model"
    )


# ----------------------------------------------------------------- the queue


def test_full_queue_answers_503_with_retry_after_at_once():
    with scripted_server("--max-queue", "1") as server:
        url = server.base_url
        running = Background(infer, url, "sleep 1.5")
        wait_until(lambda: gauge(url, "policy_server_inference_in_progress") == 1)
        waiting = Background(infer, url, "")
        wait_until(lambda: gauge(url, "policy_server_queue_depth") == 1)

        refused = infer(url, "")
        assert running.thread.is_alive(), "the 503 must not wait for the model"
        assert refused.status_code == 503
        assert refused.json()["error"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1

        assert running.result().status_code == 200
        assert waiting.result().status_code == 200
        assert infer(url, "").status_code == 200  # room again once the line drains
        info = requests.get(f"{url}/info", timeout=5).json()
        assert info["errors_by_kind"] == {"queue_full": 1}
        assert info["queue"]["depth"] == 0


def test_predictions_never_overlap():
    with scripted_server("--max-queue", "8") as server:
        started = time.monotonic()
        calls = [Background(infer, server.base_url, "sleep 0.2") for _ in range(4)]
        answers = [call.result() for call in calls]
        elapsed = time.monotonic() - started
        assert all(answer.status_code == 200 for answer in answers)
        # Serialised: four 0.2 s predictions cannot finish in less than 0.8 s.
        assert elapsed >= 0.8
        times = sorted(answer.json()["inference_time_ms"] for answer in answers)
        assert all(t >= 200 for t in times)


def test_request_whose_client_gave_up_is_not_run():
    with scripted_server() as server:
        url = server.base_url
        running = Background(infer, url, "sleep 1.0")
        wait_until(lambda: gauge(url, "policy_server_inference_in_progress") == 1)
        with pytest.raises(requests.Timeout):
            infer(url, "", timeout=0.3)  # waits behind the running one, then hangs up
        assert running.result().status_code == 200
        wait_until(lambda: gauge(url, "policy_server_queue_depth") == 0)
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert 'policy_server_errors_total{kind="client_disconnected"} 1' in metrics
        assert "policy_server_inference_duration_seconds_count 1" in metrics


# ------------------------------------------------------------------ shutdown


def test_sigterm_lets_the_request_in_flight_finish():
    server = scripted_server().start()
    try:
        url = server.base_url
        in_flight = Background(infer, url, "sleep 1.0")
        wait_until(lambda: gauge(url, "policy_server_inference_in_progress") == 1)
        server.terminate()
        answer = in_flight.result()
        assert answer.status_code == 200
        assert answer.json()["inference_time_ms"] >= 1000
        assert server.process.wait(timeout=20) == 0  # a clean stop, not death by signal
    finally:
        server.stop()
    assert "Application shutdown complete" in server.log()
    assert "Traceback" not in server.log()


# -------------------------------------------------------------- load failure


@pytest.mark.parametrize(
    "backend, message",
    [
        ("server_test_backends:UnloadableBackend", "OSError: no weights at /models/missing"),
        ("no_such_backend", "unknown backend 'no_such_backend'"),
        ("no_such_module:Backend", "backend module 'no_such_module' not found"),
        ("server_test_backends:NoSuchClass", "has no class 'NoSuchClass'"),
        ("server_test_backends:", "is not module.path:ClassName"),
        # Without torch (the robot-floor lane) the one line says that instead.
        (
            "openvla --model /no/such/model/dir",
            "/no/such/model/dir" if importlib.util.find_spec("torch")
            else "needs the Python package 'torch'",
        ),
    ],
)
def test_backend_that_fails_to_load_is_one_clear_line(monkeypatch, capsys, backend, message):
    monkeypatch.syspath_prepend(TEST_DIR)
    for name in ("OPENVLA_MODEL", "OPENVLA_MODEL_ID", "OPENVLA_QUANTIZATION"):
        monkeypatch.delenv(name, raising=False)
    assert policy_server.main(["--backend", *backend.split()]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("policy_server: error: cannot load backend")
    assert message in lines[0]


def test_load_failure_exits_the_process_non_zero_without_a_traceback():
    env = dict(os.environ, **NO_KEY)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TEST_DIR, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "manipulation_policy.policy_server", "--port", "9",
         "--backend", "server_test_backends:UnloadableBackend"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "policy_server: error: cannot load backend 'server_test_backends:UnloadableBackend': "
        "OSError: no weights at /models/missing"
    ]
    assert result.stdout == ""


# ------------------------------------------------- the server_process helper


def test_server_process_reports_a_start_failure_with_the_servers_words():
    with pytest.raises(ServerStartError) as caught:
        ServerProcess("--backend", "no_such_backend", env=NO_KEY, startup_timeout=60).start()
    assert "exited with code 1" in str(caught.value)
    assert "unknown backend 'no_such_backend'" in str(caught.value)


def test_server_process_on_a_taken_port_fails_clearly():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ServerStartError) as caught:
            ServerProcess(port=port, env=NO_KEY, startup_timeout=60).start()
    assert "address already in use" in str(caught.value).lower()
