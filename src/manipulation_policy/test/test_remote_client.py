"""RemoteClient against real HTTP servers on loopback: retries, failures, circuit breaker."""

from __future__ import annotations

import threading
import time

import pytest
from remote_harness import ScriptedPolicyServer, assert_actions_close, sample_image, wait_until

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.contract import observation_to_request
from manipulation_policy.core.imaging import decode_base64_image
from manipulation_policy.core.policy_types import JointStateData, Observation
from manipulation_policy.robot.remote_client import (
    BreakerState,
    CircuitBreaker,
    RemoteClient,
    RemoteSettings,
)
from manipulation_policy.server.process import ServerProcess, free_port

OBSERVATION = Observation(
    joint_state=JointStateData(name=("a", "b"), position=(0.2, -0.4)),
    image=sample_image(32, 24),
    instruction="pick up the block",
)
BODY = observation_to_request(OBSERVATION)


@pytest.fixture
def server():
    with ScriptedPolicyServer() as server:
        yield server


def client_for(url: str, **settings) -> RemoteClient:
    options = {"timeout_sec": 1.0, "retry_attempts": 2, "backoff_initial_sec": 0.01, **settings}
    return RemoteClient(RemoteSettings(url=url, **options))


def expected_action():
    # What the server decodes: the JPEG of the request, not the raw frame.
    image = decode_base64_image(BODY["image"], "jpeg")
    return StubBackend().predict(
        Observation(OBSERVATION.joint_state, image, instruction=OBSERVATION.instruction)
    )


def test_success_against_the_real_policy_server_process():
    with ServerProcess("--backend", "stub") as process:
        client = client_for(process.base_url)
        result = client.infer(BODY)
        client.close()
    assert result.ok and result.failure is None and result.attempts == 1
    assert_actions_close(result.action, expected_action(), tol=1e-12)


def test_the_session_is_kept_alive(server):
    client = client_for(server.url)
    assert client.infer(BODY).ok and client.infer(BODY).ok
    ports = {request["client_port"] for request in server.requests}
    assert len(server.requests) == 2 and len(ports) == 1  # one TCP connection for both
    client.close()


def _concurrently(*calls):
    """Run each call on its own thread at once; their results, in order."""
    results = [None] * len(calls)

    def run(index, call):
        results[index] = call()

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15.0)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _body(position: float, request_id: str) -> dict:
    observation = Observation(
        joint_state=JointStateData(name=("a", "b"), position=(position, -position)),
        image=sample_image(32, 24),
    )
    return {**observation_to_request(observation), "request_id": request_id}


def test_concurrent_calls_go_out_on_their_own_connections_and_get_their_own_answers(server):
    # Each request waits in the server until the other has come: both are out at once.
    server.barrier = threading.Barrier(2, timeout=10.0)
    server.echo_request_id = True
    client = client_for(server.url, max_in_flight=2, retry_attempts=0, timeout_sec=15.0)
    try:
        results = _concurrently(lambda: client.infer(_body(0.2, "call-a")),
                                lambda: client.infer(_body(0.4, "call-b")))
        assert [r.failure for r in results] == [None, None]
        assert [r.request_id for r in results] == ["call-a", "call-b"]
        # Each answer is its own observation's (the stub's joint deltas: -10 %).
        assert results[0].action.joint_deltas == pytest.approx((-0.02, 0.02))
        assert results[1].action.joint_deltas == pytest.approx((-0.04, 0.04))
        by_id = {r["request_id"]: r["client_port"] for r in server.requests}
        assert set(by_id) == {"call-a", "call-b"} and len(set(by_id.values())) == 2
        assert client.posters.size() == 2  # both kept alive for the next calls
        server.barrier = None
        results = _concurrently(lambda: client.infer(_body(0.2, "call-c")),
                                lambda: client.infer(_body(0.4, "call-d")))
        assert all(r.ok for r in results)
        ports = {r["client_port"] for r in server.requests}
        assert ports == set(by_id.values())  # idle connections were used again
    finally:
        client.close()


def test_a_call_beyond_the_in_flight_limit_gets_a_connection_not_kept(server):
    server.barrier = threading.Barrier(2, timeout=10.0)
    server.echo_request_id = True
    client = client_for(server.url, retry_attempts=0, timeout_sec=15.0)  # max_in_flight 1
    try:
        results = _concurrently(lambda: client.infer(_body(0.2, "call-a")),
                                lambda: client.infer(_body(0.4, "call-b")))
        assert [r.request_id for r in results if r.ok] == ["call-a", "call-b"]
        assert client.posters.size() == 1
        client.update(max_in_flight=3)
        client.update(max_in_flight=1)
        assert client.posters.size() == 1
    finally:
        client.close()


def test_close_ends_every_call_in_progress(server):
    server.delay_sec = 10.0
    client = client_for(server.url, max_in_flight=2, retry_attempts=0, timeout_sec=15.0)
    results: list = []
    threads = [threading.Thread(target=lambda i=i: results.append(client.infer(_body(0.1, i))))
               for i in ("call-a", "call-b")]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: server.request_count() == 2, timeout=10.0)
    client.close()
    for thread in threads:
        thread.join(5.0)  # far less than the server's 10 s delay
    assert not any(thread.is_alive() for thread in threads)
    assert len(results) == 2 and not any(r.ok for r in results)


