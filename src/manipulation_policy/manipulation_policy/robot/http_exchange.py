"""One HTTP exchange (POST or GET) under a wall-clock deadline and a size cap. No ROS.

``requests``' timeout bounds each socket operation, not the exchange: a
server that trickles one byte per 100 ms, or redirects to itself, can keep a
caller waiting without end. Here every socket operation (connect, TLS
handshake, each send and each receive) gets the time left until one deadline,
so nothing a server does can stretch an exchange past it. http.client parses
the answer (status line, headers, chunked bodies) over a socket armed that
way; redirects are never followed (the caller sees the 3xx). The body is
read in small pieces and refused once it passes ``max_body_bytes``, before
and after content decoding (only gzip and deflate are decoded, with a bound
on their output: no decompression bombs).

One connection is kept alive between exchanges, as a requests session would,
and only after an exchange that read a whole answer: an exchange that fails
for any reason (its deadline above all) closes its connection, so an answer
that comes late reaches a closed socket and can never be read as the answer
to a later request. A kept-alive connection is used again only while idle with
nothing to read (``is_dead_or_dirty``); ``drop_connection`` closes it on the
caller's word (an answer that was another request's).
A server may close an idle kept-alive connection just as the next request goes
out on it; that request is sent once more on a fresh connection, within the
same deadline (inference has no side effects, and nothing of an answer came).
"""

from __future__ import annotations

import http.client
import io
import select
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

READ_CHUNK_BYTES = 16 * 1024


class ExchangeError(Exception):
    """The exchange failed. ``retryable``: worth another attempt (the server may recover)."""

    retryable = True


class DeadlineExceeded(ExchangeError):
    pass


class ConnectFailed(ExchangeError):
    pass


class AnswerRefused(ExchangeError):
    """The server did answer, but with something we will not take (too big, odd encoding)."""

    retryable = False


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes  # content-decoded, at most max_body_bytes


class _ArmedSocket:
    """The socket as http.client sees it: every operation gets the time left."""

    def __init__(self, sock: socket.socket, time_left: Callable[[], float]):
        self._sock = sock
        self._time_left = time_left
        # As socket.makefile does: a response may still be read after http.client
        # closed its connection (Connection: close); the socket closes after both.
        self._readers = 0
        self._close_wanted = False

    def _arm(self) -> None:
        left = self._time_left()
        if left <= 0:
            raise DeadlineExceeded("deadline passed")
        self._sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self._sock.sendall(data)  # since Python 3.5 the timeout bounds the whole call

    def recv_into(self, buffer) -> int:
        self._arm()
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_ArmedReader(self))

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._close_wanted and self._readers <= 0:
            self._sock.close()

    def is_dead_or_dirty(self) -> bool:
        """A kept-alive socket that is readable while idle was closed by the server
        (or holds bytes nobody asked for): not to be reused."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._close_wanted = True
        if self._readers <= 0:
            self._sock.close()


class _ArmedReader(io.RawIOBase):
    def __init__(self, sock: _ArmedSocket):
        super().__init__()
        self._sock = sock

    def close(self) -> None:
        if not self.closed:
            self._sock.reader_closed()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._sock.recv_into(buffer)


class _Connection(http.client.HTTPConnection):
    """HTTPConnection whose connect and every I/O respect ``deadline`` (time.monotonic)."""

    def __init__(self, host: str, port: int, tls: Optional[ssl.SSLContext]):
        super().__init__(host, port)
        self.deadline = 0.0
        self._tls = tls

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def connect(self) -> None:
        sock = _connect_by_deadline(self.host, self.port, self.time_left)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(
                    sock, server_hostname=self.host, do_handshake_on_connect=False
                )
                left = self.time_left()
                if left <= 0:
                    raise DeadlineExceeded("deadline passed during the TLS handshake")
                sock.settimeout(left)  # CPython bounds the whole handshake call by it
                sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        self.sock = _ArmedSocket(sock, self.time_left)


def _connect_by_deadline(host: str, port: int, time_left: Callable[[], float]) -> socket.socket:
    # socket.create_connection gives *each* address the whole timeout; here they share it.
    # (Name resolution itself cannot be bounded this way: use an address or a fast resolver.)
    last_error: Optional[OSError] = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        left = time_left()
        if left <= 0:
            raise DeadlineExceeded("deadline passed while connecting")
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
            return sock
        except TimeoutError:
            sock.close()
            raise DeadlineExceeded("deadline passed while connecting") from None
        except OSError as exc:
            sock.close()
            last_error = exc
    raise ConnectFailed(str(last_error or f"no address for {host}"))


def _decoder(content_encoding: str):
    """A bounded decoder for the answer's Content-Encoding, None for identity."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise AnswerRefused(f"unsupported Content-Encoding {content_encoding[:40]!r}")


