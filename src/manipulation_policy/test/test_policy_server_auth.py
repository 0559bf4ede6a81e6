"""Bearer-key auth of the real server: what is open, what needs the key, how keys are read."""

from __future__ import annotations

import pytest
import requests

from manipulation_policy import policy_server
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.server.process import running_server

KEY = "s3cret-key-for-tests"
MINIMAL = {"joint_states": {"name": [], "position": [], "velocity": [], "effort": []}}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("auth") / "api_key"
    key_file.write_text(KEY + "\n")  # a trailing newline, as editors leave it
    with running_server("--api-key-file", str(key_file), env={API_KEY_ENV: ""}) as base_url:
        yield base_url


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param(bearer("wrong"), id="wrong-key"),
        pytest.param(bearer(KEY[:-1]), id="key-prefix"),
        pytest.param(bearer(KEY + "x"), id="key-extended"),
        pytest.param({"Authorization": KEY}, id="no-scheme"),
        pytest.param({"Authorization": f"Basic {KEY}"}, id="basic-scheme"),
        pytest.param({"X-Api-Key": KEY}, id="other-header"),
    ],
)
def test_infer_without_the_right_key_is_401(url, headers):
    answer = requests.post(f"{url}/infer", json=MINIMAL, headers=headers, timeout=5)
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert answer.json()["field"] == "authorization"
    assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_infer_with_the_key_answers(url):
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {KEY}"}
        answer = requests.post(f"{url}/infer", json=MINIMAL, headers=headers, timeout=5)
        assert answer.status_code == 200, answer.text
        assert answer.json()["confidence"] == 0.5


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json"])
def test_health_and_docs_stay_open(url, path):
    assert requests.get(f"{url}{path}", timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/info", "/metrics", "/no-such-path"])
def test_info_metrics_and_unknown_paths_need_the_key(url, path):
    assert requests.get(f"{url}{path}", timeout=5).status_code == 401
    assert requests.get(f"{url}{path}", headers=bearer(KEY), timeout=5).status_code in (200, 404)


def test_rejections_are_counted_and_auth_is_reported(url):
    requests.get(f"{url}/info", timeout=5)
    info = requests.get(f"{url}/info", headers=bearer(KEY), timeout=5).json()
    assert info["auth_required"] is True
    assert info["errors_by_kind"]["unauthorized"] >= 1
    metrics = requests.get(f"{url}/metrics", headers=bearer(KEY), timeout=5).text
    assert 'policy_server_requests_total{endpoint="/info",method="GET",status="401"}' in metrics


def test_openapi_declares_the_bearer_scheme(url):
    document = requests.get(f"{url}/openapi.json", timeout=5).json()
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert document["paths"]["/infer"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in document["paths"]["/health"]["get"]


def test_key_from_the_environment():
    with running_server(env={API_KEY_ENV: "env-key"}) as base_url:
        assert requests.get(f"{base_url}/info", timeout=5).status_code == 401
        assert requests.get(f"{base_url}/info", headers=bearer("env-key"), timeout=5).ok


@pytest.mark.parametrize(
    "content, reason", [(None, "cannot read"), ("", "is empty"), ("two words", "without spaces")]
)
def test_unusable_key_file_stops_the_server_with_one_line(tmp_path, capsys, content, reason):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    assert policy_server.main(["--api-key-file", str(key_file), "--port", "9"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("policy_server: error: "), lines
    assert reason in lines[0]
