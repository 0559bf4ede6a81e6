"""The real server stays available to well-behaved clients whatever slow, idle or
surplus connections do: deadlines on idle connections, headers and bodies, a bounded
number of bodies read at once, a connection cap, and answers to pipelined requests
before a 400 closes the connection (issue 21)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from waiting import wait_until

from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.server.connection_guard import (
    ConnectionGuard,
    ConnectionLimits,
    connection_cap,
)
from manipulation_policy.server.process import ServerProcess

TEST_DIR = str(Path(__file__).resolve().parent)
NO_KEY = {API_KEY_ENV: ""}
BODY = json.dumps({"joint_states": {"name": [], "position": []}}).encode()
# Past 256 KiB buffered, a body still arriving needs a reader place at once.
BIG_BODY = json.dumps({"instruction": "x" * 300_000}).encode()


def request_bytes(body: bytes = BODY, path: str = "/infer", extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def connect(server: ServerProcess) -> socket.socket:
    connection = socket.create_connection((server.host, server.port), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def read_until_closed(connection: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes; AssertionError if it does not."""
    connection.settimeout(timeout)
    received = b""
    try:
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return received
    except TimeoutError:
        raise AssertionError(f"the connection stayed open; got {received[:200]!r}") from None


def trickle(connection: socket.socket, data: bytes, interval: float) -> bytes:
    """Send ``data`` a byte per ``interval`` s until the server answers; then everything
    it sends until it closes."""
    connection.settimeout(interval)
    answer = b""
    for byte in data:
        try:
            connection.sendall(bytes([byte]))
            answer += connection.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if answer:
            break
    return answer + read_until_closed(connection)


def read_answer(connection: socket.socket, timeout: float = 10.0) -> bytes:
    """One answer: its head and its Content-Length body."""
    connection.settimeout(timeout)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def statuses(raw: bytes) -> list[int]:
    """The status codes of the answers in ``raw``, in order (a body ends without CRLF)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def closed_count(server: ServerProcess, reason: str) -> float:
    text = requests.get(f"{server.base_url}/metrics", timeout=5).text
    prefix = f'policy_server_connections_closed_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[1])
    return 0.0


def server(*args: str) -> ServerProcess:
    return ServerProcess(
        "--backend", "stub", "--no-access-log", *args, env=NO_KEY, extra_pythonpath=[TEST_DIR]
    )  # fmt: skip


@pytest.fixture(scope="module")
def quick():
    """Short deadlines, few reader places, no waiting line behind the model."""
    with server(
        "--body-timeout", "0.6", "--header-timeout", "0.6", "--idle-timeout", "0.8",
        "--max-body-readers", "2", "--max-queue", "0", "--max-connections", "40",
    ) as running:  # fmt: skip
        yield running


# ------------------------------------------------------------------- slow bodies


def test_a_body_past_its_deadline_is_408_and_closed(quick):
    with connect(quick) as slow:
        slow.sendall(request_bytes()[:-3])
        began = time.monotonic()
        answer = read_until_closed(slow)
    assert statuses(answer) == [408]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "body_timeout"
    assert 0.5 <= time.monotonic() - began < 5.0


def test_a_body_trickling_in_byte_by_byte_is_still_cut_at_its_deadline(quick):
    raw = request_bytes(b'{"instruction": "' + b"x" * 400 + b'"}')
    with connect(quick) as slow:
        head, body = raw.split(b"\r\n\r\n", 1)
        slow.sendall(head + b"\r\n\r\n")
        began = time.monotonic()
        answer = trickle(slow, body[:-1], 0.05)
        assert time.monotonic() - began < 5.0
    assert statuses(answer) == [408]


def bodies_reading(running: ServerProcess) -> float:
    text = requests.get(f"{running.base_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("policy_server_bodies_reading "):
            return float(line.split()[1])
    raise AssertionError("no policy_server_bodies_reading in /metrics")


@contextlib.contextmanager
def both_reader_places_taken(running: ServerProcess):
    """Two slow bodies past the grace size hold the fixture's two reader places."""
    wait_until(lambda: bodies_reading(running) == 0)  # no other test's slow body left
    slow = [connect(running) for _ in range(2)]
    try:
        for connection in slow:
            connection.sendall(request_bytes(BIG_BODY)[:-3])
        wait_until(lambda: bodies_reading(running) == 2)
        yield
    finally:
        for connection in slow:
            connection.close()


def test_a_body_still_arriving_holds_no_place_in_the_models_queue(quick):
    """--max-queue 0: one place in all. Two slow senders hold none of it."""
    with both_reader_places_taken(quick):
        answer = requests.post(f"{quick.base_url}/infer", data=BODY, timeout=10,
                               headers={"Content-Type": "application/json"})  # fmt: skip
        assert answer.status_code == 200, answer.text


