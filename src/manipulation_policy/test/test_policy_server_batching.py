"""Micro-batching through a real policy server process on loopback.

The scripted backend's ``sleep`` instruction holds the model while the requests
under test are admitted, so they are known to wait together and to form
batches; every wait is for a condition seen on /info, bounded.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.server.process import ServerProcess

TEST_DIR = str(Path(__file__).resolve().parent)
SCRIPTED = "server_test_backends:ScriptedBackend"
HOLD_S = 3.0  # how long the blocking request holds the model
BOUND_S = 10.0


def start_server(*args: str) -> ServerProcess:
    return ServerProcess(
        "--backend", SCRIPTED, *args, env={API_KEY_ENV: ""}, extra_pythonpath=[TEST_DIR]
    )


@pytest.fixture(scope="module")
def server():
    with start_server("--max-batch-size", "4", "--batch-window-ms", "20") as process:
        yield process.base_url


def png_b64(rgb) -> str:
    pixels = np.zeros((24, 32, 3), np.uint8)
    pixels[...] = rgb
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def observation(index: int, instruction: str = "pick up the cup", image: bool = True) -> dict:
    body = {
        "reference_frame": "base_link",
        "joint_states": {"name": ["j1"], "position": [0.1 * index], "velocity": [], "effort": []},
        "instruction": instruction,
        "request_id": f"r{index}",
    }
    if image:
        body.update(image=png_b64((40 * index % 256, 200 - 20 * index, 90)),
                    image_encoding="png", image_width=32, image_height=24)  # fmt: skip
    return body


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/infer", json=body, timeout=BOUND_S + HOLD_S)


def info(url: str) -> dict:
    return requests.get(f"{url}/info", timeout=5).json()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def without_timing(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "inference_time_ms"}


def while_model_held(url: str, bodies: list[dict]) -> list[requests.Response]:
    """Hold the model, send ``bodies`` at once, wait until all are admitted, release."""
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        hold = pool.submit(post, url, observation(0, f"sleep {HOLD_S}"))
        wait_for(lambda: info(url)["batching"]["in_prediction"] == 1, "the holding request")
        futures = [pool.submit(post, url, body) for body in bodies]
        wait_for(lambda: info(url)["queue"]["depth"] == len(bodies), "all requests admitted")
        assert hold.result().status_code == 200
        return [future.result() for future in futures]


def test_info_describes_the_batching_settings(server):
    batching = info(server)["batching"]
    assert batching["enabled"] is True
    assert batching["max_batch_size"] == 4 and batching["window_ms"] == 20.0
    assert batching["backend_predict_batch"] is True


def test_concurrent_requests_share_backend_calls_and_each_gets_its_own_answer(server):
    bodies = [observation(i) for i in range(1, 7)]
    alone = [post(server, body) for body in bodies]
    assert all(answer.status_code == 200 for answer in alone)
    before = info(server)["batching"]

    together = while_model_held(server, bodies)

    after = info(server)["batching"]
    assert [answer.status_code for answer in together] == [200] * 6
    for single, batched in zip(alone, together, strict=True):
        assert without_timing(batched.json()) == without_timing(single.json())
    # Six observations (plus the holding one) in three backend calls: 1 + 4 + 2.
    assert after["batches_total"] - before["batches_total"] == 3
    assert after["batched_requests_total"] - before["batched_requests_total"] == 7
    assert after["largest_batch"] == 4
    answers = {answer.json()["request_id"] for answer in together}
    assert answers == {f"r{i}" for i in range(1, 7)}


def test_a_bad_observation_in_a_batch_fails_only_its_own_request(server):
    good_first, good_last = observation(1), observation(2)
    crashing = observation(3, "raise")
    imageless = observation(4, "need image", image=False)
    alone = [post(server, body).json() for body in (good_first, good_last)]
    before = info(server)["batching"]["batches_total"]

    answers = while_model_held(server, [good_first, crashing, imageless, good_last])

    assert [a.status_code for a in answers] == [200, 500, 422, 200]
    assert answers[1].json()["error"] == "backend_error"
    assert answers[2].json()["field"] == "image"
    assert without_timing(answers[0].json()) == without_timing(alone[0])
    assert without_timing(answers[3].json()) == without_timing(alone[1])
    assert info(server)["batching"]["batches_total"] - before == 2  # hold + one batch of 4


def test_a_bad_answer_or_a_base_exception_in_a_batch_fails_only_its_own_request(server):
    good_first, good_last = observation(1), observation(2)
    alone = [post(server, body).json() for body in (good_first, good_last)]
    before = info(server)["batching"]["batches_total"]

    answers = while_model_held(
        server, [good_first, observation(3, "answer confidence-5"),
                 observation(4, "raise base"), good_last],
    )  # fmt: skip

    assert [a.status_code for a in answers] == [200, 500, 500, 200]
    assert answers[1].json()["error"] == "backend_error"
    assert answers[1].json()["field"] == "confidence"  # the server's check of that answer
    assert "CustomBaseError" in answers[2].json()["detail"]
    assert without_timing(answers[0].json()) == without_timing(alone[0])
    assert without_timing(answers[3].json()) == without_timing(alone[1])
    assert info(server)["batching"]["batches_total"] - before == 2  # hold + one batch of 4


def test_a_stuck_batch_answers_each_request_504_at_the_deadline_then_recovers():
    with start_server("--max-batch-size", "4", "--inference-timeout", "2.5") as process:
        url = process.base_url
        with ThreadPoolExecutor(4) as pool:
            hold = pool.submit(post, url, observation(0, "sleep 1.5"))
            wait_for(lambda: info(url)["batching"]["in_prediction"] == 1, "the holding request")
            bodies = [observation(1), observation(2, "sleep 7"), observation(3)]
            futures = [pool.submit(post, url, body) for body in bodies]
            wait_for(lambda: info(url)["queue"]["depth"] == 3, "three waiting requests")
            assert hold.result().status_code == 200
            wait_for(lambda: info(url)["batching"]["in_prediction"] == 3, "the batch of three")
            batch_seen = time.monotonic()
            answers = [future.result() for future in futures]
            told_after = time.monotonic() - batch_seen
        # Each request of the hung batch at the deadline (2.5 s), not at its end (7 s).
        assert [a.status_code for a in answers] == [504] * 3, [a.text for a in answers]
        assert {a.json()["error"] for a in answers} == {"inference_timeout"}
        assert told_after < 5.0
        health = requests.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "batch" in health.json()["reason"]
        refused = post(url, observation(4))
        assert refused.status_code == 503 and refused.json()["error"] == "backend_stuck"
        wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, "recovery")
        assert post(url, observation(5)).status_code == 200


def test_batch_sizes_reach_the_metrics(server):
    text = requests.get(f"{server}/metrics", timeout=5).text
    assert "policy_server_batch_size_bucket" in text
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("policy_server_batch_size_count")
    )
    assert count == info(server)["batching"]["batches_total"]


def test_queue_full_is_still_503_with_batching():
    # --max-queue 2: two may wait behind the running prediction, the next is refused.
    with start_server("--max-batch-size", "4", "--max-queue", "2") as process:
        url = process.base_url
        with ThreadPoolExecutor(4) as pool:
            hold = pool.submit(post, url, observation(0, f"sleep {HOLD_S}"))
            wait_for(lambda: info(url)["batching"]["in_prediction"] == 1, "the holding request")
            waiting = [pool.submit(post, url, observation(i)) for i in (1, 2)]
            wait_for(lambda: info(url)["queue"]["depth"] == 2, "two waiting requests")
            refused = post(url, observation(3))
            assert refused.status_code == 503
            assert refused.json()["error"] == "queue_full"
            assert refused.headers["Retry-After"] == "1"
            assert hold.result().status_code == 200
            assert [f.result().status_code for f in waiting] == [200, 200]


def test_max_batch_size_one_turns_batching_off():
    with start_server("--max-batch-size", "1") as process:
        batching = info(process.base_url)["batching"]
        assert batching["enabled"] is False and batching["batches_total"] is None
        assert post(process.base_url, observation(1)).status_code == 200


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-batch-size", "0"), ("--batch-window-ms", "-1"), ("--batch-window-ms", "nan"),
     ("--batch-window-ms", "5000"), ("--max-batch-size", "many")],
)
def test_nonsense_batching_options_stop_the_server_with_a_reason(flag, value):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "manipulation_policy.policy_server", flag, value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # Refused by the parser in one line naming the option, as every bad server option.
    assert result.returncode == 2
    assert flag in result.stderr and len(result.stderr.strip().splitlines()) == 1
