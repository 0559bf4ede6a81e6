"""The server's pure parts, without a process: strict JSON, metrics text, the inference
worker's queue, auth helpers, CLI option handling, backend plugin specs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from manipulation_policy.backends import UnknownBackendError, create_backend
from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.api_key import API_KEY_ENV, ApiKeyUnusable
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.json_body import parse_json_body
from manipulation_policy.core.policy_types import Observation, PolicyAction
from manipulation_policy.policy_server import (
    StartupError,
    backend_arguments,
    build_config,
    build_parser,
)
from manipulation_policy.server.app import ServerConfig
from manipulation_policy.server.auth import bearer_token_matches, load_api_key
from manipulation_policy.server.errors import ApiError
from manipulation_policy.server.http_body import check_json_content_type
from manipulation_policy.server.inference_worker import (
    ClientGoneError,
    InferenceWorker,
    QueueFullError,
)
from manipulation_policy.server.metrics import ServerMetrics
from manipulation_policy.server.reports import gpu_memory_report

# ------------------------------------------------------------------ strict JSON


def test_plain_json_parses_as_usual():
    assert parse_json_body(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"a": {"b": [0, 1, NaN]}}', "a.b[2]"),
        (b'{"first": Infinity, "second": NaN}', "first"),
        (b'[{"x": 1}, {"y": -Infinity}]', "[1].y"),
        (b'{"big": -1E+400}', "big"),
        (b"Infinity", "body"),
    ],
)
def test_non_finite_numbers_name_their_field(raw, field):
    with pytest.raises(InputError) as caught:
        parse_json_body(raw)
    assert caught.value.field == field


@pytest.mark.parametrize("raw", [b"", b"   ", b"{", b"{'a': 1}", b"\x80\x81", b"[" * 5000])
def test_broken_json_names_the_body(raw):
    with pytest.raises(InputError) as caught:
        parse_json_body(raw)
    assert caught.value.field == "body"


def test_json_content_types():
    for accepted in ("application/json", "Application/JSON; charset=UTF-8",
                     "application/problem+json"):  # fmt: skip
        check_json_content_type(accepted)
    for refused in (None, "", " ", "text/plain", "text/json", "application/x-www-form-urlencoded"):
        with pytest.raises(ApiError) as caught:
            check_json_content_type(refused)
        assert caught.value.status == 415 and caught.value.field == "content-type"


# --------------------------------------------------------------------- metrics


def parse_families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_metrics_text_is_valid_prometheus_exposition():
    labels = {"version": "1.2", "backend": "stub", "model": 'a"b'}
    metrics = ServerMetrics(queue_depth=lambda: 3, inference_busy=lambda: 1, info_labels=labels)
    metrics.observe_request("/infer", "POST", 200, 0.004)
    metrics.observe_request("/infer", "POST", 200, 0.2)
    metrics.observe_request("/infer", "POST", 422, 0.001)
    metrics.inference_seconds.observe(0.003)
    metrics.count_error("invalid_image")
    families = parse_families(metrics.render())

    requests_total = families["policy_server_requests"]
    assert requests_total.type == "counter"
    values = {
        s.labels["status"]: s.value for s in requests_total.samples if s.name.endswith("_total")
    }
    assert values == {"200": 2.0, "422": 1.0}

    latency = families["policy_server_request_duration_seconds"]
    assert latency.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert buckets["0.0025"] == 1 and buckets["0.005"] == 2 and buckets["0.25"] == 3
    assert buckets["+Inf"] == 3
    count = [s.value for s in latency.samples if s.name.endswith("_count")]
    assert count == [3]

    assert families["policy_server_queue_depth"].samples[0].value == 3
    assert families["policy_server_inference_in_progress"].samples[0].value == 1
    assert families["policy_server_info"].samples[0].labels["model"] == 'a"b'
    # Unlabelled histograms exist (all zero) before the first observation.
    preprocess = families["policy_server_preprocess_duration_seconds"]
    assert [s.value for s in preprocess.samples if s.name.endswith("_count")] == [0]
    assert metrics.errors_by_kind() == {"invalid_image": 1}
    assert metrics.requests_total() == 3


def test_each_app_counts_in_its_own_registry():
    first, second = ServerMetrics(), ServerMetrics()
    first.count_error("invalid_image")
    assert first.errors_by_kind() == {"invalid_image": 1}
    assert second.errors_by_kind() == {}
    assert "invalid_image" not in second.render()


# ------------------------------------------------------------ inference worker


def test_admission_allows_one_running_plus_max_queue():
    worker = InferenceWorker(lambda observation: PolicyAction(), max_queue=2)
    with worker.admission(), worker.admission(), worker.admission():
        assert worker.queue_depth == 3
        with pytest.raises(QueueFullError):
            with worker.admission():
                pass
    assert worker.queue_depth == 0
    with worker.admission():  # room again
        pass
    worker.close()


def test_predictions_run_one_at_a_time_off_the_event_loop():
    active, peak, threads = [0], [0], set()
    lock = threading.Lock()

    def predict(observation: Observation) -> PolicyAction:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threads.add(threading.current_thread().name)
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return PolicyAction(confidence=0.5)

    worker = InferenceWorker(predict, max_queue=8)

    async def many():
        loop_thread = threading.current_thread().name
        results = await asyncio.gather(*(worker.predict(Observation()) for _ in range(6)))
        return loop_thread, results

    loop_thread, results = asyncio.run(many())
    worker.close()
    assert peak[0] == 1
    assert loop_thread not in threads and len(threads) == 1
    assert all(action.confidence == 0.5 and seconds >= 0.02 for action, seconds in results)


def test_only_small_lone_bodies_and_small_declared_images_are_decoded_on_the_loop():
    from manipulation_policy.core.contract import InferRequest
    from manipulation_policy.server.request_decoding import decode_inline, parse_inline

    assert parse_inline(16 * 1024, queue_depth=1)
    assert not parse_inline(16 * 1024, queue_depth=2)  # others admitted: the pool
    assert not parse_inline(8 * 1024 * 1024, queue_depth=1)
    assert decode_inline(InferRequest())  # no image
    assert decode_inline(InferRequest(image="x", image_width=224, image_height=224))
    # A small body may hold a huge one-colour JPEG: undeclared or large sizes go to the pool.
    assert not decode_inline(InferRequest(image="x"))
    assert not decode_inline(InferRequest(image="x", image_width=4096, image_height=4096))


def test_several_cameras_are_decoded_on_the_loop_only_when_small_together():
    from manipulation_policy.core.contract import InferRequest, NamedImageModel
    from manipulation_policy.server.request_decoding import decode_inline

    def cam(width=None, height=None):
        return NamedImageModel(image="x", image_width=width, image_height=height)

    assert decode_inline(InferRequest(images={}))
    assert decode_inline(InferRequest(images={"a": cam(320, 240), "b": cam(320, 240)}))
    assert not decode_inline(InferRequest(images={"a": cam(320, 240), "b": cam()}))
    # Each camera alone is small, together they are not.
    assert not decode_inline(InferRequest(images={"a": cam(640, 480), "b": cam(64, 48)}))
    assert not decode_inline(
        InferRequest(image="x", image_width=640, image_height=480, images={"a": cam(8, 8)})
    )


def test_a_request_whose_client_left_is_skipped():
    calls = []
    worker = InferenceWorker(lambda observation: calls.append(1) or PolicyAction(), max_queue=1)

    async def gone() -> bool:
        return True

    with pytest.raises(ClientGoneError):
        asyncio.run(worker.predict(Observation(), client_gone=gone))
    worker.close()
    assert calls == []


def test_negative_queue_is_refused():
    with pytest.raises(ValueError):
        InferenceWorker(lambda observation: PolicyAction(), max_queue=-1)
    with pytest.raises(ValueError):
        ServerConfig(max_body_bytes=0)


# ------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    "header, expected",
    [
        ("Bearer k3y", True),
        ("bearer k3y", True),
        ("Bearer  k3y ", True),
        ("Bearer k3", False),
        ("Bearer k3yy", False),
        ("Basic k3y", False),
        ("k3y", False),
        ("", False),
        (None, False),
        ("Bearer k3ÿ", False),
    ],
)
def test_bearer_token_matching(header, expected):
    assert bearer_token_matches(header, "k3y") is expected


def test_api_key_file_wins_over_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  from-file\n")
    assert load_api_key(str(key_file), {API_KEY_ENV: "from-env"}) == "from-file"
    assert load_api_key(None, {API_KEY_ENV: " from-env "}) == "from-env"
    assert load_api_key(None, {API_KEY_ENV: ""}) is None
    assert load_api_key(None, {}) is None
    with pytest.raises(ApiKeyUnusable, match="cannot read"):
        load_api_key(str(tmp_path / "missing"), {})
    with pytest.raises(ApiKeyUnusable, match="ASCII"):
        load_api_key(None, {API_KEY_ENV: "clé"})


# ------------------------------------------------------------------ CLI options


def options_for(argv: list[str], environ: dict) -> dict:
    return backend_arguments(build_parser().parse_args(argv), environ)


def test_only_set_model_options_reach_the_backend():
    assert options_for(["--backend", "openvla"], {}) == {}
    argv = ["--backend", "openvla", "--model", "/models/ft", "--quantization", "none",
            "--unnorm-key", "", "--position-scale", "0.5",
            "--skip-image-sensitivity-check"]  # fmt: skip
    assert options_for(argv, {}) == {
        "model": "/models/ft",
        "position_scale": 0.5,
        "check_image_sensitivity": False,
    }


def test_openvla_options_fall_back_to_the_environment():
    environ = {"OPENVLA_MODEL_ID": "openvla/openvla-7b", "OPENVLA_UNNORM_KEY": "bridge_orig",
               "OPENVLA_ATTENTION_IMPL": "sdpa", "OPENVLA_XYZ_SCALING": "2",
               "OPENVLA_QUANTIZATION": "None"}  # fmt: skip
    assert options_for(["--backend", "openvla", "--unnorm-key", "fractal"], environ) == {
        "model": "openvla/openvla-7b",
        "unnorm_key": "fractal",  # the flag wins
        "attn_implementation": "sdpa",
        "position_scale": 2.0,
    }
    # The OPENVLA_* environment is for the openvla backend only.
    assert options_for(["--backend", "stub"], environ) == {}
    with pytest.raises(StartupError, match="OPENVLA_ROTATION_SCALE"):
        options_for(["--backend", "openvla"], {"OPENVLA_ROTATION_SCALE": "fast"})


def test_bad_serving_settings_are_startup_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-queue", "-1"])
    assert "--max-queue" in capsys.readouterr().err
    with pytest.raises(StartupError, match="API key"):
        build_config(build_parser().parse_args([]), {API_KEY_ENV: "two words"})
    config = build_config(build_parser().parse_args(["--max-queue", "0"]), {API_KEY_ENV: "k"})
    assert config.max_queue == 0 and config.api_key == "k"


# -------------------------------------------------------------- backend specs


def test_backend_plugin_spec_loads_any_importable_class():
    backend = create_backend("manipulation_policy.backends.stub:StubBackend")
    assert isinstance(backend, StubBackend)
    with pytest.raises(UnknownBackendError, match="not found"):
        create_backend("manipulation_policy.no_such_module:Backend")
    with pytest.raises(UnknownBackendError, match="no class"):
        create_backend("manipulation_policy.backends.stub:NoSuchBackend")
    with pytest.raises(UnknownBackendError, match="no class"):
        create_backend("manipulation_policy.backends.stub:MAX_STEP_M")  # not a class


# ------------------------------------------------------------------ /info GPU


def test_gpu_report_does_not_import_torch_for_a_stub_server():
    code = (
        "import sys\n"
        "from manipulation_policy.backends import create_backend\n"
        "from manipulation_policy.server.app import create_app\n"
        "from manipulation_policy.server.reports import gpu_memory_report\n"
        "create_app(create_backend('stub'))\n"
        "assert gpu_memory_report() is None\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_gpu_report_with_torch_loaded():
    torch = pytest.importorskip("torch")
    report = gpu_memory_report()
    if not torch.cuda.is_available():
        assert report is None
        return
    torch.zeros(1024, device="cuda")
    report = gpu_memory_report()
    assert report["total_bytes"] >= report["free_bytes"] > 0
    assert report["allocated_bytes"] > 0 and report["device"]
