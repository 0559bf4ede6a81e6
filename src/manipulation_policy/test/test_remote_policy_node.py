"""The remote policy node over real DDS against real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from node_harness import (
    JOINT_POSITIONS,
    Rig,
    ScriptedPolicyServer,
    assert_actions_close,
    expected_stub_action,
    jpeg_roundtrip,
    sample_image,
    wait_until,
)
from parameter_services import ParameterServices
from rclpy.parameter import Parameter

from manipulation_policy.core.policy_types import ActionChunk, Observation
from manipulation_policy.nodes.remote_policy_node import RemoteActionSource, RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import policy_output_to_action, stamp_to_nanoseconds
from manipulation_policy.robot.remote_client import RemoteClient, RemoteSettings
from manipulation_policy.server.process import ServerProcess, free_port

STUB_CONFIDENCE = 0.5
DEFAULT_INSTRUCTION = "pick up the object"


@pytest.fixture
def rig():
    with Rig() as rig:
        yield rig


@pytest.fixture
def scripted_server():
    with ScriptedPolicyServer() as server:
        yield server


def start_node(rig: Rig, url: str, **parameters) -> RemotePolicyNode:
    values = {"remote_url": url, "inference_rate": 20.0, **parameters}
    return rig.add(RemotePolicyNode(**rig.node_kwargs(**values)))


def is_hold(msg) -> bool:
    return policy_output_to_action(msg).is_hold


def real_answers(rig: Rig, after_ns: int = 0) -> list:
    return [
        m for m in rig.outputs()
        if not is_hold(m) and stamp_to_nanoseconds(m.header.stamp) > after_ns
    ]


def test_answer_is_the_backends_answer_on_the_image_the_server_decodes(rig):
    image = sample_image(width=320, height=240)
    with ServerProcess("--backend", "stub") as server:
        start_node(rig, server.base_url)
        rig.stream_joint_states()
        rig.stream_camera(image)
        outputs = rig.wait_for_outputs(3)
    assert len(outputs) >= 3
    # JPEG is lossy, so the reference is the stub applied to exactly what the server
    # decodes: the frame resized to 224x224 and JPEG-encoded at quality 90 (same Pillow
    # on both sides, so decoding is deterministic). JSON carries floats exactly (repr).
    want = expected_stub_action(jpeg_roundtrip(image, 224, 224, 90), DEFAULT_INSTRUCTION)
    for msg in outputs[-2:]:
        assert msg.header.frame_id == "base_link"
        assert_actions_close(policy_output_to_action(msg), want, tol=1e-12)
    # And it is not the answer on the unencoded frame (the comparison can tell them apart).
    raw = expected_stub_action(image, DEFAULT_INSTRUCTION)
    assert raw.gripper_command != want.gripper_command


def test_killed_server_gives_holds_in_bounded_time_and_recovery_after_restart(rig):
    timeout_sec, retries = 0.3, 2
    port = free_port()
    server = ServerProcess("--backend", "stub", port=port).start()
    try:
        node = start_node(
            rig, server.base_url, remote_timeout_sec=timeout_sec, remote_retry_attempts=retries,
            inference_rate=10.0,
        )
        rig.stream_joint_states(50.0)
        rig.stream_camera(sample_image(), 20.0)
        assert wait_until(lambda: real_answers(rig)), node.counters

        server.process.kill()  # a crash: no goodbye
        server.process.wait(10)
        killed_at = time.monotonic()
        killed_ns = rig.node.get_clock().now().nanoseconds
        joint_states_at_kill = node.counters["joint_states"]

        def hold_after_kill():
            return [t for t, m in rig.timed_outputs() if t > killed_at and is_hold(m)]

        # All attempts of one decision, their backoffs and one tick, plus a margin for a
        # loaded CI machine: the bound the node promises, not a speed measurement.
        bound = timeout_sec * (1 + retries) + 0.05 + 0.1 + 0.1 + 3.0
        assert wait_until(lambda: hold_after_kill(), bound), node.counters
        # Stay down a while: several decisions, and the executor thread kept receiving
        # joint states all along (50 Hz stream).
        assert wait_until(lambda: len(hold_after_kill()) >= 3), node.counters
        assert wait_until(lambda: node.counters["joint_states"] - joint_states_at_kill >= 25)
        # No made-up targets from frames taken after the crash, only holds.
        assert real_answers(rig, after_ns=killed_ns) == []

        server = ServerProcess("--backend", "stub", port=port).start()  # same port
        restarted_ns = rig.node.get_clock().now().nanoseconds
        # Recovery by itself: the circuit breaker's probe finds the server again.
        assert wait_until(lambda: real_answers(rig, after_ns=restarted_ns), 15.0), node.counters
    finally:
        server.stop()


def test_fallback_switch_and_url_change_take_effect_at_once(rig, scripted_server):
    node = start_node(rig, scripted_server.url, remote_timeout_sec=0.2, remote_retry_attempts=0)
    rig.stream_joint_states()
    rig.stream_camera(sample_image())
    assert wait_until(lambda: real_answers(rig))

    dead_url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    results = rig.set_parameters(
        "remote_policy_node", remote_fallback_on_failure=False, remote_url=dead_url
    )
    assert all(r.successful for r in results), results
    no_action_before = node.counters["no_action"]
    assert wait_until(lambda: node.counters["no_action"] >= no_action_before + 3)
    rig.clear_outputs()
    # More failed decisions after the clear: none of them published anything.
    no_action_at_clear = node.counters["no_action"]
    assert wait_until(lambda: node.counters["no_action"] >= no_action_at_clear + 3)
    assert rig.outputs() == [], "fallback off: nothing is published on failure"

    [result] = rig.set_parameters("remote_policy_node", remote_fallback_on_failure=True)
    assert result.successful
    assert wait_until(lambda: any(is_hold(m) for m in rig.outputs()))

    [result] = rig.set_parameters("remote_policy_node", remote_url=scripted_server.url)
    assert result.successful
    changed_ns = rig.node.get_clock().now().nanoseconds
    # A new URL resets the circuit breaker: answers come back without waiting out a cooldown.
    assert wait_until(lambda: real_answers(rig, after_ns=changed_ns), 5.0)


def test_timeout_instruction_and_image_size_changes_reach_the_server(rig, scripted_server):
    scripted_server.delay_sec = 0.4
    node = start_node(
        rig, scripted_server.url, remote_timeout_sec=0.1, remote_retry_attempts=0,
        image_width=32, image_height=24,
    )
    rig.stream_joint_states()
    rig.stream_camera(sample_image())
    assert wait_until(lambda: any(is_hold(m) for m in rig.outputs()))
    assert real_answers(rig) == []  # every answer came after the 0.1 s timeout

    [result] = rig.set_parameters("remote_policy_node", remote_timeout_sec=2.0)
    assert result.successful
    changed_ns = rig.node.get_clock().now().nanoseconds
    assert wait_until(lambda: real_answers(rig, after_ns=changed_ns), 10.0), node.counters

    scripted_server.delay_sec = 0.0
    [result] = rig.set_parameters("remote_policy_node", instruction="put the cup on the plate")
    assert result.successful
    assert wait_until(
        lambda: scripted_server.observations()[-1].instruction == "put the cup on the plate"
    )
    assert scripted_server.observations()[-1].image.shape == (24, 32, 3)
    results = rig.set_parameters("remote_policy_node", image_width=48, image_height=40)
    assert all(r.successful for r in results)
    assert wait_until(lambda: scripted_server.observations()[-1].image.shape == (40, 48, 3))


def test_nan_velocity_and_effort_do_not_get_every_request_refused(rig, scripted_server):
    start_node(rig, scripted_server.url)
    rig.stream(50.0, lambda: rig.publish_joint_state_with(
        velocity=[float("nan")] * 3, effort=[1.0, float("inf"), 2.0]
    ))
    rig.stream_camera(sample_image())
    assert wait_until(lambda: any(o.joint_state.name for o in scripted_server.observations()))
    seen = next(o for o in scripted_server.observations() if o.joint_state.name)
    assert seen.joint_state.position == JOINT_POSITIONS
    assert seen.joint_state.velocity == () and seen.joint_state.effort == ()
    # The server has answered; its answer may still be on its way back over DDS.
    assert wait_until(lambda: real_answers(rig))
    assert not any(is_hold(m) for m in rig.outputs())


def test_bad_values_are_refused_with_a_reason(rig, scripted_server):
    node = start_node(rig, scripted_server.url)
    refused = {
        "remote_url": "ftp://policy-host:5000",
        "remote_timeout_sec": 0.0,
        "remote_retry_attempts": -1,
        "jpeg_quality": 0,
        "image_width": 0,
        "inference_rate": -5.0,
        # Wrong types get the type expected, not rclpy's "expected '2' got '3'".
        "remote_fallback_on_failure": "yes",
    }
    for name, value in refused.items():
        [result] = rig.set_parameters("remote_policy_node", **{name: value})
        assert not result.successful, name
        assert name in result.reason, result.reason
    [result] = rig.set_parameters("remote_policy_node", remote_retry_attempts=2.5)
    assert not result.successful and "expected int, got float 2.5" in result.reason
    # `ros2 param describe` still reports the type the value has, not the refused one.
    assert node.describe_parameter("remote_retry_attempts").type == Parameter.Type.INTEGER.value
    assert node.describe_parameter("remote_fallback_on_failure").type == Parameter.Type.BOOL.value
    [result] = rig.set_parameters("remote_policy_node", remote_url="http://")
    assert not result.successful and "host" in result.reason
    [result] = rig.set_parameters("remote_policy_node", image_transport="compressed")
    assert not result.successful  # read at start only
    assert node.get_parameter("remote_url").value == scripted_server.url
    assert node.action_source.client.settings.url == scripted_server.url


def test_api_key_goes_out_as_a_bearer_token(rig, scripted_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MANIPULATION_POLICY_API_KEY", "from-the-environment")
    node = start_node(rig, scripted_server.url)
    rig.stream_camera(sample_image())
    assert wait_until(lambda: scripted_server.request_count() >= 1)
    assert scripted_server.requests[-1]["headers"]["Authorization"] == (
        "Bearer from-the-environment"
    )
    key_file = tmp_path / "policy.key"
    key_file.write_text("from-the-file\n")
    [result] = rig.set_parameters("remote_policy_node", remote_api_key_file=str(key_file))
    assert result.successful, result.reason
    assert wait_until(
        lambda: scripted_server.requests[-1]["headers"]["Authorization"]
        == "Bearer from-the-file"
    )
    # The key itself is never a parameter value any ROS peer could read.
    values = [str(p.value) for p in node.get_parameters(list(node._parameters))]
    assert str(key_file) in values
    assert not any("from-the" in value for value in values), values


def test_the_api_key_parameter_refuses_to_hold_a_secret(rig, scripted_server, tmp_path):
    node = start_node(rig, scripted_server.url)
    [result] = rig.set_parameters("remote_policy_node", remote_api_key="s3cret")
    assert not result.successful
    assert "remote_api_key_file" in result.reason and "s3cret" not in result.reason
    assert node.get_parameter("remote_api_key").value == ""
    for bad in (str(tmp_path / "missing.key"), str(tmp_path)):
        [result] = rig.set_parameters("remote_policy_node", remote_api_key_file=bad)
        assert not result.successful and "API key file" in result.reason, result.reason
    assert node.action_source.client.settings.api_key == ""


def node_process(*ros_args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "manipulation_policy.nodes.remote_policy_node",
         "--ros-args", *ros_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@contextlib.contextmanager
def killed_if_left_running(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_the_executable_refuses_a_bad_start_value_by_name():
    process = node_process("-p", "remote_url:=ftp://policy-host")
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "remote_url" in output and "http://" in output and "Traceback" not in output


def test_the_executable_stops_cleanly_on_sigint(scripted_server):
    # An integer for a float parameter, as people type it, is accepted.
    process = node_process("-p", f"remote_url:={scripted_server.url}", "-p", "inference_rate:=10")
    with killed_if_left_running(process):
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it is up and spinning
            line = process.stdout.readline()
            lines.append(line)
            if "active:" in line or not line:
                break
        assert any("active:" in line and "at up to 10 Hz" in line for line in lines), lines
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_a_second_sigint_during_shutdown_is_no_traceback(rig, scripted_server):
    # Ctrl-C on `ros2 launch`: the terminal's SIGINT, then launch's own one, while the
    # node is still finishing an inference (here, a slow server answer).
    scripted_server.delay_sec = 1.5
    topics = [arg for name, topic in rig.topics.items() for arg in ("-p", f"{name}:={topic}")]
    process = node_process(
        "-p", f"remote_url:={scripted_server.url}", "-p", "inference_rate:=10.0", *topics
    )
    with killed_if_left_running(process):
        rig.stream_camera(sample_image())
        assert wait_until(lambda: scripted_server.request_count() >= 1, timeout=30)
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output


def test_failures_then_recovery_are_each_reported(scripted_server):
    failures, recoveries = [], []
    values = {"remote_fallback_on_failure": True, "image_width": 32, "image_height": 24,
              "jpeg_quality": 90}
    client = RemoteClient(RemoteSettings(scripted_server.url, timeout_sec=2.0, retry_attempts=0))
    source = RemoteActionSource(client, lambda: values, failures.append, recoveries.append)
    observation = Observation(image=sample_image())

    # An answer is the server's chunk; a failure's hold is a single action.
    assert isinstance(source(observation), ActionChunk) and not failures and not recoveries
    scripted_server.fail_status = 500
    assert source(observation).is_hold
    assert len(failures) == 1 and "500" in failures[0] and "hold" in failures[0]
    scripted_server.fail_status = None
    client.breaker.reset()  # skip the cooldown: this test is about the reports
    assert isinstance(source(observation), ActionChunk)
    assert isinstance(source(observation), ActionChunk)
    assert recoveries == ["policy server answers again"]
    source.close()


def test_a_recovery_is_reported_once_when_calls_in_flight_end_together(scripted_server):
    """Two calls at once (remote_max_in_flight 2) after a failure: both succeed, and the
    recovery is reported by one of them only."""
    failures, recoveries = [], []
    values = {"remote_fallback_on_failure": False, "image_width": 32, "image_height": 24,
              "jpeg_quality": 90}
    client = RemoteClient(RemoteSettings(scripted_server.url, timeout_sec=10.0,
                                         retry_attempts=0, max_in_flight=2))
    source = RemoteActionSource(client, lambda: values, failures.append, recoveries.append)
    observation = Observation(image=sample_image())
    scripted_server.fail_status = 500
    assert source(observation) is None and source.failing
    scripted_server.fail_status = None
    client.breaker.reset()
    scripted_server.barrier = threading.Barrier(2, timeout=10.0)  # both in the server at once
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(source(observation)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20.0)
    assert len(answers) == 2 and all(isinstance(a, ActionChunk) for a in answers)
    assert recoveries == ["policy server answers again"] and not source.failing
    source.close()


SECRET = "sk-live-0123456789abcdef0123456789abcdef"


def logged_text(output: str, log_dir) -> str:
    """What the node printed and what it wrote under ROS_LOG_DIR, together."""
    files = [path for path in log_dir.rglob("*") if path.is_file()]
    return output + "".join(path.read_text(errors="replace") for path in files)


@pytest.mark.parametrize("given", [SECRET, "123456789012345678"], ids=["text", "number"])
def test_a_key_given_as_a_parameter_is_refused_at_start_without_being_shown(tmp_path, given):
    log_dir = tmp_path / "ros_log"
    process = subprocess.Popen(
        [sys.executable, "-m", "manipulation_policy.nodes.remote_policy_node",
         "--ros-args", "-p", f"remote_api_key:={given}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ROS_LOG_DIR": str(log_dir)},
    )
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2, output
    assert "remote_api_key" in output and "remote_api_key_file" in output, output
    assert "Traceback" not in output
    assert given not in logged_text(output, log_dir)


def test_a_key_set_live_is_refused_without_being_shown(rig, scripted_server, tmp_path):
    log_dir = tmp_path / "ros_log"
    namespace = f"{rig.namespace}_secret"
    printed = tmp_path / "printed.txt"  # a file, not a pipe: debug logs would fill a pipe
    with printed.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "manipulation_policy.nodes.remote_policy_node",
             "--ros-args", "-r", f"__ns:={namespace}",
             "-p", f"remote_url:={scripted_server.url}", "--log-level", "debug"],
            stdout=sink, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "ROS_LOG_DIR": str(log_dir)},
        )
    with killed_if_left_running(process):
        services = ParameterServices(rig.node, f"{namespace}/remote_policy_node")
        assert services.wait_for_services(timeout_sec=30.0)
        # A service found is not yet a service whose answers reach us (DDS matches the
        # two directions one by one): a harmless read, asked until answered, proves it.
        assert wait_until(lambda: wait_until(
            services.get_parameters(["remote_url"]).done, 3.0), 30.0)
        for value in (SECRET, 12345678901234):
            future = services.set_parameters([Parameter("remote_api_key", value=value)])
            assert wait_until(future.done, 30.0)
            [result] = future.result().results
            assert not result.successful and str(value) not in result.reason
        process.send_signal(signal.SIGINT)
        process.wait(30)
    text = logged_text(printed.read_text(), log_dir)
    assert "refused parameter change: remote_api_key" in text
    assert SECRET not in text and "12345678901234" not in text
