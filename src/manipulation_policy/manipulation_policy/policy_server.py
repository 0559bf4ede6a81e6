"""`python3 -m manipulation_policy.policy_server`: the HTTP policy server (GPU host side).

Loads one backend, then serves it with uvicorn:
GET /health, POST /infer, GET /info, GET /metrics, GET /docs and /openapi.json.
Backend options are flags derived from each backend's declaration (its OPTIONS; a
module.path:ClassName backend's too, given with --backend), and fall back to the
variables the chosen backend declares (OPENVLA_MODEL, OPENVLA_UNNORM_KEY, ...; see
--help). Started without --backend but with OPENVLA_* variables set (as the
upstream MobileManipulationCore server is), it serves the openvla backend.
With an API key (--api-key-file or MANIPULATION_POLICY_API_KEY),
every path but /health, /docs and /openapi.json needs ``Authorization: Bearer <key>``
(/metrics too: Prometheus can send one). Observations that arrive together are
predicted together, up to --max-batch-size per model call, collected for at most
--batch-window-ms (only while other requests are on their way; 1 turns batching
off); past --max-queue waiting requests the server answers 503 with Retry-After.
With --model-instances N (or MANIPULATION_POLICY_MODEL_INSTANCES) the backend is
loaded N times, each instance on its own model thread: up to N predictions (or N
batches) run at once.
A model call (one prediction or one batch) past --inference-timeout is answered
504 to each of its requests; its instance serves nothing until the backend returns,
and when every instance is stuck /health answers 503 until one returns.
Each connection has a deadline while idle (--idle-timeout), for its headers
(--header-timeout) and for its body (--body-timeout); a body is read whole before
its request is admitted, at most --max-body-readers slow ones at once, and at most
--max-connections connections are kept (by default derived from the open-file limit;
past it the one idle the longest is closed).
SIGTERM or Ctrl-C stops taking connections and lets requests in flight finish,
for --graceful-timeout seconds at most.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from manipulation_policy.backends import (
    UnknownBackendError,
    backend_inputs,
    create_backend,
    declared_options,
    options_with,
)
from manipulation_policy.core import options as declarations
from manipulation_policy.core.api_key import API_KEY_ENV, ApiKeyUnusable
from manipulation_policy.core.errors import BackendStartupError
from manipulation_policy.core.imaging import DEFAULT_MAX_IMAGE_PIXELS
from manipulation_policy.server.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    MAX_BATCH_WINDOW_MS,
    ServerConfig,
)
from manipulation_policy.server.auth import load_api_key
from manipulation_policy.server.batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE
from manipulation_policy.server.connection_guard import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_BODY_READERS,
    MIN_DESCRIPTOR_RESERVE,
    connection_cap,
    open_descriptors,
)
from manipulation_policy.server.inference_worker import DEFAULT_DEADLINE_S
from manipulation_policy.server.model_slots import MAX_MODEL_INSTANCES

PROG = "policy_server"
BACKEND_ENV = "MANIPULATION_POLICY_BACKEND"
MODEL_INSTANCES_ENV = "MANIPULATION_POLICY_MODEL_INSTANCES"
INSTANCE_DEVICES_ENV = "MANIPULATION_POLICY_INSTANCE_DEVICES"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _option_flag_type(option: declarations.Option):
    """argparse type of a backend option's flag: its own parse (None: unset), its words."""

    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text[:60]!r}: {exc}") from None

    parse.__name__ = option.kind.__name__ if option.kind is not declarations.Bounds else (
        "'lower,upper'")
    return parse


# Upstream variables this server does not implement: named in a warning when set.
UNSUPPORTED_ENVIRONMENT = {
    "OPENVLA_INCLUDE_JOINT_STATES_IN_PROMPT": "the prompt never carries joint states here",
}


# OPENVLA_* variables that are not server settings: the tests' and bench/'s pointer to
# the OpenVLA authors' remote code (`make test` exports it). They choose no backend.
NOT_SERVER_ENVIRONMENT = frozenset({"OPENVLA_HF_DIR"})


def choose_backend(flag: Optional[str], environ: Mapping[str, str]) -> tuple[str, str]:
    """(backend name, why): --backend, else MANIPULATION_POLICY_BACKEND, else openvla when
    any OPENVLA_* variable is set (upstream's server always serves OpenVLA), else stub."""
    if flag is not None and flag.strip():
        return flag, "--backend"
    if environ.get(BACKEND_ENV, "").strip():
        return environ[BACKEND_ENV].strip(), BACKEND_ENV
    openvla_vars = sorted(
        name
        for name, value in environ.items()
        if name.startswith("OPENVLA_") and value.strip() and name not in NOT_SERVER_ENVIRONMENT
    )
    if openvla_vars:
        return "openvla", f"no --backend, and {', '.join(openvla_vars)} set"
    return "stub", "the default"


