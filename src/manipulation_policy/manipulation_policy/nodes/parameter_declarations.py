"""ROS side of node_parameters: descriptors with types and ranges, doubles kept doubles.

Each spec becomes a statically typed parameter (its default's type) whose
descriptor carries the spec's numeric range, so ``ros2 param describe``
shows it, and ``read_only`` for a parameter read at start.

``ros2 param set /node remote_timeout_sec 2`` and a params file saying
``remote_timeout_sec: 2`` offer an integer. Stored as given it would be an
integer for every later reader (``ros2 param get``, other nodes' parameter
clients, the node itself), so ``as_declared_type`` makes it a double before
rclpy sees it. Humble's rclpy has no pre-set callback, so the node calls it
from its own ``set_parameters``/``set_parameters_atomically`` (the parameter
services call those) and on its start values before declaring.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from manipulation_policy.robot.node_parameters import ParameterSpec

_TYPES = {
    bool: Parameter.Type.BOOL,
    int: Parameter.Type.INTEGER,
    float: Parameter.Type.DOUBLE,
    str: Parameter.Type.STRING,
}
_ARRAY_TYPES = {
    float: Parameter.Type.DOUBLE_ARRAY,
    str: Parameter.Type.STRING_ARRAY,
}
READ_AT_START_NOTE = " (read at start; restart to change)"


def parameter_type(spec: ParameterSpec) -> Parameter.Type:
    if spec.item_type is not None:
        return _ARRAY_TYPES[spec.item_type]
    return _TYPES[type(spec.default)]


def descriptor_for(spec: ParameterSpec) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(
        name=spec.name,
        description=spec.description + ("" if spec.live else READ_AT_START_NOTE),
        read_only=not spec.live,
    )
    if spec.item_type is not None and not spec.default:
        # rclpy infers a declared parameter's type from its default, and an empty list
        # has none it can tell: typed by the spec's check instead.
        descriptor.dynamic_typing = True
    else:
        descriptor.type = parameter_type(spec).value
    bounds = spec.number_range
    if bounds is not None:
        # rclpy checks the range with inclusive ends; a spec's open lower end (> 0) is
        # enforced by its check, which the node asks first, and is spelled out here.
        descriptor.additional_constraints = bounds.describe()
        if bounds.integer:
            descriptor.integer_range = [
                IntegerRange(from_value=int(bounds.low), to_value=int(bounds.high), step=0)
            ]
        else:
            high = bounds.high if math.isfinite(bounds.high) else sys.float_info.max
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(bounds.low), to_value=float(high), step=0.0)
            ]
    return descriptor


def as_declared_type(spec: Optional[ParameterSpec], parameter: Parameter) -> Parameter:
    """``parameter`` with an integer value turned into a double when ``spec`` is a double
    (integers into doubles for a double array)."""
    if spec is None:
        return parameter
    declared = parameter_type(spec)
    if parameter.type_ is Parameter.Type.INTEGER and declared is Parameter.Type.DOUBLE:
        return Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
    if (parameter.type_ is Parameter.Type.INTEGER_ARRAY
            and declared is Parameter.Type.DOUBLE_ARRAY):
        return Parameter(parameter.name, Parameter.Type.DOUBLE_ARRAY,
                         [float(v) for v in parameter.value])
    return parameter


def parameter_problem(spec: Optional[ParameterSpec], value: Any, started: bool) -> Optional[str]:
    """Why the node refuses ``value`` for ``spec`` ("name: problem"), in words a user can
    act on, before rclpy's own checks would answer with less telling ones; None: no
    objection (rclpy's checks still follow)."""
    if spec is None:
        return None
    if started and not spec.live:
        return f"{spec.name} is read-only: it is read at start; restart the node to change it"
    problem = spec.problem(value)
    return None if problem is None else f"{spec.name} {problem}"
