"""Validation of node parameter values: what is refused, and the reasons given."""

from __future__ import annotations

import math

import pytest

from manipulation_policy.robot.node_parameters import (
    COMMON_PARAMETERS,
    POLICY_NODE_PARAMETERS,
    REMOTE_NODE_PARAMETERS,
    changes_problem,
    parameter_backend_arguments,
    specs_by_name,
)

SPECS = specs_by_name(COMMON_PARAMETERS, POLICY_NODE_PARAMETERS, REMOTE_NODE_PARAMETERS)


def test_every_default_is_accepted_and_described():
    for spec in SPECS.values():
        assert spec.problem(spec.default) is None, spec.name
        assert spec.description, spec.name


def test_the_shared_names_and_defaults():
    defaults = {name: spec.default for name, spec in SPECS.items()}
    assert defaults["inference_rate"] == 5.0 and defaults["max_observation_age_sec"] == 0.5
    assert defaults["remote_url"] == "http://localhost:5000"
    assert defaults["remote_retry_attempts"] == 3 and defaults["remote_fallback_on_failure"]
    assert (defaults["image_width"], defaults["image_height"], defaults["jpeg_quality"]) == (
        224, 224, 90)
    assert defaults["backend"] == "openvla" and defaults["quantization"] == "none"
    live = {name for name, spec in SPECS.items() if spec.live}
    assert {"remote_url", "remote_timeout_sec", "remote_retry_attempts",
            "remote_fallback_on_failure", "inference_rate", "instruction"} <= live
    assert not {"camera_topic", "image_transport", "backend", "model"} & live
    # A subscription or the state's layout (checked against the policy at configure)
    # changes only with a restart; the pairing tolerance is a live setting.
    assert not {"camera_topics", "camera_names", "state_joints", "state_eef_pose"} & live
    assert "camera_sync_tolerance_sec" in live
    assert (defaults["camera_topics"], defaults["camera_names"], defaults["state_joints"],
            defaults["state_eef_pose"], defaults["camera_sync_tolerance_sec"]) == (
        (), (), (), False, 0.05)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("remote_timeout_sec", 0.0, "> 0"),
        ("remote_timeout_sec", -1.0, "> 0"),
        ("remote_timeout_sec", float("nan"), "finite"),
        ("remote_timeout_sec", 1e6, "at most"),
        ("inference_rate", 0.0, "> 0"),
        ("inference_rate", -2.0, "> 0"),
        ("max_observation_age_sec", 0.0, "> 0"),
        ("remote_retry_attempts", -1, "between 0"),
        ("remote_url", "ftp://host", "http:// or https://"),
        ("remote_url", "localhost:5000", "http:// or https://"),
        ("remote_url", "http://", "no host"),
        ("remote_url", "http://host:99999", "not a valid URL"),
        ("remote_url", "http://host:5000/?x=1", "query"),
        ("image_transport", "theora", "raw, compressed"),
        ("instruction", "", "empty"),
        ("instruction", "x" * 1025, "at most 1024"),
        ("camera_topic", "/camera image", "topic name"),
        ("camera_topics", ["/a", "/a"], "must not name a topic twice"),
        ("camera_topics", ["/a", "/b c"], "[1] must be a non-empty topic name"),
        ("camera_topics", [f"/c{i}" for i in range(9)], "at most 8 topics"),
        ("camera_topics", "/a", "expected a list of str"),
        ("camera_names", ["wrist", "wrist"], "must not name a camera twice"),
        ("camera_names", ["front", "top view"], "[1] 'top view' is not a camera name"),
        ("camera_names", [f"c{i}" for i in range(9)], "at most 8 names"),
        ("camera_sync_tolerance_sec", -0.01, "0"),
        ("camera_sync_tolerance_sec", float("nan"), "finite"),
        ("state_joints", ["elbow", "elbow"], "must not name a joint twice"),
        ("state_joints", ["elbow", ""], "empty name"),
        ("state_eef_pose", "true", "expected bool"),
        ("jpeg_quality", 101, "between 1 and 100"),
        ("image_width", 0, "between 1"),
        ("backend", "tensorflow", "module.path:ClassName"),
        ("quantization", "3bit", "8bit"),
        ("device", "gpu0", "cuda:<index>"),
        ("dtype", "int8", "bfloat16"),
        ("gripper_convention", "sideways", "open_is_one"),
        ("position_scale", 0.0, "> 0"),
        ("rotation_scale", 101.0, "at most 100"),
        ("device", "mps", "cuda:<index>"),
        ("device", "", "cuda:<index>"),
        ("model", "", "empty"),
        ("max_position_step", -0.1, ">= 0"),
        ("max_rotation_step", float("inf"), "finite"),
        ("position_bounds", "1,-1", "lower <= upper"),
        ("rotation_bounds", "-1", "lower,upper"),
        ("gripper_bounds", "0,nan", "finite"),
        ("clip_actions", "true", "expected bool"),
        ("remote_fallback_on_failure", 1, "expected bool"),
        ("remote_retry_attempts", True, "expected int"),
        ("remote_timeout_sec", "1.0", "expected float"),
    ],
)
def test_bad_values_are_refused_with_a_reason_naming_the_parameter(name, value, words):
    reason = changes_problem(SPECS, {name: value})
    assert reason is not None and reason.startswith(name), reason
    assert words in reason, reason


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("remote_url", "https://gpu-host.example.com:8443/policy"),
        ("remote_url", "http://[::1]:5000"),
        ("remote_timeout_sec", 2),  # an int is a fine float
        ("remote_retry_attempts", 0),
        ("image_transport", "compressed"),
        ("backend", "stub"),
        ("backend", "my_robot.policies:OctoBackend"),
        ("device", "cuda:1"),
        ("dtype", "BF16"),
        ("unnorm_key", ""),
        ("quantization", "None"),
        ("max_position_step", 0.0),  # no cap
        ("position_bounds", "-0.02, 0.02"),
    ],
)
def test_good_values_are_accepted(name, value):
    assert changes_problem(SPECS, {name: value}) is None


