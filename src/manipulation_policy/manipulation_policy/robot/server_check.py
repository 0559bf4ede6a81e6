"""The remote node's configure step: is the policy server there, healthy, and does it
take our key? No ROS.

``check_server(settings)`` asks ``GET /health`` and ``GET /info``, each under the
remote deadline (at most ``MAX_CHECK_SEC``: the check runs on the node's executor
thread, and a configure must not keep it from its other callbacks for long) and a
size cap, and answers what the server serves (for the log), or
raises ServerCheckFailed with one line saying why the node cannot be configured:

- nothing answers (refused, unresolvable, past the deadline), or the answer is no
  HTTP a server would send;
- /health answers 503 (a model that is still loading or has failed): its reason;
- /info answers 401 or 403: the key is missing or wrong.

A server without /info (upstream's, an older one: 404, 405, 501) is taken: /health and
/infer are the contract. What /info says is read for the log and never trusted
further, but for its ``inputs`` (what the policy reads: cameras, state length), which
``check_server_info`` hands back so the node can refuse a configuration that could
never be answered (the server would refuse each request with a 422 anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from manipulation_policy.core.errors import InputError
from manipulation_policy.core.json_body import parse_json_body
from manipulation_policy.core.policy_inputs import inputs_from_wire
from manipulation_policy.core.policy_types import PolicyInputs
from manipulation_policy.robot.http_exchange import (
    DeadlineExceeded,
    ExchangeError,
    HttpAnswer,
    HttpPoster,
)
from manipulation_policy.robot.remote_client import RemoteSettings, printable

CHECK_MAX_BODY_BYTES = 256 * 1024
MAX_CHECK_SEC = 3.0
NOT_OFFERED = frozenset({404, 405, 501})


class ServerCheckFailed(Exception):
    """The server cannot be used now; the message is the reason, in one line."""


@dataclass(frozen=True)
class ServerInfo:
    served: str  # for the log: "stub (model stub, device cpu)", "no /info"
    inputs: Optional[PolicyInputs] = None  # /info's inputs; None: it says none
    inputs_unreadable: Optional[str] = None  # /info's inputs were there but malformed


def check_server(settings: RemoteSettings, poster: Optional[HttpPoster] = None) -> str:
    """What the server at ``settings.url`` serves, for the log ("stub (model stub, device
    cpu)", "no /info"); ServerCheckFailed says why it cannot be used."""
    return check_server_info(settings, poster).served


def check_server_info(
    settings: RemoteSettings, poster: Optional[HttpPoster] = None
) -> ServerInfo:
    """``check_server``'s answer with what /info says the policy reads."""
    own_poster = poster is None
    poster = poster or HttpPoster()
    try:
        health = _get(poster, settings, "/health")
        if health.status == 503:
            raise ServerCheckFailed(
                f"policy server {settings.url} is not ready: {_reason(health)}"
            )
        if health.status in (401, 403):
            raise ServerCheckFailed(_key_refused(settings, health))
        if health.status != 200 and health.status not in NOT_OFFERED:
            raise ServerCheckFailed(
                f"policy server {settings.url} answers /health with {health.status}: "
                f"{_reason(health)}"
            )
        info = _get(poster, settings, "/info")
        if info.status in (401, 403):
            raise ServerCheckFailed(_key_refused(settings, info))
        if info.status != 200:
            return ServerInfo("no /info")
        return _info(info)
    finally:
        if own_poster:
            poster.close()


def _get(poster: HttpPoster, settings: RemoteSettings, path: str) -> HttpAnswer:
    headers = {"Accept": "application/json", "Accept-Encoding": "gzip, identity"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    url = settings.url.rstrip("/") + path
    deadline = min(settings.timeout_sec, MAX_CHECK_SEC)
    try:
        return poster.get(url, headers, deadline, CHECK_MAX_BODY_BYTES)
    except DeadlineExceeded:
        raise ServerCheckFailed(
            f"policy server {settings.url} did not answer {path} within {deadline:g} s"
        ) from None
    except ExchangeError as exc:
        raise ServerCheckFailed(
            f"policy server {settings.url} unreachable ({path}): {printable(exc)}"
        ) from None


def _key_refused(settings: RemoteSettings, answer: HttpAnswer) -> str:
    given = "a key was sent" if settings.api_key else "no key was sent"
    return (
        f"policy server {settings.url} refuses us with {answer.status} ({given}; set "
        "remote_api_key_file or MANIPULATION_POLICY_API_KEY)"
    )


def _payload(answer: HttpAnswer) -> Any:
    try:
        return parse_json_body(answer.body)
    except InputError:
        return None


def _reason(answer: HttpAnswer) -> str:
    payload = _payload(answer)
    if isinstance(payload, dict):
        for key in ("reason", "detail", "error", "status"):
            if isinstance(payload.get(key), str):
                return printable(payload[key])
    return printable(answer.body.decode("utf-8", "replace")) or answer.reason


def _info(info: HttpAnswer) -> ServerInfo:
    payload = _payload(info)
    if not isinstance(payload, dict):
        return ServerInfo("/info is not JSON")
    inputs, unreadable = None, None
    if payload.get("inputs") is not None:
        try:
            inputs = inputs_from_wire(payload["inputs"])
        except ValueError as exc:
            unreadable = printable(exc)
    return ServerInfo(_served(payload), inputs, unreadable)


def _served(payload: dict) -> str:
    backend = payload.get("backend")
    name = backend.get("backend") if isinstance(backend, dict) else backend
    parts = [
        f"{key} {printable(payload[key], 80)}"
        for key in ("model", "device")
        if isinstance(payload.get(key), str)
    ]
    text = printable(name, 80) if isinstance(name, str) else "unnamed backend"
    return text + (f" ({', '.join(parts)})" if parts else "")