def test_server_errors_are_retried_a_bounded_number_of_times(server):
    server.fail_status = 503
    result = client_for(server.url, retry_attempts=2).infer(BODY)
    assert not result.ok
    assert server.request_count() == 3 and result.attempts == 3
    assert "503" in result.failure and "after 3 attempts" in result.failure


def test_a_refused_request_is_not_retried_and_names_the_field(server):
    bad = {**BODY, "joint_states": {"name": ["a", "b"], "position": [0.1]}}
    result = client_for(server.url, retry_attempts=3).infer(bad)
    assert not result.ok and server.request_count() == 1
    assert "422" in result.failure and "joint_states" in result.failure


def test_unauthorized_points_at_the_api_key(server):
    server.fail_status = 401
    result = client_for(server.url).infer(BODY)
    assert server.request_count() == 1 and "remote_api_key" in result.failure


def test_an_invalid_answer_is_a_failure_naming_the_field(server):
    server.raw_answer = (200, b'{"confidence": "very"}')
    result = client_for(server.url).infer(BODY)
    assert not result.ok and server.request_count() == 1
    assert "invalid response" in result.failure and "confidence" in result.failure
    server.raw_answer = (200, b"not json")
    assert "invalid response" in client_for(server.url).infer(BODY).failure


def test_timeouts_are_retried_then_reported(server):
    server.delay_sec = 0.5
    started = time.monotonic()
    result = client_for(server.url, timeout_sec=0.1, retry_attempts=1).infer(BODY)
    elapsed = time.monotonic() - started
    assert not result.ok and result.attempts == 2 and "timed out after 0.1 s" in result.failure
    assert elapsed < 0.5 * 2  # never waited for the slow answers


def test_nobody_listening_is_reported():
    url = f"http://127.0.0.1:{free_port()}"
    result = client_for(url, retry_attempts=1).infer(BODY)
    assert not result.ok and "cannot reach" in result.failure and result.attempts == 2


def test_api_key_is_sent_as_a_bearer_token(server):
    client_for(server.url, api_key="s3cret").infer(BODY)
    client_for(server.url).infer(BODY)
    assert server.requests[0]["headers"]["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in server.requests[1]["headers"]


def test_circuit_opens_backs_off_and_recovers_by_itself(server):
    server.fail_status = 503
    breaker = CircuitBreaker(failure_threshold=2, cooldown_sec=0.2, max_cooldown_sec=0.4)
    client = RemoteClient(
        RemoteSettings(url=server.url, retry_attempts=1, backoff_initial_sec=0.01), breaker
    )
    assert not client.infer(BODY).ok and breaker.state is BreakerState.CLOSED
    assert not client.infer(BODY).ok and breaker.state is BreakerState.OPEN
    assert server.request_count() == 4

    refused = client.infer(BODY)  # open: fails at once without touching the network
    assert "circuit open" in refused.failure and server.request_count() == 4

    assert wait_until(lambda: breaker.seconds_until_probe() == 0.0, 2.0)
    probe = client.infer(BODY)  # half-open: a single attempt, still failing
    assert not probe.ok and server.request_count() == 5 and breaker.state is BreakerState.OPEN
    assert breaker.seconds_until_probe() > 0.2  # the cooldown doubled

    server.fail_status = None  # the server is back
    assert wait_until(lambda: breaker.seconds_until_probe() == 0.0, 2.0)
    recovered = client.infer(BODY)
    assert recovered.ok and breaker.state is BreakerState.CLOSED
    assert client.infer(BODY).ok
    client.close()


def test_a_new_url_resets_the_breaker(server):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_sec=60.0)
    client = RemoteClient(RemoteSettings(url=f"http://127.0.0.1:{free_port()}",
                                         retry_attempts=0), breaker)
    assert not client.infer(BODY).ok and breaker.state is BreakerState.OPEN
    client.update(url=server.url)
    assert client.infer(BODY).ok


def test_close_ends_a_pending_backoff_at_once(server):
    server.fail_status = 503
    client = client_for(server.url, retry_attempts=5, backoff_initial_sec=5.0)
    results = []
    worker = threading.Thread(target=lambda: results.append(client.infer(BODY)))
    worker.start()
    assert wait_until(lambda: server.request_count() == 1, 5.0)
    client.close()
    worker.join(2.0)
    assert not worker.is_alive() and results[0].failure == "client closed"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_state_machine():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_sec=1.0, max_cooldown_sec=3.0,
                             clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.try_acquire() is BreakerState.CLOSED
    breaker.record_success()  # a success clears the count
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.try_acquire() is None
    assert breaker.seconds_until_probe() == pytest.approx(1.0)

    cooldowns = []
    for _ in range(4):  # each failed probe doubles the cooldown, up to the cap
        clock.now += 10.0
        assert breaker.try_acquire() is BreakerState.HALF_OPEN
        assert breaker.try_acquire() is None  # one probe at a time
        breaker.record_failure()
        cooldowns.append(breaker.seconds_until_probe())
    assert cooldowns == [2.0, 3.0, 3.0, 3.0]

    clock.now += 10.0
    assert breaker.try_acquire() is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    for _ in range(3):
        breaker.record_failure()
    assert breaker.seconds_until_probe() == pytest.approx(1.0)  # cooldown back to the start


def test_settings_bound_the_attempts_and_backoff():
    settings = RemoteSettings(url="http://h:1/", retry_attempts=3, backoff_initial_sec=0.1,
                              backoff_max_sec=0.3)
    assert settings.infer_url == "http://h:1/infer"
    assert settings.max_attempts == 4
    assert [settings.backoff_before(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.3]
