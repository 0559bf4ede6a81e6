"""Test equipment that needs no ROS, shared by the remote client's tests and the node
tests (node_harness re-exports it): real HTTP on 127.0.0.1 only.

- ``ScriptedPolicyServer``: a real HTTP server on 127.0.0.1 speaking the wire
  contract with the stub backend, recording what it receives, with switches for
  delay and failure statuses.
- ``sample_image``, ``jpeg_roundtrip``, ``assert_actions_close``, ``wait_until``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import numpy as np

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.contract import (
    action_to_response,
    parse_request,
    request_to_observation,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.imaging import decode_image_bytes, encode_jpeg, resize_rgb
from manipulation_policy.core.policy_types import Observation, PolicyAction

WAIT_SEC = 15.0


def wait_until(
    predicate: Callable[[], bool], timeout: float = WAIT_SEC, step: float = 0.02
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def sample_image(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A colourful RGB frame whose mean colour is far from grey on every channel."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = 200
    image[..., 1] = np.linspace(0, 90, width, dtype=np.uint8)[None, :]
    image[..., 2] = rng.integers(100, 160, size=(height, width), dtype=np.uint8)
    return image


def assert_actions_close(got: PolicyAction, want: PolicyAction, tol: float = 0.0) -> None:
    assert got.reference_frame == want.reference_frame
    assert got.eef_target_mode == want.eef_target_mode
    assert (got.eef_target is None) == (want.eef_target is None)
    assert (got.joint_deltas is None) == (want.joint_deltas is None)
    assert (got.joint_positions is None) == (want.joint_positions is None)
    assert got.joint_names == want.joint_names
    assert (got.gripper_command is None) == (want.gripper_command is None)
    assert (got.base_velocity_hint is None) == (want.base_velocity_hint is None)
    got_numbers, want_numbers = _numbers(got), _numbers(want)
    assert len(got_numbers) == len(want_numbers)
    for index, (a, b) in enumerate(zip(got_numbers, want_numbers, strict=True)):
        assert math.isclose(a, b, rel_tol=0.0, abs_tol=tol), (index, a, b, got, want)


def _numbers(action: PolicyAction) -> list[float]:
    values: list[float] = [action.confidence]
    if action.eef_target is not None:
        p, q = action.eef_target.position, action.eef_target.orientation
        values += [p.x, p.y, p.z, q.x, q.y, q.z, q.w]
    values += list(action.joint_deltas or ())
    values += list(action.joint_positions or ())
    if action.gripper_command is not None:
        values.append(action.gripper_command)
    return values


def jpeg_roundtrip(rgb: np.ndarray, width: int, height: int, quality: int = 90) -> np.ndarray:
    """What the server decodes from the remote node's request for ``rgb``."""
    return decode_image_bytes(encode_jpeg(resize_rgb(rgb, width, height), quality), "JPEG")


class ScriptedPolicyServer:
    """A real contract-speaking HTTP server on 127.0.0.1 (stub backend), scriptable.

    ``delay_sec`` delays every answer; ``fail_status`` answers that status
    instead; ``raw_answer`` (status, body bytes) answers exactly that. Every
    request's headers, client port, request id and decoded observation are recorded.
    ``barrier`` (a threading.Barrier) is waited on by every request before it is
    answered: that many requests must be in the server at once. ``echo_request_id``
    names the request's id in its answer, as the policy server does.
    """

    def __init__(self) -> None:
        self.delay_sec = 0.0
        self.fail_status: Optional[int] = None
        self.raw_answer: Optional[tuple[int, bytes]] = None
        self.requests: list[dict[str, Any]] = []
        self.barrier: Optional[threading.Barrier] = None
        self.echo_request_id = False
        self._lock = threading.Lock()
        backend = StubBackend()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stall per answer

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the remote node's configure check
                if self.path == "/health":
                    self._answer(200, {"status": "ok"})
                else:
                    self._answer(404, {"error": "not_found"})

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                record: dict[str, Any] = {
                    "path": self.path,
                    "headers": dict(self.headers),
                    "client_port": self.client_address[1],
                }
                try:
                    record["request_id"] = json.loads(body).get("request_id")
                except (ValueError, AttributeError):
                    record["request_id"] = None
                with outer._lock:
                    outer.requests.append(record)
                    delay, fail_status = outer.delay_sec, outer.fail_status
                    raw_answer, barrier = outer.raw_answer, outer.barrier
                    echo = outer.echo_request_id
                if barrier is not None:
                    try:
                        barrier.wait()
                    except threading.BrokenBarrierError:
                        self._answer(503, {"error": "scripted", "detail": "barrier broken"})
                        return
                if delay:
                    time.sleep(delay)
                if raw_answer is not None:
                    self._send(raw_answer[0], raw_answer[1])
                    return
                if fail_status is not None:
                    self._answer(fail_status, {"error": "scripted", "detail": "scripted failure"})
                    return
                try:
                    request = parse_request(json.loads(body))
                    observation = request_to_observation(request)
                except (InputError, ValueError) as exc:
                    self._answer(422, {"error": "invalid_request", "detail": str(exc)})
                    return
                record["observation"] = observation
                answer_id = record["request_id"] if echo else None
                self._answer(200, action_to_response(backend.predict(observation), answer_id))

            def _answer(self, status: int, payload: dict) -> None:
                self._send(status, json.dumps(payload).encode())

            def _send(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout under test)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def observations(self) -> list[Observation]:
        with self._lock:
            return [r["observation"] for r in self.requests if "observation" in r]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ScriptedPolicyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