def environment_warnings(environ: Mapping[str, str]) -> list[str]:
    return [
        f"{name} is set but not supported: {why}"
        for name, why in UNSUPPORTED_ENVIRONMENT.items()
        if environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")
    ]


# Upstream's attention variable: a preference with fallback, not a requirement.
UPSTREAM_ATTENTION_ENV = "OPENVLA_ATTENTION_IMPL"


class StartupError(Exception):
    """A configuration or backend problem that stops the server before it listens."""


class UsageError(StartupError):
    """A bad server setting given in the environment: refused as a bad flag is (exit 2)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "--position-bounds -0.1,0.1": argparse takes a value starting with "-" for a
        # flag unless it looks like a negative number; a negative "lower,upper" is one too.
        self._negative_number_matcher = re.compile(r"^-\d*\.?\d+([eE][-+]?\d+)?(,.*)?$")

    def error(self, message: str):
        """One line, not usage plus error: a bad value is refused in words that fit a log."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _cli_number(check: declarations.NumberRange, what: str):
    """An argparse type: a number ``check`` accepts, else one line saying why."""

    def parse(text: str):
        try:
            value = int(text.strip()) if check.integer else float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}") from None
        problem = check(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} ({what}): {problem}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _count(low: int, what: str):
    return _cli_number(declarations.NumberRange(low, math.inf, integer=True), what)


_instance_count = _cli_number(
    declarations.NumberRange(1, MAX_MODEL_INSTANCES, integer=True), "an instance count"
)


