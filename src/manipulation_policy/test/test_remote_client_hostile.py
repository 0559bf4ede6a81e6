"""RemoteClient against broken, slow and hostile servers (real sockets on loopback).

Each attack must end as a bounded, clear failure: within the deadline, with
bounded memory, without an exception escaping infer().
"""

from __future__ import annotations

import socket
import time
import tracemalloc

import pytest
from hostile_servers import (
    RawPolicyServer,
    answering,
    good_answer,
    gzip_bytes,
    http_answer,
    send_json,
    trickling,
)
from remote_harness import wait_until

from manipulation_policy.robot.remote_client import (
    BreakerState,
    CircuitBreaker,
    RemoteClient,
    RemoteSettings,
    parse_retry_after,
)

BODY = {
    "reference_frame": "base_link",
    "joint_states": {"name": ["a", "b", "c"], "position": [0.1, 0.2, 0.3]},
}
MIB = 1024 * 1024


_clients: list[RemoteClient] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _clients:
        _clients.pop().close()


def client_for(url: str, **settings) -> RemoteClient:
    options = {"timeout_sec": 0.5, "retry_attempts": 0, "backoff_initial_sec": 0.01, **settings}
    breaker = CircuitBreaker(failure_threshold=100)  # these tests look at single calls
    client = RemoteClient(RemoteSettings(url=url, **options), breaker)
    _clients.append(client)
    return client


def infer_with_peak_memory(client: RemoteClient):
    """The result, and the most memory Python held while it was made (bytes)."""
    tracemalloc.start()
    try:
        result = client.infer(BODY)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def timed_infer(client: RemoteClient):
    started = time.monotonic()
    result = client.infer(BODY)
    return result, time.monotonic() - started


def test_a_good_answer_from_a_raw_server_is_taken():
    with RawPolicyServer(answering(lambda r: good_answer(r.joint_count()))) as server:
        result = client_for(server.url).infer(BODY)
    assert result.ok, result.failure
    assert result.action.joint_deltas == (0.01, 0.01, 0.01)


def test_a_trickled_answer_ends_at_the_deadline_of_each_attempt():
    # One byte every 20 ms: requests' per-read timeout never fires on it.
    with RawPolicyServer(trickling(0.02)) as server:
        client = client_for(server.url, timeout_sec=0.3, retry_attempts=1)
        result, elapsed = timed_infer(client)
        assert server.request_count() == 2
    assert not result.ok and "timed out after 0.3 s" in result.failure
    bound = client.settings.worst_case_sec
    assert bound == pytest.approx(0.3 * 2 + 0.01)
    assert elapsed < bound + 0.25, elapsed


def test_trickled_headers_end_at_the_deadline_too():
    def behave(request, sock):
        for _ in range(200):
            sock.sendall(b"X-Slow: y\r\n" if _ else b"HTTP/1.1 200 OK\r\n")
            time.sleep(0.02)

    with RawPolicyServer(behave) as server:
        result, elapsed = timed_infer(client_for(server.url, timeout_sec=0.3))
    assert not result.ok and "timed out" in result.failure and elapsed < 0.6


def test_a_redirect_is_not_followed():
    def behave(request, sock):
        time.sleep(0.1)
        sock.sendall(http_answer(307, b"", Location=f"http://127.0.0.1:{server.port}/infer"))

    with RawPolicyServer(behave) as server:
        result, elapsed = timed_infer(client_for(server.url, retry_attempts=2))
        count = server.request_count()
    assert count == 1  # refused, not retried, not followed
    assert not result.ok and "redirect" in result.failure and "307" in result.failure
    assert elapsed < 0.5


def test_a_gzip_bomb_is_refused_with_bounded_memory():
    bomb = gzip_bytes(64 * MIB)  # ~64 KiB on the wire, 64 MiB inflated
    assert len(bomb) < 256 * 1024

    def behave(request, sock):
        sock.sendall(http_answer(200, bomb, Content_Encoding="gzip"))

    with RawPolicyServer(behave) as server:
        result, peak = infer_with_peak_memory(client_for(server.url, timeout_sec=5.0))
    assert not result.ok and "decompresses to over the 262144-byte limit" in result.failure
    assert peak < 4 * MIB, peak