def test_past_the_reader_places_a_body_still_arriving_is_503_at_once(quick):
    with both_reader_places_taken(quick):
        with connect(quick) as third:
            third.sendall(request_bytes(BIG_BODY)[:-3])
            began = time.monotonic()
            answer = read_answer(third)
            assert time.monotonic() - began < 0.5  # not the body deadline (0.6 s)
            # It closes at the idle deadline whatever the client sends meanwhile.
            third.sendall(b"xyz")
            assert read_until_closed(third) == b""
            assert time.monotonic() - began >= 0.7
        assert statuses(answer) == [503]
        assert b"\r\nretry-after: 1\r\n" in answer.lower()
        # A body that comes with its headers needs no reader place.
        whole = requests.post(f"{quick.base_url}/infer", data=BODY, timeout=10,
                              headers={"Content-Type": "application/json"})  # fmt: skip
        assert whole.status_code == 200


def test_a_body_below_the_minimum_rate_is_408_before_its_deadline():
    with server("--body-min-rate", "1000000", "--body-timeout", "30") as running:
        with connect(running) as slow:
            slow.sendall(request_bytes(BIG_BODY)[:-3])  # then nothing: far under 1 MB/s
            began = time.monotonic()
            answer = read_until_closed(slow)
    assert statuses(answer) == [408]
    assert b"body_too_slow" in answer
    assert 0.9 <= time.monotonic() - began < 10.0  # the first check, not the 30 s deadline


def test_expect_100_continue_gets_its_continue_then_its_answer(quick):
    wait_until(lambda: bodies_reading(quick) == 0)
    raw = request_bytes(extra="Expect: 100-continue\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    with connect(quick) as client:
        client.sendall(head + b"\r\n\r\n")
        client.settimeout(5)
        assert client.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        client.sendall(body)
        answer = client.recv(65536)
    assert statuses(answer) == [200]


def test_expect_100_continue_without_a_reader_place_is_503_before_the_body(quick):
    with both_reader_places_taken(quick):
        head = request_bytes(extra="Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)[0]
        with connect(quick) as client:
            client.sendall(head + b"\r\n\r\n")
            assert statuses(read_answer(client)) == [503]


def test_info_reports_the_connection_limits_and_what_they_did(quick):
    connections = requests.get(f"{quick.base_url}/info", timeout=5).json()["connections"]
    assert connections["max"] == 40 and connections["max_body_readers"] == 2
    assert connections["body_timeout_s"] == 0.6 and connections["open"] >= 1


# ------------------------------------------------------- headers and idle time


def test_headers_past_their_deadline_are_408_and_closed_even_trickling(quick):
    with connect(quick) as slow:
        began = time.monotonic()
        answer = trickle(slow, b"GET /health HTTP/1.1\r\nX-Padding: " + b"a" * 200, 0.1)
    assert statuses(answer) == [408]
    assert time.monotonic() - began < 5.0


def test_an_idle_connection_is_closed_after_its_deadline(quick):
    with connect(quick) as idle:
        began = time.monotonic()
        assert read_until_closed(idle) == b""
        assert 0.7 <= time.monotonic() - began < 5.0


def test_a_kept_alive_connection_is_closed_at_its_idle_deadline_even_fed_newlines(quick):
    with connect(quick) as client:
        client.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert statuses(read_answer(client)) == [200]
        began = time.monotonic()
        client.settimeout(0.2)
        while time.monotonic() - began < 5.0:
            try:
                client.sendall(b"\r\n")  # no request: does not count as activity
                if client.recv(65536) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        assert 0.7 <= time.monotonic() - began < 5.0


def test_headers_past_64_kib_are_431_and_closed(quick):
    with connect(quick) as client:
        client.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 70_000)
        answer = read_until_closed(client)
    assert statuses(answer) == [431]


# --------------------------------------------------------------- connection cap


def test_past_the_connection_cap_the_longest_idle_connections_make_room(quick):
    """40 connections at most: 100 idle ones cannot keep /health out."""
    evicted_before = closed_count(quick, "evicted")
    idle = []
    try:
        for _ in range(100):
            idle.append(connect(quick))
        answer = requests.get(f"{quick.base_url}/health", timeout=5)
        assert answer.status_code == 200
        # The oldest were closed for the newest: the first connection reads its close.
        assert read_until_closed(idle[0], timeout=0.5) == b""
        assert closed_count(quick, "evicted") - evicted_before >= 60
    finally:
        for connection in idle:
            connection.close()


# ------------------------------------------------------------------ pipelining


def test_a_request_followed_by_garbage_gets_its_answer_before_the_400(quick):
    with connect(quick) as client:
        client.sendall(request_bytes() + b"NOT HTTP AT ALL\x00\r\n\r\n")
        answer = read_until_closed(client)
    assert statuses(answer) == [200, 400]
    first = answer.split(b"HTTP/1.1 400", 1)[0]
    assert b'"actions"' in first


def test_two_pipelined_requests_then_garbage_get_two_answers_then_400(quick):
    with connect(quick) as client:
        client.sendall(
            b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + request_bytes() + b"\x01\x02garbage\r\n"
        )
        answer = read_until_closed(client)
    assert statuses(answer) == [200, 200, 400]


def test_a_pipelined_request_cut_short_gets_the_header_deadline_after_the_answer(quick):
    with connect(quick) as client:
        client.sendall(request_bytes() + b"GET /health HTTP/1.1\r\nHost: t")
        began = time.monotonic()
        answer = read_until_closed(client)
    assert statuses(answer) == [200, 408]
    assert 0.5 <= time.monotonic() - began < 5.0


def test_garbage_alone_is_still_400_at_once(quick):
    with connect(quick) as client:
        client.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert statuses(read_until_closed(client)) == [400]


# --------------------------------------------------------------------- flags


def run_server_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "manipulation_policy.policy_server", "--backend", "stub",
               "--port", "1", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=None)


