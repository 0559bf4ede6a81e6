"""Policy backends, chosen by name.

A backend is a small class with ``predict(observation)`` and ``describe() -> dict``.
``predict`` answers a PolicyAction (a single-step model: a chunk of one) or an
ActionChunk (``policy_types``: up to MAX_CHUNK_LENGTH actions and the period
between them), plugins (``module:Class``) alike. A backend may add
``predict_batch(observations) -> list`` (one answer per observation, in order,
each equal to what ``predict`` gives it alone, an exception instance as the
answer of an observation that failed), which the server uses to predict
observations that arrive together at once (unless the backend's optional
``batches_observations`` attribute is false). An observation may carry the
robot's pending actions (real-time chunking); a backend that cannot use them
ignores them.
A backend answers the model's own steps: a delta target stays a delta even
when the observation carries ``eef_pose``; ``predictor`` / ``batch_predictor``,
which the server and the in-process node call, turn every answer into an
ActionChunk and compose its deltas with the current pose in one place
(``pose_math.compose_chunk_with_current_pose``: each target on the one before).
A backend class declares its options once, as ``OPTIONS`` (a tuple of
``core.options.Option``; none: ``()``), and takes them as keyword arguments. The
server's flags and environment variables, the policy node's parameters, the launch
arguments and the params-file check are derived from the declarations
(``declared_options``, ``registered_options``), plugins' (``module:Class``) included.
Adding a model means adding one module and one line in ``BACKEND_MODULES``;
the module is imported only when its backend is chosen, so the stub needs
neither torch nor transformers. A backend whose module imports heavy packages
names a light module holding its declaration in ``OPTION_MODULES``, so that
options can be listed without them (a test keeps the two the same object).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, Union

from manipulation_policy.core.errors import BackendStartupError
from manipulation_policy.core.options import Option
from manipulation_policy.core.policy_types import (
    ActionChunk,
    EefTargetMode,
    Observation,
    PolicyAction,
    PolicyInputs,
    Pose,
    as_chunk,
)
from manipulation_policy.core.pose_math import compose_chunk_with_current_pose

PolicyAnswer = Union[PolicyAction, ActionChunk]


class PolicyBackend(Protocol):
    name: str

    def predict(self, observation: Observation) -> PolicyAnswer: ...

    def describe(self) -> dict[str, Any]: ...


def backend_inputs(backend: Any) -> Optional[PolicyInputs]:
    """What ``backend`` declares it reads (its optional ``inputs()``), or None when it
    declares nothing; BackendStartupError when the declaration is unusable."""
    declare = getattr(backend, "inputs", None)
    if not callable(declare):
        return None
    inputs = declare()
    if not isinstance(inputs, PolicyInputs):
        raise BackendStartupError(
            f"inputs() returned {type(inputs).__name__}, not a PolicyInputs"
        )
    return inputs


def with_current_pose(answer: Any, observation: Observation) -> Any:
    """A backend's answer as an ActionChunk (a PolicyAction is a chunk of one), its delta
    eef targets made absolute when ``observation`` carries the current pose, each
    composed with the target before it. Anything that is not a well-typed answer (an
    exception, a wrong type, a non-finite number, a chunk built around its own checks)
    is passed on as the backend gave it, for the caller's own check of the answer to
    name."""
    try:
        chunk = as_chunk(answer)
    except (TypeError, ValueError):
        return answer
    if observation.eef_pose is None:
        return chunk
    try:
        if not _composable(chunk):
            return chunk
        return compose_chunk_with_current_pose(chunk, observation.eef_pose)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return chunk


def _composable(chunk: ActionChunk) -> bool:
    """Some action has a delta target, and every action is a PolicyAction whose target,
    if any, is a Pose."""
    actions = chunk.actions
    if not isinstance(actions, tuple) or not all(isinstance(a, PolicyAction) for a in actions):
        return False
    if not all(a.eef_target is None or type(a.eef_target) is Pose for a in actions):
        return False
    return any(
        a.eef_target is not None and a.eef_target_mode == EefTargetMode.DELTA for a in actions
    )


def predictor(backend: PolicyBackend) -> Callable[[Observation], Any]:
    """``backend.predict`` as the server and the in-process node call it: its answer an
    ActionChunk, delta targets composed with the observation's eef_pose
    (``with_current_pose``)."""
    predict = backend.predict

    def predict_with_current_pose(observation: Observation) -> Any:
        return with_current_pose(predict(observation), observation)

    return predict_with_current_pose


def batch_predictor(backend: PolicyBackend) -> Optional[Callable[[Sequence[Observation]], list]]:
    """``backend.predict_batch`` (None without one), each answer as ``predictor`` gives it."""
    predict_batch = getattr(backend, "predict_batch", None)
    if not callable(predict_batch):
        return None

    def predict_batch_with_current_pose(observations: Sequence[Observation]) -> list:
        answers = list(predict_batch(observations))
        if len(answers) != len(observations):
            return answers  # the caller refuses the batch for its length
        return [with_current_pose(a, o) for a, o in zip(answers, observations, strict=True)]

    return predict_batch_with_current_pose


# backend name -> "module:ClassName" relative to this package
BACKEND_MODULES = {
    "stub": "stub:StubBackend",
    "openvla": "openvla:OpenVLABackend",
    "lerobot": "lerobot:LeRobotBackend",
}


# backend name -> module (relative to this package) whose OPTIONS is the backend class's
# OPTIONS, for a backend module that imports torch & co.
OPTION_MODULES = {
    "openvla": "openvla_options",
    "lerobot": "lerobot_options",
}


# backend name -> the repository's requirements file that installs it, where it is not
# requirements.txt (LeRobot needs a transformers line OpenVLA's remote code refuses).
REQUIREMENTS_FILES = {
    "lerobot": "requirements-lerobot.txt",
}


class UnknownBackendError(ValueError):
    pass


def is_plugin(name: str) -> bool:
    """A ``module.path:ClassName`` spec rather than a registered name."""
    return ":" in name


def declared_options(name: str) -> tuple[Option, ...]:
    """The options backend ``name`` declares (``OPTIONS``; none: ``()``). A registered
    backend's are read without importing its model code; a plugin's class is imported.
    UnknownBackendError for a name that is neither."""
    if is_plugin(name):
        declared = getattr(_plugin_backend_class(name), "OPTIONS", ())
    else:
        target = BACKEND_MODULES.get(name)
        if target is None:
            raise UnknownBackendError(_unknown_backend(name))
        module_name, class_name = target.split(":")
        if name in OPTION_MODULES:
            module = importlib.import_module(f".{OPTION_MODULES[name]}", __name__)
            declared = module.OPTIONS
        else:
            backend_class = getattr(_backend_module(name, module_name), class_name)
            declared = getattr(backend_class, "OPTIONS", ())
    declared = tuple(declared)
    if not all(isinstance(option, Option) for option in declared):
        raise UnknownBackendError(f"backend {name!r}: OPTIONS must hold core.options.Option")
    return declared


def declares_options(name: str) -> bool:
    """Whether backend ``name`` declares its options (has ``OPTIONS``, empty or not)."""
    if not is_plugin(name):
        return name in BACKEND_MODULES
    return hasattr(_plugin_backend_class(name), "OPTIONS")


def registered_options() -> tuple[Option, ...]:
    """The options of every registered backend, in registration order, each once. Two
    backends may share an option name only by declaring the same Option."""
    seen: dict[str, Option] = {}
    for name in BACKEND_MODULES:
        for option in declared_options(name):
            if seen.setdefault(option.name, option) != option:
                raise UnknownBackendError(
                    f"backend {name!r} declares option {option.name!r} differently from "
                    "another backend"
                )
    return tuple(seen.values())


def options_with(name: str) -> tuple[Option, ...]:
    """The registered backends' options, and those of ``name`` when it is a plugin (after
    them; a plugin option named like a registered one is the registered one)."""
    options = registered_options()
    if not is_plugin(name):
        return options
    known = {option.name for option in options}
    return options + tuple(o for o in declared_options(name) if o.name not in known)


def _unknown_backend(name: str) -> str:
    return (
        f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKEND_MODULES))}"
        " or give module.path:ClassName"
    )


def create_backend(name: str, **options: Any) -> PolicyBackend:
    """Build the backend called ``name``; options go to its constructor.

    ``name`` is a registered name (``stub``, ``openvla``, ``lerobot``) or a plugin spec
    ``module.path:ClassName`` naming any importable class with the backend
    interface, e.g. a model kept outside this package, or a test double.
    """
    if is_plugin(name):
        return _plugin_backend_class(name)(**options)
    target = BACKEND_MODULES.get(name)
    if target is None:
        raise UnknownBackendError(_unknown_backend(name))
    module_name, class_name = target.split(":")
    return getattr(_backend_module(name, module_name), class_name)(**options)


def _backend_module(name: str, module_name: str) -> Any:
    try:
        module = importlib.import_module(f".{module_name}", __name__)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith(__name__.split(".")[0]):
            raise  # a module of this package is missing: a bug, not an install problem
        requirements = REQUIREMENTS_FILES.get(name, "requirements.txt")
        raise BackendStartupError(
            f"the {name} backend needs the Python package {exc.name!r}, which is not "
            f"installed; on a GPU host: pip install -r {requirements}"
        ) from None
    return module


def _plugin_backend_class(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise UnknownBackendError(f"backend spec {spec!r} is not module.path:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):
            raise  # the module exists but one of its own imports is missing
        raise UnknownBackendError(f"backend module {module_name!r} not found") from None
    backend_class = getattr(module, class_name, None)
    if not isinstance(backend_class, type):
        raise UnknownBackendError(f"module {module_name!r} has no class {class_name!r}")
    return backend_class