def test_a_gzipped_good_answer_is_taken():
    import gzip
    import json

    def behave(request, sock):
        data = gzip.compress(json.dumps(good_answer(request.joint_count())).encode())
        sock.sendall(http_answer(200, data, Content_Encoding="gzip"))

    with RawPolicyServer(behave) as server:
        result = client_for(server.url).infer(BODY)
    assert result.ok, result.failure


def test_an_unknown_content_encoding_is_refused():
    def behave(request, sock):
        sock.sendall(http_answer(200, b"\x00" * 10, Content_Encoding="br"))

    with RawPolicyServer(behave) as server:
        result = client_for(server.url).infer(BODY)
    assert not result.ok and "unsupported Content-Encoding 'br'" in result.failure


def test_a_huge_declared_answer_is_refused_before_reading_it():
    def behave(request, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (100 * MIB))
        sock.sendall(b" " * MIB)

    with RawPolicyServer(behave) as server:
        result, elapsed = timed_infer(client_for(server.url))
    assert not result.ok and f"answer of {100 * MIB} bytes is over" in result.failure


def test_an_endless_answer_without_length_is_cut_at_the_limit():
    def behave(request, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(100):
            sock.sendall(b"[" * MIB)

    with RawPolicyServer(behave) as server:
        client = client_for(server.url, timeout_sec=5.0, max_response_bytes=64 * 1024)
        result, peak = infer_with_peak_memory(client)
    assert not result.ok and "over the 65536-byte limit" in result.failure
    assert peak < 2 * MIB, peak


def test_a_deeply_nested_answer_is_a_clear_failure():
    def behave(request, sock):
        sock.sendall(http_answer(200, b"[" * 100_000 + b"]" * 100_000))

    with RawPolicyServer(behave) as server:
        client = client_for(server.url)
        result = client.infer(BODY)
    assert not result.ok and "nested too deeply" in result.failure


def test_failures_from_bad_answers_open_the_breaker():
    with RawPolicyServer(answering(lambda r: {"confidence": 5.0})) as server:
        breaker = CircuitBreaker(failure_threshold=2, cooldown_sec=60.0)
        client = RemoteClient(RemoteSettings(server.url, timeout_sec=0.5, retry_attempts=3),
                              breaker)
        _clients.append(client)
        for _ in range(2):
            assert "confidence" in client.infer(BODY).failure
        assert breaker.state is BreakerState.OPEN
        assert "circuit open" in client.infer(BODY).failure
        assert server.request_count() == 2  # a bad answer is not retried, and then no more


def test_retry_after_keeps_the_client_quiet_for_that_long():
    def behave(request, sock):
        send_json(sock, {"error": "queue_full", "detail": "busy"}, 503, Retry_After="1")

    with RawPolicyServer(behave) as server:
        client = client_for(server.url, retry_attempts=3)
        first = client.infer(BODY)
        assert server.request_count() == 1  # no retries inside the 1 s asked for
        assert "Retry-After" in first.failure and "wait 1 s" in first.failure
        refused = client.infer(BODY)
        assert "circuit open" in refused.failure and server.request_count() == 1
        assert client.breaker.seconds_until_probe() > 0.8
        assert wait_until(lambda: client.breaker.seconds_until_probe() == 0.0, 2.0)
        client.infer(BODY)
        times = server.request_times()
    assert len(times) == 2 and times[1] - times[0] >= 0.95


def test_retry_after_is_bounded_by_the_parameter():
    def behave(request, sock):
        send_json(sock, {"detail": "later"}, 429, Retry_After="86400")

    with RawPolicyServer(behave) as server:
        client = client_for(server.url, retry_after_max_sec=0.3)
        client.infer(BODY)
        assert 0.0 < client.breaker.seconds_until_probe() <= 0.3
        assert wait_until(lambda: client.breaker.seconds_until_probe() == 0.0, 1.0)


def test_a_short_retry_after_is_an_ordinary_retry():
    answers = iter([503, 200])

    def behave(request, sock):
        if next(answers) == 503:
            send_json(sock, {"detail": "busy"}, 503, Retry_After="0")
        else:
            send_json(sock, good_answer(request.joint_count()))

    with RawPolicyServer(behave) as server:
        result = client_for(server.url, retry_attempts=1).infer(BODY)
    assert result.ok and result.attempts == 2


def test_parse_retry_after():
    assert parse_retry_after(None, 10.0) is None
    assert parse_retry_after("5", 10.0) == 5.0
    assert parse_retry_after("99999999999999999999", 10.0) == 10.0
    assert parse_retry_after("soon", 10.0) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 10.0) == 0.0  # in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))
    assert 3.0 <= parse_retry_after(future, 10.0) <= 5.0


