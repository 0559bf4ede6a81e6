"""What /info reports about the process: GPU memory and the runtime serving requests."""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import Any, Optional

try:  # a compiled JSON codec: strict RFC 8259 parsing, ~10x faster encoding
    import orjson
except ImportError:  # pragma: no cover - requirements install it; json still works
    orjson = None


def gpu_memory_report() -> Optional[dict[str, Any]]:
    """CUDA memory of the current device, when the backend has loaded torch with CUDA."""
    torch = sys.modules.get("torch")  # never import torch just to report on it
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        return {
            "device": torch.cuda.get_device_name(device),
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "free_bytes": int(free),
            "total_bytes": int(total),
        }
    except Exception as exc:  # noqa: BLE001 - a report must not fail the endpoint
        return {"error": f"{type(exc).__name__}: {exc}"}


def uvicorn_implementations() -> dict[str, str]:
    """uvicorn's ``loop`` and ``http`` settings: its compiled event loop (uvloop) and
    HTTP parser (httptools) when installed, else asyncio's loop and the pure-Python h11.
    The same choice as uvicorn's "auto", made explicit so that /info can tell it."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def runtime_report(loop_type: Optional[type]) -> dict[str, str]:
    """What serves the requests (/info): Python, the event loop and HTTP parser, JSON codec."""
    return {
        "python": platform.python_version(),
        "event_loop": f"{loop_type.__module__}.{loop_type.__qualname__}" if loop_type else "",
        "http_parser": uvicorn_implementations()["http"],
        "json": f"orjson {orjson.__version__}" if orjson is not None else "json",
    }
