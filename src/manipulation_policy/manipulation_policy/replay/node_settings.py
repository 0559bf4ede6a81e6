"""The parameter values of the node being replayed: its defaults, then a params file
(read with rcl's section rules by the bringup's ``launch_logic``), then ``-p`` flags.
Every value passes the node's own checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import yaml

from manipulation_policy.replay.errors import ReplayInputError
from manipulation_policy.robot.camera_inputs import camera_parameters_problem
from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    REMOTE_NODE_PARAMETERS,
    ParameterSpec,
    guard_values_problem,
    policy_node_parameters,
    specs_by_name,
)

LOCAL_NODE = "policy_node"
REMOTE_NODE = "remote_policy_node"


def node_specs(node: str, backend: str = "") -> dict[str, ParameterSpec]:
    extra = REMOTE_NODE_PARAMETERS if node == REMOTE_NODE else policy_node_parameters(backend)
    return specs_by_name(COMMON_PARAMETERS, extra)


def params_file_values(path: str, node: str, namespace: str, backend: str) -> dict[str, Any]:
    """What ``path`` gives ``node`` in ``namespace``, checked as the launch file checks it."""
    try:
        from manipulation_bringup.launch_logic import ParamsFileError, node_parameters_from_file
    except ImportError:
        raise ReplayInputError(
            "--params-file needs the manipulation_bringup package (a sourced workspace, or "
            "pip install --no-deps ./src/manipulation_bringup)"
        ) from None
    try:
        return dict(node_parameters_from_file(path, node, namespace, backend).parameters)
    except ParamsFileError as exc:
        raise ReplayInputError(str(exc)) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``name=value`` (or ROS's ``name:=value``), the value read as YAML, as ros2 does."""
    name, separator, value = text.replace(":=", "=", 1).partition("=")
    if not separator or not name.strip():
        raise ReplayInputError(f"-p {text!r}: expected NAME=VALUE")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return name.strip(), value


def node_values(
    node: str,
    backend: str = "",
    params_file: Optional[str] = None,
    namespace: str = "",
    overrides: Mapping[str, Any] = {},  # noqa: B006 - read only
) -> dict[str, Any]:
    """Defaults, then the params file, then ``overrides``; each checked by its spec."""
    specs = node_specs(node, backend)
    values = {name: spec.default for name, spec in specs.items()}
    if params_file:
        values.update(params_file_values(params_file, node, namespace, backend))
    for name, value in overrides.items():
        spec = specs.get(name)
        if spec is None:
            raise ReplayInputError(f"{node} has no parameter {name!r}")
        problem = spec.problem(value)
        if problem is not None:
            raise ReplayInputError(f"parameter {name} {problem}")
        values[name] = spec.normalized(value)
    problem = guard_values_problem(values)
    if problem is not None:
        raise ReplayInputError(f"safety guard parameters: {problem}")
    problem = camera_parameters_problem(values)
    if problem is not None:
        raise ReplayInputError(problem)
    return values


def assignments(texts: Sequence[str]) -> dict[str, Any]:
    return dict(parse_assignment(text) for text in texts)