def test_infer_never_raises():
    with RawPolicyServer(answering(lambda r: good_answer(3))) as server:
        result = client_for(server.url).infer({"not json": object()})
    assert not result.ok and result.failure.startswith("client error: TypeError")


def test_server_text_in_failures_is_safe_to_log():
    def behave(request, sock):
        send_json(sock, {"detail": "bad \ud800 thing \x00 here"}, 400)

    with RawPolicyServer(behave) as server:
        result = client_for(server.url).infer(BODY)
    result.failure.encode("utf-8")  # no lone surrogate left: ROS logging would raise
    assert "\x00" not in result.failure  # no control character reaches the log
    assert "bad" in result.failure and "here" in result.failure


def test_the_kept_alive_connection_is_reused_and_renewed_when_dropped():
    def behave(request, sock):
        send_json(sock, good_answer(request.joint_count()))
        if server.request_count() == 2:
            sock.shutdown(socket.SHUT_RDWR)  # the server drops the idle connection

    with RawPolicyServer(behave) as server:
        client = client_for(server.url)
        results = [client.infer(BODY) for _ in range(4)]
        assert all(result.ok for result in results), [r.failure for r in results]
        assert [r.attempts for r in results] == [1, 1, 1, 1]
        ports = [request.client_port for request in server.requests]
    # The third request goes out on a second connection, kept from then on. If it
    # reached the first connection in the instant before the server's shutdown (the
    # bytes were in the server's buffer), the server read it there but could not
    # answer, and the client sent it once more, fresh: five requests seen, not four.
    first, second = dict.fromkeys(ports)
    assert ports in ([first] * 2 + [second] * 2, [first] * 3 + [second] * 2), ports


def test_a_request_met_by_a_closing_kept_alive_connection_is_sent_again_on_a_fresh_one():
    # The race a keep-alive client always has: the server closes its idle
    # connection just as the next request reaches it, and answers nothing.
    def behave(request, sock):
        if request.index_on_connection == 2:
            sock.shutdown(socket.SHUT_RDWR)
            return
        send_json(sock, good_answer(request.joint_count()))

    with RawPolicyServer(behave) as server:
        client = client_for(server.url)
        results = [client.infer(BODY) for _ in range(3)]
        assert all(result.ok for result in results), [r.failure for r in results]
        indexes = [request.index_on_connection for request in server.requests]
        ports = [request.client_port for request in server.requests]
    assert indexes == [1, 2, 1, 2, 1]  # each dropped request sent once more, fresh
    assert len(set(ports)) == 3


def test_a_fresh_connection_closed_without_an_answer_is_not_sent_again():
    def behave(request, sock):
        sock.shutdown(socket.SHUT_RDWR)

    with RawPolicyServer(behave) as server:
        result, elapsed = timed_infer(client_for(server.url))
        assert server.request_count() == 1
    assert not result.ok and "RemoteDisconnected" in result.failure
    assert elapsed < 0.5


# ------------------------------------------------------------------ request ids


def test_each_call_sends_its_own_request_id_and_its_retries_the_same():
    answers = iter([503, 200, 200])

    def behave(request, sock):
        if next(answers) == 503:
            send_json(sock, {"detail": "busy"}, 503)
        else:
            send_json(sock, good_answer(request.joint_count(),
                                        request_id=request.json()["request_id"]))

    with RawPolicyServer(behave) as server:
        client = client_for(server.url, retry_attempts=1)
        first, second = client.infer(BODY), client.infer(BODY)
        sent = [request.json()["request_id"] for request in server.requests]
    assert first.ok and second.ok and first.attempts == 2
    assert sent[0] == sent[1] == first.request_id  # one observation, one id
    assert sent[2] == second.request_id != first.request_id
    assert "request_id" not in BODY  # the caller's body is left as it was


