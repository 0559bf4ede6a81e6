"""The nodes' parameters through their real parameter services, as `ros2 param` uses them.

Another node's calls on the parameter services over DDS: an integer offered for a
double is stored as a double for every reader, descriptors carry types and
ranges, bad values and read-only parameters are refused with readable reasons.
"""

from __future__ import annotations

import math
import sys

import pytest
from node_harness import WAIT_SEC, Rig, wait_until
from parameter_services import ParameterServices
from rcl_interfaces.msg import ParameterType
from rclpy.exceptions import ParameterException
from rclpy.parameter import Parameter, parameter_value_to_python
from remote_harness import ScriptedPolicyServer

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.nodes.policy_node import PolicyNode
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    POLICY_NODE_PARAMETERS,
    REMOTE_NODE_PARAMETERS,
)


@pytest.fixture(scope="module")
def policy_server():
    """Asked only for its /health when a remote node configures: no camera frames here."""
    with ScriptedPolicyServer() as server:
        yield server


@pytest.fixture
def rig(policy_server):
    with Rig() as rig:
        rig.policy_url = policy_server.url
        yield rig


def remote_node(rig: Rig, **values) -> RemotePolicyNode:
    return rig.add(RemotePolicyNode(**rig.node_kwargs(remote_url=rig.policy_url, **values)))


def client(rig: Rig, node_name: str) -> ParameterServices:
    parameter_client = ParameterServices(rig.node, f"{rig.namespace}/{node_name}")
    assert parameter_client.wait_for_services(timeout_sec=WAIT_SEC)
    return parameter_client


def answer(future):
    assert wait_until(future.done), "no answer from the parameter service"
    return future.result()


def remote_value(parameter_client: ParameterServices, name: str):
    """(type, value) of ``name`` as another node reads it (`ros2 param get`)."""
    [value] = answer(parameter_client.get_parameters([name])).values
    return value.type, parameter_value_to_python(value)


@pytest.mark.parametrize("atomically", [False, True])
def test_an_integer_set_on_a_double_parameter_reads_back_as_a_double(rig, atomically):
    node = remote_node(rig)
    parameters = client(rig, "remote_policy_node")
    offered = [Parameter("remote_timeout_sec", value=2), Parameter("inference_rate", value=4)]
    if atomically:
        assert answer(parameters.set_parameters_atomically(offered)).result.successful
    else:
        assert all(r.successful for r in answer(parameters.set_parameters(offered)).results)

    for name, want in (("remote_timeout_sec", 2.0), ("inference_rate", 4.0)):
        kind, value = remote_value(parameters, name)
        assert kind == ParameterType.PARAMETER_DOUBLE and isinstance(value, float), (name, value)
        assert value == want
        assert node.get_parameter(name).type_ is Parameter.Type.DOUBLE
        assert isinstance(node.parameter_values()[name], float)
    assert node.action_source.client.settings.timeout_sec == 2.0
    assert node._timer.timer_period_ns == 250_000_000
    # The node's own calls get the same treatment.
    [result] = node.set_parameters([Parameter("max_observation_age_sec", value=1)])
    assert result.successful and node.get_parameter("max_observation_age_sec").value == 1.0
    assert node.get_parameter("max_observation_age_sec").type_ is Parameter.Type.DOUBLE


def test_integer_start_values_for_doubles_are_doubles(rig, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "/**:\n  ros__parameters:\n    remote_timeout_sec: 2\n    max_eef_step_m: 1\n"
    )
    node = rig.add(RemotePolicyNode(
        cli_args=["--ros-args", "--params-file", str(params)],
        **rig.node_kwargs(remote_url=rig.policy_url, inference_rate=8),
    ))  # fmt: skip
    parameters = client(rig, "remote_policy_node")
    for name, want in (("remote_timeout_sec", 2.0), ("max_eef_step_m", 1.0),
                       ("inference_rate", 8.0)):  # fmt: skip
        kind, value = remote_value(parameters, name)
        assert kind == ParameterType.PARAMETER_DOUBLE and value == want, (name, kind, value)
        assert node.get_parameter(name).type_ is Parameter.Type.DOUBLE
    # Integers stay integers.
    assert remote_value(parameters, "remote_retry_attempts") == (
        ParameterType.PARAMETER_INTEGER, 3)


def test_descriptors_show_types_ranges_and_read_only(rig):
    remote_node(rig)
    parameters = client(rig, "remote_policy_node")
    names = ["remote_timeout_sec", "jpeg_quality", "inference_rate", "camera_topic",
             "remote_fallback_on_failure", "max_steps"]  # fmt: skip
    described = {d.name: d for d in answer(parameters.describe_parameters(names)).descriptors}

    timeout = described["remote_timeout_sec"]
    assert timeout.type == ParameterType.PARAMETER_DOUBLE and not timeout.dynamic_typing
    [timeout_range] = timeout.floating_point_range
    assert (timeout_range.from_value, timeout_range.to_value) == (0.0, 300.0)
    assert "> 0" in timeout.additional_constraints and not timeout.read_only
    [rate_range] = described["inference_rate"].floating_point_range
    assert rate_range.to_value == 1000.0

    quality = described["jpeg_quality"]
    assert quality.type == ParameterType.PARAMETER_INTEGER
    assert [(r.from_value, r.to_value) for r in quality.integer_range] == [(1, 100)]
    assert not quality.floating_point_range

    camera = described["camera_topic"]
    assert camera.read_only and camera.type == ParameterType.PARAMETER_STRING
    assert "read at start" in camera.description
    assert described["remote_fallback_on_failure"].type == ParameterType.PARAMETER_BOOL
    [steps] = described["max_steps"].integer_range
    assert steps.from_value < 0 < steps.to_value


