"""The policy node's parameters, the ROS side: declaration (the nodes' own, upstream's
names, a plugin's options), start values checked as declared, live changes checked
before rclpy takes them, and the snapshot the other parts read.

What the parameters are and when a value is refused is ROS-free
(``robot/node_parameters.py``); ``parameter_declarations.py`` turns a spec into
rclpy's descriptor and types. This mixin of ``PolicyNodeBase`` owns ``_specs`` and
``_values`` (under ``_values_lock``); what an accepted change sets in motion is the
node's ``_react_to``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterValueException
from rclpy.parameter import Parameter

from manipulation_policy.nodes.parameter_declarations import (
    as_declared_type,
    descriptor_for,
    parameter_problem,
)
from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    UPSTREAM_PARAMETER_NAMES,
    ParameterSpec,
    UpstreamParameters,
    changes_problem,
    resolve_upstream_parameters,
    specs_by_name,
)


class SecretParameterRefused(ValueError):
    """A start value of a secret parameter is refused; the message never holds the value
    (rclpy's InvalidParameterValueException would print it)."""


class NodeParameters:
    """Parameter declaration and checks of ``PolicyNodeBase`` (a mixin before ``Node``)."""

    def _declare_parameters(self, extra_parameters: Sequence[ParameterSpec]) -> UpstreamParameters:
        """Declare the common and ``extra_parameters``, start values checked; the
        upstream names given at start, resolved."""
        self._specs = specs_by_name(COMMON_PARAMETERS, extra_parameters)
        self._values_lock = threading.Lock()
        self._values: dict[str, Any] = {}
        # Registered before declaring, so invalid start values are refused too.
        self.add_on_set_parameters_callback(self._on_set_parameters)
        upstream = self._declare_upstream_parameters()
        self._prepare_start_values()
        for spec in self._specs.values():
            self.declare_parameter(
                spec.name, upstream.defaults.get(spec.name, spec.default), descriptor_for(spec)
            )
        with self._values_lock:
            self._values = {
                name: spec.normalized(self.get_parameter(name).value)
                for name, spec in self._specs.items()
            }
        for note in upstream.notes:
            self.get_logger().warning(note)
        return upstream

    def declare_optional_start_parameters(
        self, names: Iterable[str], description: str
    ) -> dict[str, Any]:
        """Declare ``names`` unset, of any type and read-only; the ones given at start."""
        given = {}
        for name in names:
            value = self.declare_parameter(
                name,
                None,
                ParameterDescriptor(description=description, dynamic_typing=True, read_only=True),
            ).value
            if value is not None:
                given[name] = value
        return given

    def _declare_upstream_parameters(self) -> UpstreamParameters:
        """Declare upstream MobileManipulationCore's parameter names (unset by default,
        read-only) and say what the ones given mean here."""
        given = self.declare_optional_start_parameters(
            UPSTREAM_PARAMETER_NAMES,
            "upstream MobileManipulationCore name, deprecated (read at start)",
        )
        return resolve_upstream_parameters(given, remote=self.remote)

    def declare_start_parameters(self, specs: Sequence[ParameterSpec]) -> None:
        """Declare those of ``specs`` not declared yet (a plugin backend's options, known
        once ``backend`` is read), their start values checked as the others' are."""
        added = {spec.name: spec for spec in specs if spec.name not in self._specs}
        self._specs.update(added)
        self._prepare_start_values(added)
        for spec in added.values():
            self.declare_parameter(spec.name, spec.default, descriptor_for(spec))
        with self._values_lock:
            self._values.update({
                name: spec.normalized(self.get_parameter(name).value)
                for name, spec in added.items()
            })

    def _prepare_start_values(self, specs: Optional[dict[str, ParameterSpec]] = None) -> None:
        """Start values (parameter_overrides, -p, params files) as declared: an integer for
        a double becomes a double; a bad one stops the node with the spec's reason, not
        rclpy's "wrong parameter type". rclpy keeps them in ``_parameter_overrides`` from
        Humble on; declaring reads them there."""
        overrides = getattr(self, "_parameter_overrides", None)
        if not isinstance(overrides, dict):
            return
        for name, spec in (self._specs if specs is None else specs).items():
            given = overrides.get(name)
            if given is None:
                continue
            if given.type_ is Parameter.Type.NOT_SET and spec.item_type is not None:
                del overrides[name]  # rcl reads a YAML [] as not set: the (empty) default
                continue
            given = as_declared_type(spec, given)
            problem = parameter_problem(spec, given.value, started=False)
            if problem is not None and spec.secret:
                overrides.pop(name)  # the value goes nowhere, not even into a traceback
                raise SecretParameterRefused(
                    f"parameter {name} refused at start: {problem}. {spec.description}"
                )
            if problem is not None:
                raise InvalidParameterValueException(name, given.value, problem)
            overrides[name] = given

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        return [self.set_parameters_atomically([parameter]) for parameter in parameter_list]

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """rclpy's, with integers for doubles made doubles and the specs asked first.

        The parameter services (``ros2 param set``, parameter clients) call this too."""
        # getattr: rclpy's Node.__init__ may set parameters before ours has run.
        specs, started = getattr(self, "_specs", {}), getattr(self, "_ready", False)
        parameters = [as_declared_type(specs.get(p.name), p) for p in parameter_list]
        for parameter in parameters:
            problem = parameter_problem(specs.get(parameter.name), parameter.value, started)
            if problem is not None:
                self.get_logger().warning(f"refused parameter change: {problem}")
                return SetParametersResult(successful=False, reason=problem)
        return super().set_parameters_atomically(parameters)

    def parameter_values(self) -> dict[str, Any]:
        """A snapshot of the current values of this node's parameters."""
        with self._values_lock:
            return dict(self._values)

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        changes = {p.name: p.value for p in parameters if p.name in self._specs}
        problem = changes_problem(self._specs, changes, self.parameter_values())
        changes = {name: self._specs[name].normalized(value) for name, value in changes.items()}
        if problem is not None:
            if self._ready:
                self.get_logger().warning(f"refused parameter change: {problem}")
            return SetParametersResult(successful=False, reason=problem)
        if self._ready and changes:
            self._apply(changes)
        return SetParametersResult(successful=True)

    def _apply(self, changes: dict[str, Any]) -> None:
        with self._values_lock:
            self._values.update(changes)
        self._react_to(changes)
        shown = {k: ("***" if self._specs[k].secret and v else v) for k, v in changes.items()}
        self.get_logger().info(f"parameters changed: {shown}")
        self.parameters_changed(changes)
