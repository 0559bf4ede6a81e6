"""Which torch device and dtype a model backend runs on, from its ``device`` and ``dtype``
options (``model_options``), the same for every backend (OpenVLA, LeRobot)."""

from __future__ import annotations

from typing import Any

import torch

from manipulation_policy.core.errors import BackendStartupError
from manipulation_policy.core.options import is_unset as _unset

DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_device(requested: Any, cuda_available: bool) -> str:
    name = "auto" if _unset(requested) else str(requested).strip().lower()
    if name == "auto":
        return "cuda" if cuda_available else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not cuda_available:
            raise BackendStartupError(
                f"device {requested!r} asked for, but CUDA is not available on this machine "
                "(use device 'auto' or 'cpu')"
            )
        return name
    raise BackendStartupError(
        f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}"
    )


def resolve_dtype(requested: Any, device: str, bf16_supported: bool) -> torch.dtype:
    """auto: bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU."""
    name = "auto" if _unset(requested) else str(requested).strip().lower()
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if bf16_supported else torch.float16
        return torch.float32
    if name not in DTYPE_NAMES:
        raise BackendStartupError(
            f"dtype must be 'auto' or one of {', '.join(DTYPE_NAMES)}, got {requested!r}"
        )
    return DTYPE_NAMES[name]