def read_body(response: http.client.HTTPResponse, max_body_bytes: int) -> bytes:
    """The content-decoded body, refused past ``max_body_bytes`` (on the wire or decoded)."""
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_body_bytes:
        raise AnswerRefused(
            f"answer of {int(declared)} bytes is over the {max_body_bytes}-byte limit"
        )
    decoder = _decoder(response.getheader("Content-Encoding") or "")
    received = 0
    body = bytearray()
    while True:
        chunk = response.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        received += len(chunk)
        if received > max_body_bytes:
            raise AnswerRefused(f"answer is over the {max_body_bytes}-byte limit")
        if decoder is None:
            body += chunk
            continue
        try:
            # max_length bounds the output of this call; input left over stays in
            # unconsumed_tail, which is only non-empty once the limit is reached.
            body += decoder.decompress(chunk, max_body_bytes + 1 - len(body))
        except zlib.error as exc:
            raise AnswerRefused(f"answer is not valid compressed data: {exc}") from None
        if len(body) > max_body_bytes or decoder.unconsumed_tail:
            raise AnswerRefused(
                f"answer decompresses to over the {max_body_bytes}-byte limit"
            )
    if decoder is not None and not decoder.eof:
        raise AnswerRefused("compressed answer is truncated")
    return bytes(body)


class _StaleConnection(ExchangeError):
    """The server closed or reset the connection before an answer began."""


class HttpPoster:
    """POSTs to one server at a time over a kept-alive connection. One caller at a time;
    ``close`` may come from another thread and ends an exchange in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connection: Optional[_Connection] = None
        self._key: Optional[tuple] = None
        self._closed = False

    def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_sec: float,
        max_body_bytes: int,
    ) -> HttpAnswer:
        """Raises ExchangeError (DeadlineExceeded, ConnectFailed, AnswerRefused...) on failure."""
        return self.exchange("POST", url, body, headers, timeout_sec, max_body_bytes)

    def get(
        self, url: str, headers: Mapping[str, str], timeout_sec: float, max_body_bytes: int
    ) -> HttpAnswer:
        """As ``post``, for a GET."""
        return self.exchange("GET", url, None, headers, timeout_sec, max_body_bytes)

    def exchange(
        self,
        method: str,
        url: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout_sec: float,
        max_body_bytes: int,
    ) -> HttpAnswer:
        deadline = time.monotonic() + timeout_sec
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = self._connection_for(parts)
        connection.deadline = deadline
        if connection.sock is not None:  # kept alive from an earlier exchange
            try:
                return self._exchange(connection, method, path, body, headers, max_body_bytes)
            except _StaleConnection:
                connection = self._connection_for(parts)
                connection.deadline = deadline
        return self._exchange(connection, method, path, body, headers, max_body_bytes)

    def _exchange(
        self,
        connection: _Connection,
        method: str,
        path: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        max_body_bytes: int,
    ) -> HttpAnswer:
        response: Optional[http.client.HTTPResponse] = None
        try:
            connection.request(method, path, body=body, headers=dict(headers))
            response = connection.getresponse()
            answer = HttpAnswer(
                status=response.status,
                reason=response.reason or "",
                headers={name.lower(): value for name, value in response.getheaders()},
                body=read_body(response, max_body_bytes),
            )
        except ExchangeError:
            self._drop(connection, response)
            raise
        except TimeoutError:
            self._drop(connection, response)
            raise DeadlineExceeded("deadline passed") from None
        except Exception as exc:  # noqa: BLE001 - whatever a server does ends as a failure
            self._drop(connection, response)
            if time.monotonic() >= connection.deadline:
                raise DeadlineExceeded("deadline passed") from None
            if response is None and isinstance(exc, ConnectionError):
                raise _StaleConnection(error_text(exc)) from None
            raise ExchangeError(error_text(exc)) from None
        if response.will_close:
            self._drop(connection)
        return answer

    def drop_connection(self) -> None:
        """Close the kept-alive connection (if any): the next exchange opens a fresh one."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            self._abort(connection)

    def _connection_for(self, parts) -> _Connection:
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, parts.hostname, port)
        with self._lock:
            if self._closed:
                raise ExchangeError("client closed")
            connection = self._connection
            reuse = (
                connection is not None
                and self._key == key
                and not (isinstance(connection.sock, _ArmedSocket)
                         and connection.sock.is_dead_or_dirty())
            )
            if not reuse:
                if connection is not None:
                    connection.close()
                tls = ssl.create_default_context() if scheme == "https" else None
                connection = _Connection(parts.hostname or "", port, tls)
                self._connection, self._key = connection, key
            return connection

    def _drop(
        self, connection: _Connection, response: Optional[http.client.HTTPResponse] = None
    ) -> None:
        if response is not None:
            response.close()
        connection.close()
        with self._lock:
            if self._connection is connection:
                self._connection = None

    @staticmethod
    def _abort(connection: _Connection) -> None:
        sock = connection.sock
        if isinstance(sock, _ArmedSocket):
            sock.shutdown()  # wakes a receive in progress in another thread
        connection.close()


def error_text(exc: BaseException) -> str:
    """``exc`` in words: its type, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
