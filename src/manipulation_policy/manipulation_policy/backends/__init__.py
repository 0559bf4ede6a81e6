"""Policy backends, chosen by name.

A backend is a small class with ``predict(observation) -> PolicyAction`` and
``describe() -> dict``. Adding a model means adding one module and one line
in ``BACKEND_MODULES``; the module is imported only when its backend is
chosen, so the stub needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from ..policy_types import Observation, PolicyAction


class PolicyBackend(Protocol):
    name: str

    def predict(self, observation: Observation) -> PolicyAction: ...

    def describe(self) -> dict[str, Any]: ...


# backend name -> "module:ClassName" relative to this package
BACKEND_MODULES = {
    "stub": "stub:StubBackend",
    "openvla": "openvla:OpenVLABackend",
}


class UnknownBackendError(ValueError):
    pass


def create_backend(name: str, **options: Any) -> PolicyBackend:
    """Build the backend called ``name``; options go to its constructor."""
    target = BACKEND_MODULES.get(name)
    if target is None:
        raise UnknownBackendError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKEND_MODULES))}"
        )
    module_name, class_name = target.split(":")
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, class_name)(**options)
