"""Optional bearer-token auth for the policy server.

With a key configured, every path except the open ones needs
``Authorization: Bearer <key>``; the key is compared in constant time.
Open paths: /health (load balancers and the robot's liveness probe), and the
API documentation (/docs, /openapi.json), which describe the public wire
contract and hold nothing secret. /metrics and /info are protected: they
reveal load and deployment details, and Prometheus can send a bearer token.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Callable, Mapping
from typing import Optional

# One variable name and one size limit for the server and the robot side.
from manipulation_policy.nodes.client_api_key import API_KEY_ENV, MAX_KEY_FILE_BYTES

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


class ApiKeyError(ValueError):
    """The configured API key cannot be used."""


def load_api_key(
    key_file: Optional[str], environ: Mapping[str, str] = os.environ
) -> Optional[str]:
    """The key from ``key_file`` if given, else from the environment; None means no auth."""
    if key_file:
        key = _read_key_file(key_file)
        if not key:
            raise ApiKeyError(f"API key file {key_file!r} is empty")
    else:
        key = environ.get(API_KEY_ENV, "").strip()
        if not key:
            return None
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ApiKeyError("the API key must be one printable ASCII token without spaces")
    return key


def _read_key_file(key_file: str) -> str:
    # A FIFO or a device would block start-up, or never end: only a regular file, bounded.
    try:
        if not stat.S_ISREG(os.stat(key_file).st_mode):
            raise ApiKeyError(f"API key file {key_file!r} is not a regular file")
        with open(key_file, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ApiKeyError(f"cannot read API key file {key_file!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ApiKeyError(f"API key file {key_file!r} is over {MAX_KEY_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ApiKeyError(f"cannot read API key file {key_file!r}: {exc}") from None


def bearer_token_matches(authorization: Optional[str], key: str) -> bool:
    """True when an Authorization header value carries ``key`` as a bearer token."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Header values arrive as latin-1 text; compare the raw bytes.
    return hmac.compare_digest(token.strip().encode("latin-1", "replace"), key.encode("ascii"))


class BearerAuthMiddleware:
    """ASGI middleware: answers 401 via ``reject`` for protected paths without the key."""

    def __init__(self, app, key: str, reject: Callable[[], object]):
        self.app = app
        self._key = key
        self._reject = reject  # () -> an ASGI app that sends the 401 response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if bearer_token_matches(authorization, self._key):
            await self.app(scope, receive, send)
            return
        await self._reject()(scope, receive, send)
