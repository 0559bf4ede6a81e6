"""The options every model backend shares, declared once: ``model``, ``device``, ``dtype``.
Pure Python.

OpenVLA (``openvla_options``) and LeRobot (``lerobot_options``) declare these very
Option objects, so the server's ``--model`` / ``--device`` / ``--dtype``, the node's
parameters and the launch arguments are one each whichever backend is chosen
(``backends.registered_options`` refuses two backends that declare a name
differently). The environment variables keep the upstream server's ``OPENVLA_*``
names.
"""

from __future__ import annotations

from manipulation_policy.core.options import Option, choice, device_name, text_up_to

DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half", "float")
MAX_MODEL_NAME_CHARS = 1024

MODEL = Option("model", str, "openvla/openvla-7b",
               "Hugging Face model id or local checkpoint directory.",
               text_up_to(MAX_MODEL_NAME_CHARS), env=("OPENVLA_MODEL", "OPENVLA_MODEL_ID"),
               launch_argument=True)
DEVICE = Option("device", str, "auto", "Torch device: auto, cpu, cuda or cuda:N.",
                device_name, env=("OPENVLA_DEVICE",), launch_argument=True)
DTYPE = Option("dtype", str, "auto", "Model weights dtype: " + ", ".join(DTYPES) + ".",
               choice(DTYPES), env=("OPENVLA_DTYPE",), launch_argument=True)