def test_every_numeric_spec_has_its_range_and_every_spec_its_type(rig):
    node = rig.add(PolicyNode(backend=StubBackend(), **rig.node_kwargs(backend="stub")))
    remote = remote_node(rig)
    for spec in (*COMMON_PARAMETERS, *POLICY_NODE_PARAMETERS, *REMOTE_NODE_PARAMETERS):
        owner = remote if spec in REMOTE_NODE_PARAMETERS else node
        descriptor = owner.describe_parameter(spec.name)
        assert descriptor.read_only is (not spec.live), spec.name
        if spec.item_type is not None and not spec.default:
            # rclpy cannot tell an empty list's type: the spec's check types it.
            assert descriptor.dynamic_typing, spec.name
            assert list(owner.get_parameter(spec.name).value) == [], spec.name
            continue
        assert not descriptor.dynamic_typing, spec.name
        assert Parameter.Type(descriptor.type).check(spec.default), spec.name
        bounds = spec.number_range
        ranges = [*descriptor.integer_range, *descriptor.floating_point_range]
        if bounds is None:
            assert not ranges, spec.name
            continue
        [declared] = ranges
        assert declared.from_value == bounds.low, spec.name
        assert declared.to_value == (bounds.high if math.isfinite(bounds.high)
                                     else sys.float_info.max), spec.name  # fmt: skip


def test_bad_values_are_refused_with_the_specs_reason_and_change_nothing(rig):
    node = remote_node(rig)
    parameters = client(rig, "remote_policy_node")
    refused = {
        "remote_timeout_sec": (0, "must be a finite number > 0"),  # in rclpy's range, not ours
        "inference_rate": (5000, "at most 1000"),
        "jpeg_quality": (101, "between 1 and 100"),
        "remote_retry_attempts": (2.5, "expected int, got float 2.5"),
        "remote_fallback_on_failure": ("yes", "expected bool, got str 'yes'"),
    }
    for name, (value, words) in refused.items():
        [result] = answer(parameters.set_parameters([Parameter(name, value=value)])).results
        assert not result.successful, name
        assert result.reason.startswith(name) and words in result.reason, result.reason
    assert remote_value(parameters, "remote_timeout_sec") == (ParameterType.PARAMETER_DOUBLE, 1.0)
    assert node.get_parameter("jpeg_quality").value == 90
    assert node.describe_parameter("remote_retry_attempts").type == (
        ParameterType.PARAMETER_INTEGER)
    # Atomically: one bad value and nothing is set.
    result = answer(parameters.set_parameters_atomically(
        [Parameter("remote_timeout_sec", value=3.0), Parameter("jpeg_quality", value=0)]
    )).result  # fmt: skip
    assert not result.successful and "jpeg_quality" in result.reason
    assert node.get_parameter("remote_timeout_sec").value == 1.0


def test_read_only_parameters_are_refused_with_a_reason(rig):
    node = remote_node(rig)
    parameters = client(rig, "remote_policy_node")
    original = node.get_parameter("camera_topic").value
    for name, value in (("camera_topic", "/elsewhere"), ("wait_for_task", True),
                        ("image_transport", "compressed")):  # fmt: skip
        [result] = answer(parameters.set_parameters([Parameter(name, value=value)])).results
        assert not result.successful
        assert result.reason.startswith(f"{name} is read-only") and "restart" in result.reason
    assert node.get_parameter("camera_topic").value == original


@pytest.mark.parametrize(
    ("value", "words"),
    [(0.0, "inference_rate must be a finite number > 0"),
     ("fast", "inference_rate expected float, got str 'fast'")],
)  # fmt: skip
def test_a_bad_start_value_stops_the_node_with_the_specs_reason(rig, value, words):
    with pytest.raises(ParameterException, match=words):
        PolicyNode(backend=StubBackend(), **rig.node_kwargs(backend="stub", inference_rate=value))


def test_guard_arrays_are_set_typed_and_checked_together(rig):
    node = remote_node(rig)
    parameters = client(rig, "remote_policy_node")

    def set_one(name, value):
        [result] = answer(parameters.set_parameters([Parameter(name, value=value)])).results
        return result

    # Integers for a double array are doubles, for every reader and for the guard.
    assert set_one("workspace_max", [2, 2, 2]).successful
    assert remote_value(parameters, "workspace_max") == (
        ParameterType.PARAMETER_DOUBLE_ARRAY, [2.0, 2.0, 2.0])
    assert node.safety_guard.limits.workspace_max == (2.0, 2.0, 2.0)
    described = answer(parameters.describe_parameters(["workspace_min"])).descriptors[0]
    assert described.type == ParameterType.PARAMETER_DOUBLE_ARRAY
    # Limits that must agree are checked as they would be after the change.
    result = set_one("workspace_min", [0.0, 0.0, 3.0])
    assert not result.successful
    assert result.reason == "workspace_min[2]=3 must be below workspace_max[2]=2"
    assert node.safety_guard.limits.workspace_min == (-1.5, -1.5, -1.5)
    # Per-joint limits: names first, then arrays as long as the names.
    assert set_one("joint_limit_names", ["elbow"]).successful
    result = set_one("joint_max_deltas", [0.1, 0.2])
    assert not result.successful and result.reason.startswith("joint_max_deltas must be empty")
    assert set_one("joint_max_deltas", [0.1]).successful
    assert node.safety_guard.limits.joint_max_deltas == (0.1,)
    assert node.safety_guard.limits.joint_limit_names == ("elbow",)
    result = set_one("joint_limit_names", "elbow")
    assert not result.successful and "expected a list of str" in result.reason