def test_parameters_that_are_not_ours_are_not_judged():
    assert changes_problem(SPECS, {"use_sim_time": True}) is None


def test_backend_options_turn_empty_and_none_into_unset():
    values = {spec.name: spec.default for spec in POLICY_NODE_PARAMETERS}
    options = parameter_backend_arguments(
        {**values, "lora_adapter": "/adapters/pick", "position_scale": 2}
    )
    assert options["unnorm_key"] is None and options["quantization"] is None
    assert options["lora_adapter"] == "/adapters/pick"
    assert options["position_scale"] == 2.0 and isinstance(options["position_scale"], float)
    assert set(options) == {
        "model", "unnorm_key", "device", "dtype", "quantization", "lora_adapter",
        "attn_implementation", "gripper_convention", "position_scale", "rotation_scale",
        "max_position_step", "max_rotation_step", "clip_actions",
        "position_bounds", "rotation_bounds", "gripper_bounds",
    }
    # Bounds are "lower,upper" text as parameters, a pair of numbers for the backend.
    assert options["position_bounds"] == (-1.0, 1.0)
    given = {**values, "gripper_bounds": " -0.5, 0.9"}
    assert parameter_backend_arguments(given)["gripper_bounds"] == (
        -0.5, 0.9)


def test_an_int_for_a_float_parameter_becomes_a_float():
    assert changes_problem(SPECS, {"inference_rate": 10}) is None
    normalized = SPECS["inference_rate"].normalized(10)
    assert normalized == 10.0 and isinstance(normalized, float)
    assert SPECS["remote_retry_attempts"].normalized(3) == 3


def test_every_numeric_parameter_has_bounds_that_its_check_and_descriptor_share():
    for spec in SPECS.values():
        numeric = isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool)
        bounds = spec.number_range
        assert (bounds is not None) == numeric, spec.name
        if bounds is None:
            continue
        assert bounds.integer is isinstance(spec.default, int), spec.name
        assert bounds.low <= spec.default <= bounds.high, spec.name
        # The check refuses just outside the bounds and accepts the ends it includes.
        kind = type(spec.default)
        step = 1 if bounds.integer else 1e-6
        if bounds.low_open:
            assert spec.problem(kind(bounds.low)) is not None, spec.name
        else:
            assert spec.problem(kind(bounds.low)) is None, spec.name
            assert spec.problem(kind(bounds.low - step)) is not None, spec.name
        if math.isfinite(bounds.high):
            assert spec.problem(kind(bounds.high)) is None, spec.name
            assert spec.problem(kind(bounds.high) * (1 + step) + step) is not None


def test_number_ranges_describe_themselves():
    assert SPECS["inference_rate"].number_range.describe() == "> 0, <= 1000"
    assert SPECS["position_scale"].number_range.describe() == "> 0, <= 100"  # as per request
    assert SPECS["max_position_step"].number_range.describe() == ">= 0, <= 1000"  # 0: no cap
    assert SPECS["jpeg_quality"].number_range.describe() == "1 to 100"
    assert SPECS["position_scale"].problem(float("inf")) is not None


def test_an_int_for_a_float_parameter_is_offered_as_a_double():
    from rclpy.parameter import Parameter

    from manipulation_policy.nodes.parameter_declarations import as_declared_type

    converted = as_declared_type(SPECS["remote_timeout_sec"], Parameter("remote_timeout_sec",
                                                                        value=2))  # fmt: skip
    assert converted.type_ is Parameter.Type.DOUBLE and converted.value == 2.0
    for spec, value in ((SPECS["jpeg_quality"], 90), (SPECS["remote_timeout_sec"], True),
                        (None, 3), (SPECS["remote_timeout_sec"], "2")):  # fmt: skip
        given = Parameter("x", value=value)
        assert as_declared_type(spec, given) is given
