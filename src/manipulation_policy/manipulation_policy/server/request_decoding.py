"""/infer's body bytes to a validated request and its Observation.

Strict JSON goes straight into the InferRequest model; a body that orjson or the
model refuses is parsed again by json_body.py, which names the field at fault and
reads NaN in joint arrays as unknown. Small bodies and images are handled on the
event loop (``parse_inline``, ``decode_inline``), the rest on the decode pool.
"""

from __future__ import annotations

import logging
from typing import Optional

from pydantic import ValidationError

try:  # a compiled JSON codec: strict RFC 8259 parsing, ~10x faster encoding
    import orjson
except ImportError:  # pragma: no cover - requirements install it; json still works
    orjson = None

from manipulation_policy.core.contract import (
    InferRequest,
    parse_request,
    request_to_observation,
)
from manipulation_policy.core.errors import InputError
from manipulation_policy.core.json_body import parse_json_body
from manipulation_policy.core.policy_types import Observation
from manipulation_policy.server.errors import ApiError

logger = logging.getLogger("manipulation_policy.policy_server")

# A body up to this size is parsed on the event loop when its request is alone, and its
# image decoded there too when declared no larger than this (a 640x480 JPEG: ~3 ms).
INLINE_PARSE_MAX_BYTES = 128 * 1024
INLINE_DECODE_MAX_PIXELS = 640 * 480
# Bodies past this are decoded one at a time on a thread of their own (app.py).
LARGE_BODY_BYTES = 1024 * 1024


def decode_infer_body(raw: bytes, max_image_pixels: int) -> tuple[InferRequest, Observation]:
    """Body bytes to a validated request and its Observation (image decoded).

    Runs on a worker thread: JSON parsing and image decoding stay off the event loop
    (PolicyService.decode runs small ones inline, see ``decode_inline``).
    """
    request = parse_infer_body(raw)
    return request, observation_of(request, max_image_pixels)


def parse_infer_body(raw: bytes) -> InferRequest:
    """Body bytes to a validated request, or the ApiError (400/422) naming the field."""
    request = _parse_strict_json_request(raw)
    return request if request is not None else _parse_request_naming_the_field(raw)


def observation_of(request: InferRequest, max_image_pixels: int) -> Observation:
    """The request's Observation, its images decoded (422 invalid_image when unusable)."""
    try:
        return request_to_observation(request, max_image_pixels)
    except InputError as exc:
        raise ApiError.from_input_error(422, "invalid_image", exc) from None
    except Exception as exc:  # noqa: BLE001 - only the client's image is decoded here
        # A decoder error that imaging.py does not translate is still the image's fault.
        logger.warning("image decoder raised %s: %s", type(exc).__name__, exc)
        raise ApiError(
            422, "invalid_image", f"an image could not be decoded ({type(exc).__name__})",
            "image" if not request.images else "images",
        ) from None


def _parse_strict_json_request(raw: bytes) -> Optional[InferRequest]:
    """The fast path: RFC 8259 JSON (orjson refuses NaN/Infinity, numbers that overflow,
    lone surrogates, non-UTF-8 text and deep nesting) that the model accepts as it is.

    None for anything else, which ``_parse_request_naming_the_field`` then parses
    again to name the field at fault (and to read NaN in joint arrays as unknown).
    Whatever passes here passes there too, with the same values."""
    if orjson is None:
        return None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    try:
        return InferRequest.model_validate(payload)
    except (ValidationError, InputError):
        return None


def _parse_request_naming_the_field(raw: bytes) -> InferRequest:
    """The request, or the ApiError naming what is wrong with it (400 invalid_json, 422)."""
    try:
        payload = parse_json_body(raw)
    except InputError as exc:
        raise ApiError.from_input_error(400, "invalid_json", exc) from None
    try:
        return parse_request(payload)
    except InputError as exc:
        raise ApiError.from_input_error(422, "invalid_request", exc) from None


def parse_inline(body_bytes: int, queue_depth: int) -> bool:
    """Whether a body is parsed on the event loop rather than on the decode pool.

    The hop to a pool thread and back costs more than parsing a small body. Only
    when this request is the only one admitted (``queue_depth`` counts it): then no
    other request's work waits on the loop meanwhile."""
    return queue_depth <= 1 and body_bytes <= INLINE_PARSE_MAX_BYTES


def decode_inline(request: InferRequest) -> bool:
    """Whether a parsed request's images are decoded on the event loop too: none, or
    ones whose declared sizes (checked against each image's header before any pixel is
    decoded) are small together, so that /health and /metrics wait a millisecond or two
    at most. An image of undeclared size sends them all to the pool: a small body can
    hold a JPEG of millions of pixels of one colour (~50 ms to decode)."""
    cameras = [request, *(request.images or {}).values()]
    pixels = 0
    for camera in cameras:
        if camera.image is None:
            continue
        if camera.image_width is None or camera.image_height is None:
            return False
        pixels += camera.image_width * camera.image_height
    return pixels <= INLINE_DECODE_MAX_PIXELS


def is_large_body(body_bytes: int) -> bool:
    return body_bytes > LARGE_BODY_BYTES
