"""--model-instances through a real policy server process on loopback.

InstanceBackend (instance_test_backends) says in each answer which instance
predicted it and when its call started and ended; its ``hold <file>`` instruction
keeps a model call running until the test creates that file, so "running at
once" is a state seen on /info before the release, never a timing guess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from instance_test_backends import SPAN_NAMES

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.policy_server import INSTANCE_DEVICES_ENV, MODEL_INSTANCES_ENV
from manipulation_policy.server.process import ServerProcess

TEST_DIR = str(Path(__file__).resolve().parent)
INSTANCES = "instance_test_backends:InstanceBackend"
BOUND_S = 30.0


def instance_server(*args: str, instances_env: str = "") -> ServerProcess:
    return ServerProcess(
        "--backend", INSTANCES, "--no-access-log", *args,
        env={API_KEY_ENV: "", MODEL_INSTANCES_ENV: instances_env},
        extra_pythonpath=[TEST_DIR],
    )  # fmt: skip


def post(url: str, instruction: str = "", echo: float | None = None) -> requests.Response:
    body: dict = {"instruction": instruction}
    if echo is not None:
        body["joint_states"] = {"name": ["j"], "position": [echo]}
    return requests.post(f"{url}/infer", json=body, timeout=BOUND_S * 2)


def span(answer: requests.Response) -> dict[str, float]:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert tuple(body["joint_names"]) == SPAN_NAMES
    return dict(zip(SPAN_NAMES, body["joint_positions"], strict=True))


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def info(url: str) -> dict:
    return requests.get(f"{url}/info", timeout=5).json()


def health(url: str) -> requests.Response:
    return requests.get(f"{url}/health", timeout=5)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gauge(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def release(gate: Path) -> None:
    gate.write_text("go")


# ----------------------------------------------------------- predictions at once


def test_two_instances_predict_two_requests_at_once(tmp_path):
    gate = tmp_path / "release"
    with instance_server("--model-instances", "2", "--max-batch-size", "1") as server:
        url = server.base_url
        described = info(url)
        assert described["model_instances"] == 2
        assert gauge(url, "policy_server_model_instances") == 2
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(post, url, f"hold {gate}") for _ in range(2)]
            wait_for(lambda: info(url)["instances"]["busy"] == 2, "both instances busy")
            assert gauge(url, "policy_server_inference_in_progress") == 2
            assert health(url).status_code == 200  # not behind the predictions
            release(gate)
            first, second = (span(call.result()) for call in calls)
        assert first["instance"] != second["instance"]
        assert overlap(first, second), (first, second)
        each = info(url)["instances"]["each"]
        assert [instance["calls"] for instance in each] == [1, 1]


def test_one_instance_predicts_one_request_at_a_time(tmp_path):
    gate = tmp_path / "release"
    with instance_server("--max-batch-size", "1") as server:
        url = server.base_url
        assert info(url)["model_instances"] == 1
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(post, url, f"hold {gate}") for _ in range(2)]
            wait_for(
                lambda: info(url)["queue"] == {"depth": 1, "max": 8, "inference_in_progress": 1},
                "one running, one waiting",
            )
            release(gate)
            first, second = (span(call.result()) for call in calls)
        assert first["instance"] == second["instance"] == 0
        assert not overlap(first, second), (first, second)


# ---------------------------------------------------------------- a stuck instance


def test_a_stuck_instance_leaves_the_other_serving_until_both_are_stuck(tmp_path):
    gate = tmp_path / "release"
    with instance_server(
        "--model-instances", "2", "--max-batch-size", "1", "--inference-timeout", "1"
    ) as server:
        url = server.base_url
        timed_out = post(url, f"hold {gate}")
        assert timed_out.status_code == 504, timed_out.text
        wait_for(lambda: info(url)["instances"]["stuck"] == 1, "one stuck instance")
        assert gauge(url, "policy_server_model_instances_stuck") == 1
        # One instance still serves: healthy, and predictions answered by it.
        assert health(url).status_code == 200
        assert info(url)["health_problem"] is None
        served = [span(post(url, echo=float(i))) for i in range(3)]
        assert {s["echo"] for s in served} == {0.0, 1.0, 2.0}
        assert len({s["instance"] for s in served}) == 1
        # The second one stuck too: unhealthy with the reason, /infer refused at once.
        assert post(url, f"hold {gate}").status_code == 504
        wait_for(lambda: health(url).status_code == 503, "unhealthy")
        reason = health(url).json()["reason"]
        assert "all 2 model instances are stuck" in reason and "deadline" in reason
        assert gauge(url, "policy_server_model_instances_stuck") == 2
        refused = post(url)
        assert refused.status_code == 503 and refused.json()["error"] == "backend_stuck"
        assert "Retry-After" in refused.headers
        # Their calls return: healthy again, both instances serve again.
        release(gate)
        wait_for(lambda: health(url).status_code == 200, "recovery")
        wait_for(lambda: info(url)["instances"]["busy"] == 0, "both instances back")
        assert info(url)["instances"]["stuck"] == 0
        assert span(post(url, echo=7.0))["echo"] == 7.0


# ------------------------------------------------------------------------ admission


def test_admission_is_n_running_plus_max_queue_waiting(tmp_path):
    gate = tmp_path / "release"
    with instance_server(
        "--model-instances", "2", "--max-batch-size", "1", "--max-queue", "1"
    ) as server:
        url = server.base_url
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(post, url, f"hold {gate}") for _ in range(2)]
            wait_for(lambda: info(url)["instances"]["busy"] == 2, "two running")
            waiting = pool.submit(post, url, "", 5.0)
            wait_for(lambda: info(url)["queue"]["depth"] == 1, "one waiting")
            refused = post(url)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "queue_full"
            assert int(refused.headers["Retry-After"]) >= 1
            release(gate)
            assert all(call.result().status_code == 200 for call in running)
            assert span(waiting.result())["echo"] == 5.0
        assert info(url)["errors_by_kind"] == {"queue_full": 1}


# ------------------------------------------------------------------------ batching


def test_two_instances_run_two_batches_at_once_each_request_its_own_answer(tmp_path):
    first_gate, second_gate = tmp_path / "first", tmp_path / "second"
    # A long window: a request still being decoded when an instance frees joins its batch.
    with instance_server(
        "--model-instances", "2", "--max-batch-size", "2", "--batch-window-ms", "1000"
    ) as server:
        url = server.base_url
        assert info(url)["batching"]["enabled"] is True
        with ThreadPoolExecutor(6) as pool:
            holding = []
            for busy in (1, 2):  # one after the other: each alone, on its own instance
                holding.append(pool.submit(post, url, f"hold {first_gate}", 89.0 + busy))
                wait_for(lambda n=busy: info(url)["instances"]["busy"] == n, "an instance held")
            # Both instances busy: these four wait, then form the next two batches.
            bodies = [pool.submit(post, url, f"hold {second_gate}", float(i)) for i in range(4)]
            wait_for(lambda: info(url)["queue"]["depth"] == 4, "four waiting")
            release(first_gate)
            wait_for(
                lambda: info(url)["batching"]["in_prediction"] == 4
                and info(url)["instances"]["busy"] == 2,
                "two batches of two running",
            )
            release(second_gate)
            spans = [span(call.result()) for call in bodies]
            assert [span(call.result())["echo"] for call in holding] == [90.0, 91.0]
        assert [s["echo"] for s in spans] == [0.0, 1.0, 2.0, 3.0]
        assert all(s["batch_size"] == 2 for s in spans)
        batches: dict[float, list[dict]] = {}
        for s in spans:
            batches.setdefault(s["instance"], []).append(s)
        assert len(batches) == 2, spans
        one, other = (group[0] for group in batches.values())
        assert overlap(one, other), spans
        assert info(url)["batching"]["largest_batch"] == 2


# -------------------------------------------------------------------- bad settings


def run_server(args: list[str], env_value: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{API_KEY_ENV: ""})
    env.pop(MODEL_INSTANCES_ENV, None)
    env.pop(INSTANCE_DEVICES_ENV, None)
    if env_value is not None:
        env[MODEL_INSTANCES_ENV] = env_value
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TEST_DIR, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "manipulation_policy.policy_server", "--port", "9", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("value", ["0", "17", "x", "1.5", "-2"])
def test_a_bad_model_instances_flag_is_one_line_exit_2(value):
    result = run_server(["--model-instances", value])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model-instances" in lines[0] and repr(value) in lines[0]


@pytest.mark.parametrize("value", ["0", "17", "x", "two"])
def test_a_bad_model_instances_variable_is_one_line_exit_2(value):
    result = run_server([], env_value=value)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"policy_server: error: {MODEL_INSTANCES_ENV}: {value!r}")


def test_the_flag_wins_over_the_variable_and_the_variable_over_the_default():
    with instance_server("--model-instances", "3", instances_env="x") as server:
        assert info(server.base_url)["model_instances"] == 3
    with instance_server(instances_env="2") as server:
        assert info(server.base_url)["model_instances"] == 2
        assert len(info(server.base_url)["instances"]["each"]) == 2


def test_an_instance_that_fails_to_load_is_one_clear_line():
    result = run_server(
        ["--backend", "instance_test_backends:SecondInstanceFailsBackend", "--model-instances", "2"]
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "policy_server: error: cannot load backend "
        "'instance_test_backends:SecondInstanceFailsBackend' (instance 2 of 2): "
        "OSError: CUDA out of memory"
    )
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------- where instances run

PLACED = "instance_test_backends:PlacedBackend"


def instance_devices(url: str) -> list:
    return [instance["device"] for instance in info(url)["instances"]["each"]]


def test_instance_devices_place_each_instance_in_turn():
    with instance_server(
        "--backend", PLACED, "--model-instances", "3", "--instance-devices", "cuda:0, cuda:1"
    ) as server:  # fmt: skip
        assert instance_devices(server.base_url) == ["cuda:0", "cuda:1", "cuda:0"]
        assert post(server.base_url).status_code == 200


def test_without_instance_devices_every_instance_is_on_the_device_option():
    with instance_server("--backend", PLACED, "--model-instances", "2", "--device", "cpu") as s:
        assert instance_devices(s.base_url) == ["cpu", "cpu"]


def test_the_instance_devices_variable_is_read_and_the_flag_wins():
    env = {API_KEY_ENV: "", MODEL_INSTANCES_ENV: "2", INSTANCE_DEVICES_ENV: "cuda:1"}
    with ServerProcess("--backend", PLACED, "--no-access-log", env=env,
                       extra_pythonpath=[TEST_DIR]) as server:  # fmt: skip
        assert instance_devices(server.base_url) == ["cuda:1", "cuda:1"]
    with ServerProcess("--backend", PLACED, "--no-access-log", "--instance-devices", "cpu",
                       env=env, extra_pythonpath=[TEST_DIR]) as server:  # fmt: skip
        assert instance_devices(server.base_url) == ["cpu", "cpu"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", PLACED, "--instance-devices", "gpu0"],
         "--instance-devices: 'gpu0' must be auto, cpu, cuda or cuda:<index>; got 'gpu0'"),
        (["--backend", PLACED, "--model-instances", "2", "--instance-devices", "cpu,cpu,cpu"],
         "--instance-devices: 3 devices for 2 model instance(s) (--model-instances)"),
        (["--backend", "stub", "--instance-devices", "cpu"],
         "--instance-devices: backend 'stub' has no device option"),
    ],
)  # fmt: skip
def test_bad_instance_devices_are_one_line(args, message):
    result = run_server(args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"policy_server: error: {message}"
    assert "Traceback" not in result.stderr