def model_instances(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """--model-instances, else MANIPULATION_POLICY_MODEL_INSTANCES, else 1."""
    if getattr(args, "model_instances", None) is not None:
        return args.model_instances
    text = environ.get(MODEL_INSTANCES_ENV, "")
    if not text.strip():
        return 1
    try:
        return _instance_count(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{MODEL_INSTANCES_ENV}: {exc}") from None


def instance_options(
    backend: str, options: dict[str, Any], count: int, devices_text: Optional[str]
) -> list[dict[str, Any]]:
    """Each model instance's backend options: ``options``, with ``device`` taken in turn
    from ``devices_text`` (comma-separated, e.g. ``cuda:0,cuda:1``) when one is given.
    StartupError (one line) for a device that is not one, more devices than instances,
    or a backend that has no ``device`` option."""
    if devices_text is None or not devices_text.strip():
        return [dict(options) for _ in range(count)]
    devices = [device.strip() for device in devices_text.split(",")]
    for device in devices:
        problem = declarations.device_name(device)
        if problem is not None:
            raise StartupError(f"--instance-devices: {device!r} {problem}")
    if len(devices) > count:
        raise StartupError(
            f"--instance-devices: {len(devices)} devices for {count} model instance(s) "
            "(--model-instances)"
        )
    try:
        has_device = any(option.name == "device" for option in declared_options(backend))
    except Exception:  # noqa: BLE001 - unknown or unimportable: loading it says why
        has_device = True
    if not has_device:
        raise StartupError(f"--instance-devices: backend {backend!r} has no device option")
    return [{**options, "device": devices[index % len(devices)]} for index in range(count)]


def backend_flag(argv: Optional[Sequence[str]]) -> str:
    """The --backend given in ``argv`` ("" if none), before the full parse: a plugin's
    options are flags too."""
    scout = argparse.ArgumentParser(add_help=False)
    scout.add_argument("--backend", default="")
    return scout.parse_known_args(argv)[0].backend or ""


def add_backend_option_flags(group: Any, backend: str = "") -> None:
    """One flag per option of the registered backends (and of ``backend`` when it is a
    plugin), and --skip-image-sensitivity-check: what ``backend_arguments`` reads. The
    replay command (manipulation_policy.replay) takes the same flags."""
    try:
        flag_options = options_with(backend)
    except Exception:  # noqa: BLE001 - a plugin that cannot be imported: loading says why
        flag_options = options_with("")
    for option in flag_options:
        # No default here: a flag not given leaves the option to the environment, else
        # to the backend, whose default is the same declaration's (named in the help).
        env = f"; env {' or '.join(option.env)}" if option.env else ""
        group.add_argument(
            option.flag,
            type=_option_flag_type(option),
            default=argparse.SUPPRESS,
            help=f"{option.help} Default {option.parameter_default!r}{env}",
        )
    group.add_argument(
        "--skip-image-sensitivity-check",
        action="store_true",
        help="skip the backend's load-time check that its answer depends on the image",
    )


def build_parser(backend: str = "") -> argparse.ArgumentParser:
    """The server's flags: its own, and one per option of the registered backends and,
    when ``backend`` is a module.path:ClassName plugin, of the plugin."""
    parser = _Parser(
        prog=PROG, description=__doc__.split("\n", 1)[1], formatter_class=_HelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=_cli_number(declarations.NumberRange(1, 65535, integer=True), "a TCP port"),
        default=5000,
        help="TCP port to listen on (1-65535)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="stub | openvla | module.path:ClassName (a class on PYTHONPATH); default: env "
        f"{BACKEND_ENV}, else openvla when any OPENVLA_* variable is set, else stub",
    )
    model = parser.add_argument_group("backend options (passed to the backend when set)")
    add_backend_option_flags(model, backend)
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--api-key-file", default=None, help=f"file holding the bearer key (or env {API_KEY_ENV})"
    )
    serving.add_argument(
        "--max-body-bytes",
        type=_count(1, "a byte count"),
        default=DEFAULT_MAX_BODY_BYTES,
    )
    serving.add_argument(
        "--max-queue",
        type=_count(0, "a request count"),
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait behind the running predictions (one per model "
        "instance) before 503",
    )
    serving.add_argument(
        "--model-instances",
        type=_instance_count,
        default=None,
        help=f"backend instances, each loaded on its own (N copies of the weights) and "
        f"run on its own model thread: up to N predictions or batches at once "
        f"(1-{MAX_MODEL_INSTANCES}; instances on one GPU share its compute). Default 1; "
        f"env {MODEL_INSTANCES_ENV}",
    )
    serving.add_argument(
        "--instance-devices",
        default=None,
        metavar="DEV[,DEV...]",
        help="the device of each model instance in turn, e.g. cuda:0,cuda:1 for one copy "
        "per GPU (instance i takes the (i mod count)-th; overrides --device). Default: "
        f"every instance on --device; env {INSTANCE_DEVICES_ENV}",
    )
    serving.add_argument(
        "--max-image-pixels",
        type=_count(1, "a pixel count"),
        default=DEFAULT_MAX_IMAGE_PIXELS,
    )
    serving.add_argument(
        "--inference-timeout",
        type=_cli_number(declarations.NumberRange(0.0, math.inf, low_open=True), "seconds"),
        default=DEFAULT_DEADLINE_S,
        help="deadline of one prediction: past it the request gets 504, and /health "
        "answers 503 until the backend returns",
    )
    serving.add_argument(
        "--max-batch-size",
        type=_count(1, "an observation count"),
        default=DEFAULT_MAX_BATCH_SIZE,
        help="most observations predicted together in one model call (1: one at a time)",
    )
    serving.add_argument(
        "--batch-window-ms",
        type=_cli_number(declarations.NumberRange(0.0, MAX_BATCH_WINDOW_MS), "milliseconds"),
        default=DEFAULT_BATCH_WINDOW_MS,
        help="longest wait for more observations to join a batch, while others are on "
        "their way (a lone request never waits)",
    )
    serving.add_argument(
        "--graceful-timeout",
        type=_cli_number(declarations.NumberRange(0.0, math.inf), "seconds"),
        default=30.0,
        help="seconds requests in flight get to finish after SIGTERM; the process "
        "exits by then whatever the backend does",
    )
    seconds = _cli_number(declarations.NumberRange(0.0, 3600.0, low_open=True), "seconds")
    connections = parser.add_argument_group("connections (slow, idle and surplus clients)")
    connections.add_argument(
        "--idle-timeout",
        type=seconds,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="a connection with no request under way is closed after this long (behind "
        "a load balancer that keeps connections, set it above the balancer's idle timeout)",
    )
    connections.add_argument(
        "--header-timeout",
        type=seconds,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="a request's headers must be complete this long after its first byte, else "
        "408 and the connection is closed",
    )
    connections.add_argument(
        "--body-timeout",
        type=seconds,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="a request's body must be complete this long after its headers, else 408 "
        "and the connection is closed; a request holds no place in the model's queue "
        "before its body is in",
    )
    connections.add_argument(
        "--body-min-rate",
        type=_cli_number(declarations.NumberRange(0.0, 1e12), "bytes per second"),
        default=0.0,
        help="a body holding a reader place must arrive at this average rate or more "
        "(checked each second), else 408; 0: no minimum",
    )
    connections.add_argument(
        "--max-body-readers",
        type=_count(1, "a request count"),
        default=DEFAULT_MAX_BODY_READERS,
        help="slow request bodies that may be arriving at once (one complete within 1 s "
        "of its headers and under 256 KiB needs no place); past it 503 with Retry-After",
    )
    connections.add_argument(
        "--max-connections",
        type=_count(0, "a connection count"),
        default=0,
        help="connections kept open; past it the one idle the longest is closed. 0: "
        "derived from the open-file limit, keeping descriptors free for the server itself",
    )
    serving.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    serving.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="log requests"
    )
    return parser


def backend_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Backend keyword arguments from flags, else from the environment variables the
    chosen backend declares; options not given, and those given as unset (empty /
    none), are omitted."""
    chosen = choose_backend(args.backend, environ)[0]
    try:
        from_env = {option.name for option in declared_options(chosen)}
        flag_options = options_with(chosen)
    except Exception:  # noqa: BLE001 - unknown, or a plugin that cannot be imported:
        from_env, flag_options = set(), options_with("")  # loading it says why
    by_name = {option.name: option for option in flag_options}
    options: dict[str, Any] = {}
    for option in flag_options:
        value = getattr(args, option.name, None)
        if value is None and option.name in from_env:
            env_name, text = declarations.from_environment(option, environ)
            if env_name:
                try:
                    value = option.parse(text)
                except ValueError as exc:
                    raise StartupError(
                        f"{env_name}={text!r} is not a valid {option.flag} value ({exc})"
                    ) from None
        if value is not None:
            options[option.name] = value
    if (
        getattr(args, "attn_implementation", None) is None
        and "attn_implementation" in from_env
        and declarations.from_environment(by_name["attn_implementation"], environ)[0]
        == UPSTREAM_ATTENTION_ENV
        and options.get("attn_implementation") == "flash_attention_2"
    ):
        # Upstream's variable names a preference: flash-attention when it loads, else the
        # model's default. "auto" tries flash_attention_2 first on CUDA, then sdpa, eager.
        logging.getLogger("manipulation_policy.policy_server").warning(
            "%s=flash_attention_2 taken as upstream does: flash-attention when it loads, "
            "else sdpa, else eager (set --attn-implementation flash_attention_2 to require it)",
            UPSTREAM_ATTENTION_ENV,
        )
        options["attn_implementation"] = "auto"
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
            inference_timeout_s=args.inference_timeout,
            max_batch_size=args.max_batch_size,
            batch_window_ms=args.batch_window_ms,
            model_instances=model_instances(args, environ),
            idle_timeout_s=args.idle_timeout,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            body_min_rate=args.body_min_rate,
            max_body_readers=args.max_body_readers,
        )
    except (ApiKeyUnusable, ValueError) as exc:
        raise StartupError(str(exc)) from None


def load_backend(name: str, options: dict[str, Any], instance: int = 0, of: int = 1):
    """The backend ``name`` with ``options``, checked; ``instance`` of ``of`` model
    instances (named in the error when there are several)."""
    try:
        backend = create_backend(name, **options)
        backend_inputs(backend)  # a declaration the server cannot read fails here, not later
        return backend
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        if not isinstance(exc, (BackendStartupError, UnknownBackendError)):
            reason = f"{type(exc).__name__}: {reason}"  # unexpected: the type helps
        which = f" (instance {instance + 1} of {of})" if of > 1 else ""
        raise StartupError(f"cannot load backend {name!r}{which}: {reason}") from exc


def load_backends(name: str, options: Sequence[dict[str, Any]]) -> list[Any]:
    """One independent instance of the backend per entry of ``options`` (its options),
    each loaded as one is."""
    log = logging.getLogger("manipulation_policy.policy_server")
    backends = []
    count = len(options)
    for index, instance in enumerate(options):
        if count > 1:
            where = f" on {instance['device']}" if "device" in instance else ""
            log.info("loading model instance %d of %d%s", index + 1, count, where)
        backends.append(load_backend(name, instance, index, count))
    return backends


def raise_open_file_limit() -> None:
    """Soft limit up to the hard one: each connection is a file descriptor."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass  # not fatal: the server runs with the limit it has


def open_file_limit() -> Optional[int]:
    """The soft open-file limit, None when unlimited or unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def with_connection_cap(config: ServerConfig, requested: int) -> ServerConfig:
    """``config`` with its connection cap: ``requested``, or derived from the open-file
    limit when 0; refused when the limit leaves no room for it."""
    limit = open_file_limit()
    cap: Optional[int] = requested or None
    if limit is not None:
        in_use = open_descriptors()
        cap = requested or connection_cap(limit, in_use)
        room = limit - in_use - MIN_DESCRIPTOR_RESERVE
        if cap > room:
            raise StartupError(
                f"--max-connections {cap} leaves no room under the open-file limit "
                f"{limit} ({in_use} in use, {MIN_DESCRIPTOR_RESERVE} kept free): "
                f"use at most {max(room, 0)}, or raise the limit (ulimit -n)"
            )
    readers = config.max_body_readers
    if not requested and cap is not None and cap <= readers:
        # A derived cap under a low limit: fewer reader places, not a refusal to start.
        readers = max(1, cap // 2)
        logging.getLogger("manipulation_policy.policy_server").warning(
            "the open-file limit %d allows %d connections: %d body readers instead of %d",
            limit, cap, readers, config.max_body_readers,
        )  # fmt: skip
    try:
        return dataclasses.replace(config, max_connections=cap, max_body_readers=readers)
    except ValueError as exc:
        raise StartupError(f"--max-connections: {exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while the model loads, or after a Ctrl-C stop: one line, the shell's code.
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser(backend_flag(argv)).parse_args(argv)
    try:
        # Before anything is logged: a bad variable is one line, as a bad flag is.
        args.model_instances = model_instances(args, os.environ)
    except UsageError as exc:
        print(f"{PROG}: error: {exc} (see --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    startup_log = logging.getLogger("manipulation_policy.policy_server")
    args.backend, why = choose_backend(args.backend, os.environ)
    if why != "--backend":
        startup_log.info("backend %s (%s)", args.backend, why)
    for warning in environment_warnings(os.environ):
        startup_log.warning(warning)
    try:
        config = build_config(args, os.environ)
        options = backend_arguments(args, os.environ)
        devices = args.instance_devices
        if devices is None:
            devices = os.environ.get(INSTANCE_DEVICES_ENV)
        backends = load_backends(
            args.backend,
            instance_options(args.backend, options, config.model_instances, devices),
        )
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1

    import uvicorn

    from manipulation_policy.server import log_limits as server_logging
    from manipulation_policy.server.app import create_app
    from manipulation_policy.server.http_protocol import guarded_protocol
    from manipulation_policy.server.reports import uvicorn_implementations

    raise_open_file_limit()
    try:
        config = with_connection_cap(config, args.max_connections)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    app = create_app(backends, config)
    startup_log.info(
        "backend %s ready%s; auth %s, max queue %d, max body %d bytes, max batch %d, "
        "batch window %g ms, max connections %s",
        args.backend,
        f" ({config.model_instances} model instances)" if config.model_instances > 1 else "",
        "on" if config.api_key else "off",
        config.max_queue,
        config.max_body_bytes,
        config.max_batch_size,
        config.batch_window_ms,
        config.max_connections,
    )
    implementations = uvicorn_implementations()
    if implementations["http"] == "httptools":
        implementations["http"] = guarded_protocol(
            app.state.connection_guard, config.retry_after_s
        )
    else:
        startup_log.warning(
            "httptools is not installed: no connection cap, and no header or body deadline "
            "(pip install httptools)"
        )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=args.graceful_timeout,
            timeout_keep_alive=config.idle_timeout_s,
            server_header=False,
            **implementations,
        )
    )
    server_logging.install()  # after uvicorn.Config, which configures its loggers
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler
    # it found. With this no-op one there, `docker stop` or systemd see exit status 0 for
    # a clean stop. Set only now: while the model loads, SIGTERM still ends the process.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    # uvicorn returns after a clean shutdown, or when it could not bind the port.
    code = 0 if server.started else 1
    if app.state.worker.busy:
        # A prediction that never returns, or a thread the backend started, must not hold
        # the process past --graceful-timeout: leave without the interpreter's teardown.
        logging.getLogger("manipulation_policy.policy_server").error(
            "a prediction is still running; exiting without waiting for it"
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
