"""Image conversion: JPEG/PNG bytes and raw ROS image buffers to RGB arrays, and back.

Pure code (numpy + Pillow): no ROS, no HTTP. Every failure is an InputError
naming the field it came from.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from manipulation_policy.core.errors import InputError

# 4096 x 4096: far above any camera a policy needs, far below a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096

# Wire image_encoding value -> the Pillow format the bytes must have.
WIRE_IMAGE_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}
# Leading bytes of each accepted format (JPEG SOI + marker; the PNG signature).
IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


def detect_image_format(raw: bytes) -> str:
    """The Pillow format of JPEG or PNG bytes, from their signature."""
    for signature, image_format in IMAGE_SIGNATURES:
        if raw.startswith(signature):
            return image_format
    raise InputError(
        "image",
        "bytes are neither a JPEG nor a PNG image (no image_encoding given, so the "
        "format is read from the bytes)",
    )


# ROS sensor_msgs/Image encodings we accept -> (channels, channel order).
RAW_ENCODINGS = {
    "rgb8": (3, "RGB"),
    "bgr8": (3, "BGR"),
    "rgba8": (4, "RGBA"),
    "bgra8": (4, "BGRA"),
    "mono8": (1, "L"),
}


# A multiple of 4: base64 decoded this many characters at a time (~3 ms each here).
B64_PIECE_CHARS = 1 << 20


def b64decode_in_pieces(data: str, piece_chars: int = B64_PIECE_CHARS) -> bytes:
    """``base64.b64decode(data, validate=True)``, a piece at a time.

    One call on a 7 MiB image holds the GIL for ~25 ms, and the server's event loop
    (/health among it) waits that long for a decode thread; between pieces the loop
    gets its turn. Accepts and refuses exactly what the single call does."""
    if len(data) <= piece_chars:
        return base64.b64decode(data, validate=True)
    pieces = []
    for start in range(0, len(data), piece_chars):
        piece = data[start : start + piece_chars]
        if start + piece_chars < len(data) and piece[-1:] in ("=", b"="):
            raise binascii.Error("padding before the end of the data")
        pieces.append(base64.b64decode(piece, validate=True))
    return b"".join(pieces)


def decode_base64_image(
    data: str,
    image_encoding: Optional[str] = None,
    declared_width: Optional[int] = None,
    declared_height: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode the wire ``image`` field into an HxWx3 uint8 RGB array.

    ``image_encoding`` None: the format (JPEG or PNG) is read from the bytes.
    """
    expected_format = None if image_encoding is None else WIRE_IMAGE_FORMATS.get(
        image_encoding.lower()
    )
    if image_encoding is not None and expected_format is None:
        raise InputError(
            "image_encoding",
            f"unsupported encoding {image_encoding!r}; use one of {sorted(WIRE_IMAGE_FORMATS)}",
        )
    try:
        raw = b64decode_in_pieces(data)
    except (binascii.Error, ValueError) as exc:
        raise InputError("image", f"not valid base64 ({exc})") from None
    if not raw:
        raise InputError("image", "empty image")
    if expected_format is None:
        expected_format = detect_image_format(raw)
    return decode_image_bytes(raw, expected_format, declared_width, declared_height, max_pixels)


def decode_image_bytes(
    raw: bytes,
    expected_format: str,
    declared_width: Optional[int] = None,
    declared_height: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=[expected_format])
    except UnidentifiedImageError:
        # Its message names an in-memory file object: nothing a client can use.
        raise InputError("image", f"bytes are not a {expected_format} image") from None
    except (
        OSError,
        ValueError,  # e.g. "Truncated IHDR chunk" from a cut PNG header
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise InputError("image", f"bytes are not a {expected_format} image ({exc})") from None
    width, height = image.size
    # Checked from the header, before any pixel is decompressed.
    if width * height > max_pixels:
        raise InputError(
            "image", f"{width}x{height} image exceeds the limit of {max_pixels} pixels"
        )
    if declared_width is not None and declared_width != width:
        raise InputError("image_width", f"declared {declared_width} but the image is {width} wide")
    if declared_height is not None and declared_height != height:
        raise InputError(
            "image_height", f"declared {declared_height} but the image is {height} high"
        )
    try:
        if image.mode == "RGB":
            image.load()  # decoded in place: convert() would only copy it
            rgb = image
        else:
            rgb = image.convert("RGB")
    # Pillow reports some broken PNG chunks as SyntaxError.
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError("image", f"{expected_format} data is corrupt ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_base64_jpeg(rgb: np.ndarray, quality: int = 90) -> str:
    return base64.b64encode(encode_jpeg(rgb, quality)).decode("ascii")


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    # Image.BILINEAR, not Image.Resampling.BILINEAR: Resampling is Pillow 9.1+, and
    # Ubuntu 22.04 (ROS 2 Humble) ships Pillow 9.0.1.
    resized = Image.fromarray(rgb, mode="RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def raw_image_to_rgb(
    data: bytes, width: int, height: int, encoding: str, step: int
) -> np.ndarray:
    """A sensor_msgs/Image buffer (row padding included) to an HxWx3 RGB array."""
    if encoding not in RAW_ENCODINGS:
        supported = ", ".join(sorted(RAW_ENCODINGS))
        raise InputError("encoding", f"unsupported image encoding {encoding!r}; use {supported}")
    channels, order = RAW_ENCODINGS[encoding]
    if width <= 0 or height <= 0:
        raise InputError("width", f"image size {width}x{height} is empty")
    row_bytes = width * channels
    if step < row_bytes:
        raise InputError("step", f"step {step} is shorter than a row of {row_bytes} bytes")
    if len(data) < step * height:
        raise InputError("data", f"{len(data)} bytes cannot hold {height} rows of step {step}")
    buffer = np.frombuffer(data, dtype=np.uint8, count=step * height)
    pixels = buffer.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if order == "L":
        return np.repeat(pixels, 3, axis=2)
    if order == "BGR":
        return pixels[:, :, ::-1].copy()
    if order == "RGBA":
        return pixels[:, :, :3].copy()
    if order == "BGRA":
        return pixels[:, :, 2::-1].copy()
    return pixels.copy()