def test_the_callers_request_id_is_sent():
    with RawPolicyServer(answering(lambda r: good_answer(3, request_id="mine-1"))) as server:
        result = client_for(server.url).infer({**BODY, "request_id": "mine-1"})
        assert server.requests[0].json()["request_id"] == "mine-1"
    assert result.ok and result.request_id == "mine-1"


def test_an_answer_naming_another_request_is_refused():
    answer = good_answer(3, request_id="someone-else")
    with RawPolicyServer(answering(lambda r: answer)) as server:
        result = client_for(server.url).infer(BODY)
    assert not result.ok
    assert f"answers request 'someone-else', not '{result.request_id}'" in result.failure


def test_a_stale_answer_queued_on_a_kept_alive_connection_is_refused_and_the_connection_dropped():
    # A broken server writes the previous request's answer again before the real one: the
    # client must not take it, nor read the next answer from that connection.
    def behave(request, sock):
        own = good_answer(request.joint_count(), request_id=request.json()["request_id"],
                          confidence=0.1 * server.request_count())
        if request.index_on_connection > 1:
            previous = server.requests[-2].json()["request_id"]
            send_json(sock, good_answer(request.joint_count(), request_id=previous))
        send_json(sock, own)

    with RawPolicyServer(behave) as server:
        client = client_for(server.url, retry_attempts=1)
        first, second = client.infer(BODY), client.infer(BODY)
        requests_seen = list(server.requests)
    assert first.ok and second.ok, second.failure
    assert second.attempts == 2  # the stale answer failed the first attempt
    assert second.action.confidence == pytest.approx(0.3)  # the third request's own answer
    assert [r.index_on_connection for r in requests_seen] == [1, 2, 1]
    assert requests_seen[2].client_port != requests_seen[1].client_port


@pytest.mark.parametrize("echo", [True, False], ids=["echoing-server", "upstream-like-server"])
def test_a_late_answer_after_a_timeout_is_never_taken_for_the_next_request(echo):
    # Request 2 times out on the kept-alive connection; its answer is written to that
    # connection while request 3 waits for its own (delayed) one. Were the connection
    # reused, request 3 would read request 2's answer. Whether or not the server echoes
    # request ids (upstream's does not), request 3 gets its own answer.
    late_written = []

    def behave(request, sock):
        number = server.request_count()
        fields = {"confidence": 0.1 * number}
        if echo:
            fields["request_id"] = request.json()["request_id"]
        if number == 2:
            time.sleep(0.6)  # past the client's 0.5 s deadline
            try:
                send_json(sock, good_answer(request.joint_count(), **fields))
                late_written.append(time.monotonic())
            except OSError:
                late_written.append(None)
            return
        if number == 3:
            time.sleep(0.3)  # still waiting when request 2's late answer is written
        send_json(sock, good_answer(request.joint_count(), **fields))

    with RawPolicyServer(behave) as server:
        client = client_for(server.url, timeout_sec=0.5)
        first, second = client.infer(BODY), client.infer(BODY)
        third = client.infer(BODY)
        fourth = client.infer(BODY)
        seen = list(server.requests)
    assert first.ok and not second.ok and "timed out" in second.failure
    assert third.ok and fourth.ok, (third.failure, fourth.failure)
    assert third.action.confidence == pytest.approx(0.3)
    assert fourth.action.confidence == pytest.approx(0.4)
    # The late answer went out (or found the socket closed) while request 3 waited.
    assert late_written
    if late_written[0] is not None:
        assert seen[2].received_at < late_written[0] < seen[2].received_at + 0.3
    # The connection that timed out was not used again.
    assert seen[1].client_port == seen[0].client_port
    assert seen[2].client_port != seen[1].client_port
