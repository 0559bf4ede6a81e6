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
from collections.abc import Callable, Mapping
from typing import Optional

from manipulation_policy.core.api_key import read_api_key
from manipulation_policy.server.http_body import drain_before_close

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def load_api_key(
    key_file: Optional[str], environ: Mapping[str, str] = os.environ
) -> Optional[str]:
    """The key from ``key_file`` if given, else from the environment; None means no auth.
    Raises ApiKeyUnusable (a ValueError) saying why a key cannot be used."""
    return read_api_key(key_file or "", environ) or None


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
        # A client still sending its body (urllib) must see the 401, not a reset.
        await drain_before_close(scope, receive)
        await self._reject()(scope, receive, send)
