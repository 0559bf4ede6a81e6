"""The remote node's configure check (robot/server_check.py) against real servers on
loopback: the project's server (open and keyed), a server without /info, a dead port,
a server that never answers, and an unhealthy one."""

from __future__ import annotations

import time

import pytest
from hostile_servers import RawPolicyServer, send_json
from remote_harness import ScriptedPolicyServer

from manipulation_policy.core.policy_types import PolicyInputs
from manipulation_policy.robot.remote_client import RemoteSettings
from manipulation_policy.robot.server_check import (
    ServerCheckFailed,
    ServerInfo,
    check_server,
    check_server_info,
)
from manipulation_policy.server.process import ServerProcess, free_port

KEY = "k3y-for-the-check-0123456789abcdef"


@pytest.fixture(scope="module")
def stub_server():
    with ServerProcess("--backend", "stub") as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    with ServerProcess("--backend", "stub", "--api-key-file", str(key_file)) as server:
        yield server


def settings(url: str, **changes) -> RemoteSettings:
    return RemoteSettings(url=url, timeout_sec=changes.pop("timeout_sec", 2.0), **changes)


def test_the_projects_server_is_named_with_what_it_serves(stub_server):
    assert check_server(settings(stub_server.base_url)) == "stub (model stub, device cpu)"


def test_a_keyed_server_takes_the_right_key_and_refuses_none_or_a_wrong_one(keyed_server):
    assert check_server(settings(keyed_server.base_url, api_key=KEY)).startswith("stub")
    with pytest.raises(ServerCheckFailed, match=r"refuses us with 401 \(no key was sent"):
        check_server(settings(keyed_server.base_url))
    with pytest.raises(ServerCheckFailed, match=r"refuses us with 401 \(a key was sent") as err:
        check_server(settings(keyed_server.base_url, api_key="wrong-" + KEY))
    assert KEY not in str(err.value)


def test_a_server_without_info_is_taken():
    with ScriptedPolicyServer() as server:
        assert check_server(settings(server.url)) == "no /info"


def test_nothing_listening_is_unreachable_at_once():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerCheckFailed, match=r"unreachable \(/health\).*refused"):
        check_server(settings(url, timeout_sec=5.0))
    assert time.monotonic() - started < 4.0  # refused, not waited out


def test_a_server_that_never_answers_fails_by_the_deadline():
    def silent(request, sock):
        time.sleep(5.0)

    with RawPolicyServer(silent, answer_checks=False) as server:
        started = time.monotonic()
        with pytest.raises(ServerCheckFailed, match=r"did not answer /health within 0.3 s"):
            check_server(settings(server.url, timeout_sec=0.3))
        assert time.monotonic() - started < 3.0
        started = time.monotonic()
        with pytest.raises(ServerCheckFailed, match=r"did not answer /health within 3 s"):
            check_server(settings(server.url, timeout_sec=60.0))  # capped: MAX_CHECK_SEC
        assert time.monotonic() - started < 4.5


def test_an_unhealthy_server_is_refused_with_its_own_reason():
    def unhealthy(request, sock):
        send_json(sock, {"status": "unhealthy", "reason": "a prediction has been running "
                         "for 40.0 s"}, status=503)

    with RawPolicyServer(unhealthy, answer_checks=False) as server:
        with pytest.raises(ServerCheckFailed, match=r"is not ready: a prediction has been "
                                                    r"running for 40.0 s"):
            check_server(settings(server.url))


def test_a_server_text_with_control_characters_is_printable_in_the_reason():
    def odd(request, sock):
        send_json(sock, {"reason": "bad\x1b[31m\ud800 news"}, status=503)

    with RawPolicyServer(odd, answer_checks=False) as server:
        with pytest.raises(ServerCheckFailed) as err:
            check_server(settings(server.url))
    assert str(err.value).isprintable()


def info_server(info: dict) -> RawPolicyServer:
    def answer(request, sock):
        if request.path == "/info":
            send_json(sock, info)
        else:
            send_json(sock, {"status": "ok"})

    return RawPolicyServer(answer, answer_checks=False)


def test_what_info_says_the_policy_reads_is_handed_back():
    inputs = {"image_names": ["wrist", "front"], "state_length": 6, "action_length": 7}
    with info_server({"backend": "lerobot", "inputs": inputs}) as server:
        info = check_server_info(settings(server.url))
    assert info == ServerInfo("lerobot", PolicyInputs(("wrist", "front"), 6, 7))
    with info_server({"backend": "stub"}) as server:  # an /info without inputs
        assert check_server_info(settings(server.url)) == ServerInfo("stub")
    with ScriptedPolicyServer() as server:  # no /info at all
        assert check_server_info(settings(server.url)) == ServerInfo("no /info")


def test_unreadable_inputs_are_said_not_trusted():
    with info_server({"backend": "odd", "inputs": {"image_names": "wrist"}}) as server:
        info = check_server_info(settings(server.url))
    assert info.inputs is None
    assert info.inputs_unreadable == "inputs.image_names must be a list of text"
    assert info.served == "odd"
