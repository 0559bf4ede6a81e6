"""`python3 -m manipulation_policy.policy_server`: the HTTP policy server (GPU host side).

Loads one backend, then serves it with uvicorn:
GET /health, POST /infer, GET /info, GET /metrics, GET /docs and /openapi.json.
Model options fall back to environment variables (OPENVLA_MODEL, OPENVLA_UNNORM_KEY,
...; see --help). With an API key (--api-key-file or MANIPULATION_POLICY_API_KEY),
every path but /health, /docs and /openapi.json needs ``Authorization: Bearer <key>``
(/metrics too: Prometheus can send one). Observations that arrive together are
predicted together, up to --max-batch-size per model call, collected for at most
--batch-window-ms (only while other requests are on their way; 1 turns batching
off); past --max-queue waiting requests the server answers 503 with Retry-After.
SIGTERM or Ctrl-C stops taking connections and lets requests in flight finish.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE
from .errors import BackendStartupError
from .imaging import DEFAULT_MAX_IMAGE_PIXELS
from .server_app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, ServerConfig
from .server_auth import API_KEY_ENV, ApiKeyError, load_api_key

PROG = "policy_server"

# CLI flag -> (backend keyword, type, environment variables). Only set options are passed
# on. The second variable names are those of the original remote-server guide.
MODEL_OPTIONS: dict[str, tuple[str, type, tuple[str, ...]]] = {
    "--model": ("model", str, ("OPENVLA_MODEL", "OPENVLA_MODEL_ID")),
    "--unnorm-key": ("unnorm_key", str, ("OPENVLA_UNNORM_KEY",)),
    "--device": ("device", str, ("OPENVLA_DEVICE",)),
    "--dtype": ("dtype", str, ("OPENVLA_DTYPE",)),
    "--quantization": ("quantization", str, ("OPENVLA_QUANTIZATION",)),
    "--lora-adapter": ("lora_adapter", str, ("OPENVLA_LORA_ADAPTER",)),
    "--attn-implementation": (
        "attn_implementation",
        str,
        ("OPENVLA_ATTN_IMPLEMENTATION", "OPENVLA_ATTENTION_IMPL"),
    ),
    "--gripper-convention": ("gripper_convention", str, ("OPENVLA_GRIPPER_CONVENTION",)),
    "--position-scale": (
        "position_scale",
        float,
        ("OPENVLA_POSITION_SCALE", "OPENVLA_XYZ_SCALING"),
    ),
    "--rotation-scale": (
        "rotation_scale",
        float,
        ("OPENVLA_ROTATION_SCALE", "OPENVLA_ROTATION_SCALING"),
    ),
    "--max-position-step": ("max_position_step", float, ("OPENVLA_MAX_POSITION_STEP",)),
    "--max-rotation-step": ("max_rotation_step", float, ("OPENVLA_MAX_ROTATION_STEP",)),
}
UNSET_VALUES = ("", "none")


class StartupError(Exception):
    """A configuration or backend problem that stops the server before it listens."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n", 1)[1], formatter_class=_HelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="TCP port to listen on")
    parser.add_argument(
        "--backend",
        default=os.environ.get("MANIPULATION_POLICY_BACKEND", "stub"),
        help="stub | openvla | module.path:ClassName (a class on PYTHONPATH)",
    )
    model = parser.add_argument_group("model options (passed to the backend when set)")
    for flag, (_keyword, kind, env_names) in MODEL_OPTIONS.items():
        model.add_argument(
            flag, type=kind, default=None, help=f"openvla: env {' or '.join(env_names)}"
        )
    model.add_argument(
        "--skip-image-sensitivity-check",
        action="store_true",
        help="skip the backend's load-time check that its answer depends on the image",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--api-key-file", default=None, help=f"file holding the bearer key (or env {API_KEY_ENV})"
    )
    serving.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    serving.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait behind the running prediction before 503",
    )
    serving.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    serving.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="most observations predicted together in one model call (1: one at a time)",
    )
    serving.add_argument(
        "--batch-window-ms",
        type=float,
        default=DEFAULT_BATCH_WINDOW_MS,
        help="longest wait for more observations to join a batch, while others are on "
        "their way (a lone request never waits)",
    )
    serving.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds requests in flight get to finish after SIGTERM",
    )
    serving.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serving.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="log requests"
    )
    return parser


def backend_options(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Backend keyword arguments from flags, else (for openvla) the OPENVLA_* environment;
    unset and empty ones omitted."""
    use_environ = args.backend == "openvla"
    options: dict[str, Any] = {}
    for flag, (keyword, kind, env_names) in MODEL_OPTIONS.items():
        value = getattr(args, keyword)
        if value is None:
            if not use_environ:
                continue
            env_name, text = next(
                ((name, environ[name].strip()) for name in env_names if name in environ),
                ("", ""),
            )
            if text.lower() in UNSET_VALUES:
                continue
            try:
                value = kind(text)
            except ValueError:
                raise StartupError(f"{env_name}={text!r} is not a valid {flag} value") from None
        elif isinstance(value, str) and value.strip().lower() in UNSET_VALUES:
            continue
        options[keyword] = value
    if args.skip_image_sensitivity_check:
        options["check_image_sensitivity"] = False
    return options


def build_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    try:
        api_key = load_api_key(args.api_key_file, environ)
        return ServerConfig(
            max_body_bytes=args.max_body_bytes,
            max_queue=args.max_queue,
            max_image_pixels=args.max_image_pixels,
            api_key=api_key,
            max_batch_size=args.max_batch_size,
            batch_window_ms=args.batch_window_ms,
        )
    except (ApiKeyError, ValueError) as exc:
        raise StartupError(str(exc)) from None


def load_backend(name: str, options: dict[str, Any]):
    from .backends import UnknownBackendError, create_backend

    try:
        return create_backend(name, **options)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        if not isinstance(exc, (BackendStartupError, UnknownBackendError)):
            reason = f"{type(exc).__name__}: {reason}"  # unexpected: the type helps
        raise StartupError(f"cannot load backend {name!r}: {reason}") from exc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    try:
        config = build_config(args, os.environ)
        options = backend_options(args, os.environ)
        backend = load_backend(args.backend, options)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1

    import uvicorn

    from .server_app import create_app

    app = create_app(backend, config)
    logging.getLogger("manipulation_policy.policy_server").info(
        "backend %s ready; auth %s, max queue %d, max body %d bytes, max batch %d, "
        "batch window %g ms",
        args.backend,
        "on" if config.api_key else "off",
        config.max_queue,
        config.max_body_bytes,
        config.max_batch_size,
        config.batch_window_ms,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=args.graceful_timeout,
            server_header=False,
        )
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler
    # it found. With this no-op one there, `docker stop` or systemd see exit status 0 for
    # a clean stop. Set only now: while the model loads, SIGTERM still ends the process.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    # uvicorn returns after a clean shutdown, or when it could not bind the port.
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
