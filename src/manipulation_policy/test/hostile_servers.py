"""Policy servers that misbehave, as real HTTP servers on 127.0.0.1 (raw sockets).

``RawPolicyServer(behaviour)`` accepts connections and, for each request,
calls ``behaviour(request, sock)``, which writes whatever bytes it likes:
a trickled answer, a redirect, a gzip bomb, an answer that never ends.
The remote node's configure check (``GET /health``, ``GET /info``) is answered
as a healthy server without /info would, and not recorded, unless
``answer_checks`` is False: then the behaviour gets those requests too.
Each connection has its own thread, so a slow behaviour never blocks others.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.monotonic()
    client_port: int = 0  # which TCP connection it came on
    index_on_connection: int = 1  # 1 for the first request on its connection

    def json(self) -> Any:
        return json.loads(self.body)

    def joint_count(self) -> int:
        return len(self.json().get("joint_states", {}).get("name", []))


Behaviour = Callable[[Request, socket.socket], None]


def http_answer(status: int, body: bytes, reason: str = "X", **headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}"]
    fields = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    head += [f"{name.replace('_', '-')}: {value}" for name, value in fields.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def good_answer(joint_count: int, **overrides: Any) -> dict:
    """A valid, non-hold answer for a request with ``joint_count`` joints."""
    answer = {
        "has_eef_target": True,
        "eef_target_pose": {
            "position": {"x": 0.01, "y": 0.0, "z": -0.01},
            "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0},
        },
        "eef_target_mode": "delta",
        "has_joint_deltas": joint_count > 0,
        "joint_deltas": [0.01] * joint_count,
        "gripper_command": 0.5,
        "gripper_active": True,
        "has_base_hint": False,
        "base_velocity_hint": {"linear": {"x": 0.0, "y": 0.0, "z": 0.0},
                               "angular": {"x": 0.0, "y": 0.0, "z": 0.0}},
        "reference_frame": "base_link",
        "confidence": 0.5,
    }
    answer.update(overrides)
    return answer


def answer_check(request: Request, sock: socket.socket) -> None:
    """What a healthy server without /info answers to the remote node's configure check."""
    if request.path == "/health":
        send_json(sock, {"status": "ok"})
    else:
        send_json(sock, {"error": "not_found"}, status=404)


def send_json(sock: socket.socket, payload: Any, status: int = 200, **headers: str) -> None:
    sock.sendall(http_answer(status, json.dumps(payload).encode(), **headers))


def answering(make: Callable[[Request], Any]) -> Behaviour:
    """A behaviour that answers 200 with ``make(request)`` as JSON, at once."""
    return lambda request, sock: send_json(sock, make(request))


def trickling(interval_sec: float) -> Behaviour:
    """A valid answer, one byte every ``interval_sec``: each byte well within any timeout."""

    def behave(request: Request, sock: socket.socket) -> None:
        data = http_answer(200, json.dumps(good_answer(request.joint_count())).encode())
        for index in range(len(data)):
            sock.sendall(data[index:index + 1])
            time.sleep(interval_sec)

    return behave


def gzip_bytes(data_size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1024 * 1024)
    parts = []
    for _ in range(data_size // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    return b"".join(parts)


class RawPolicyServer:
    def __init__(self, behaviour: Behaviour, answer_checks: bool = True):
        self.behaviour = behaviour
        self.answer_checks = answer_checks
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(32)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def request_times(self) -> list[float]:
        with self._lock:
            return [r.received_at for r in self.requests]

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        buffer = b""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_port = sock.getpeername()[1]
            for index in itertools.count(1):
                if self._closed.is_set():
                    return
                request, buffer = _read_request(sock, buffer)
                if request is None:
                    return
                if self.answer_checks and request.method == "GET":
                    answer_check(request, sock)
                    continue
                request = dataclasses.replace(
                    request, client_port=client_port, index_on_connection=index
                )
                with self._lock:
                    self.requests.append(request)
                self.behaviour(request, sock)
        except OSError:
            pass  # the client gave up: that is what these servers are for
        finally:
            sock.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> RawPolicyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_request(sock: socket.socket, buffer: bytes) -> tuple[Optional[Request], bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        rest += chunk
    request = Request(method, path, headers, rest[:length], time.monotonic())
    return request, rest[length:]