@pytest.mark.parametrize(
    "args, words",
    [
        (("--body-timeout", "0"), "--body-timeout"),
        (("--header-timeout", "nan"), "--header-timeout"),
        (("--idle-timeout", "-1"), "--idle-timeout"),
        (("--max-body-readers", "0"), "--max-body-readers"),
        (("--body-min-rate", "-5"), "--body-min-rate"),
        (("--max-connections", "-3"), "--max-connections"),
    ],
)
def test_bad_connection_flags_are_refused_in_one_line(args, words):
    done = run_server_cli(*args)
    assert done.returncode == 2
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_connection_cap_above_the_open_file_limit_is_refused_at_start():
    done = run_server_cli("--max-connections", "100000000")
    assert done.returncode == 1
    assert "open-file limit" in done.stderr and "ulimit -n" in done.stderr


def test_a_connection_cap_at_or_below_the_reader_places_is_refused_at_start():
    done = run_server_cli("--max-connections", "10", "--max-body-readers", "10")
    assert done.returncode == 1
    assert "max_body_readers" in done.stderr


# ------------------------------------------------------------ the guard alone


def test_the_guard_closes_the_connection_waiting_longest_first():
    guard = ConnectionGuard(ConnectionLimits(max_body_readers=1, max_connections=3))
    assert [guard.opened(name) for name in "abc"] == [None, None, None]
    guard.headers_complete("a")  # a is being served: not a victim
    guard.answered("b")  # b just answered: the youngest waiting one
    assert guard.opened("d") == "c"
    assert guard.opened("e") == "b"
    assert guard.open_connections == 3
    assert guard.closed_by_reason["evicted"] == 2


def test_the_guard_refuses_a_new_connection_when_none_is_waiting():
    guard = ConnectionGuard(ConnectionLimits(max_body_readers=1, max_connections=2))
    for name in "ab":
        guard.opened(name)
        guard.headers_complete(name)
    assert guard.opened("c") == "c"
    assert guard.closed_by_reason["over_limit"] == 1


def test_the_guard_bounds_the_bodies_read_at_once():
    guard = ConnectionGuard(ConnectionLimits(max_body_readers=2))
    assert [guard.start_body(name) for name in "abc"] == [True, True, False]
    assert guard.start_body("a")  # a place already held
    guard.end_body("a")
    assert guard.start_body("c") and guard.body_readers == 2
    guard.closed("b")
    assert guard.body_readers == 1


def test_the_derived_cap_keeps_descriptors_free():
    assert connection_cap(1024, 20) == 1024 - 20 - 128
    assert connection_cap(100, 20) == 100 - 20 - 32
    assert connection_cap(40, 20) == 0


@pytest.mark.parametrize(
    "limits",
    [
        {"body_timeout_s": 0},
        {"idle_timeout_s": float("inf")},
        {"max_body_readers": 0},
        {"body_min_rate": -1.0},
        {"max_connections": 8, "max_body_readers": 8},
    ],
)
def test_unusable_limits_are_refused(limits):
    with pytest.raises(ValueError):
        ConnectionLimits(**limits)
