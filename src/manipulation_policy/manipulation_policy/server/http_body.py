"""Reading a request body: its declared type, its size limit, and the drain of a
body the server will not use before a closing connection is closed."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Optional

from fastapi import Request

from manipulation_policy.server.errors import ApiError
from manipulation_policy.server.log_limits import printable

# A body still arriving when the server answers early is read and dropped, up to these
# bounds, before a closing connection is closed (see drain_before_close).
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_SECONDS = 5.0


def check_json_content_type(content_type: Optional[str]) -> None:
    """The body must be declared JSON. Refusing form, text and undeclared bodies also
    keeps a web page from posting to the server cross-site without a CORS preflight."""
    if not content_type or not content_type.strip():
        raise ApiError(
            415,
            "unsupported_media_type",
            "Content-Type is missing; send Content-Type: application/json",
            "content-type",
        )
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media_type!r} is not JSON; send Content-Type: application/json",
        "content-type",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes: from Content-Length when
    declared, while streaming otherwise (chunked bodies), so a huge body is never held."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await drain_before_close(request.scope, request.receive)
        raise _body_too_large(f"Content-Length {printable(declared, 30)} exceeds", limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await drain_before_close(request.scope, request.receive, already=size)
            raise _body_too_large("the streamed body exceeds", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip().lower()
    return ""


def connection_closes_after_response(scope) -> bool:
    connection = _header(scope, b"connection")
    if scope.get("http_version") == "1.0":
        return "keep-alive" not in connection
    return "close" in connection


async def drain_before_close(scope, receive, already: int = 0) -> None:
    """Read and drop the rest of a request body the server will not use, when the
    connection closes after the answer (``Connection: close``, HTTP/1.0).

    Closing a socket with unread data makes the kernel reset the connection, and a
    client still sending (Python's urllib does) then sees "connection reset" instead
    of the 413 or 503. On a kept-alive connection uvicorn drops the rest itself; a
    client that asked ``Expect: 100-continue`` has sent nothing. Bounded in bytes and
    time: past either, the answer goes out anyway.
    """
    if not connection_closes_after_response(scope) or "100-continue" in _header(
        scope, b"expect"
    ):
        return
    declared = _header(scope, b"content-length")
    if declared.isdigit() and int(declared) > DRAIN_MAX_BYTES:
        return

    async def drain() -> None:
        size = already
        while size <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), DRAIN_MAX_SECONDS)


def _body_too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"{what} the limit of {limit} bytes", "body")
