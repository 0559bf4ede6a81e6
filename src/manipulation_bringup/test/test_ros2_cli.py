"""The README's robot steps through the real `ros2` command line.

`ros2 launch` starts the remote node against a real policy server on
loopback; a camera and joint states are published; `ros2 topic echo` sees
policy outputs; `ros2 param set/get/describe` change and read the remote
timeout and retries, and a bad value is refused with its reason.

The ros2 command line is on no package registry: `make test` installs it from
../shared/ros2cli when that folder is there. Elsewhere this file skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI)")
if shutil.which("ros2") is None:
    pytest.skip(
        "the ros2 command line is not installed (make test installs it from ../shared/ros2cli)",
        allow_module_level=True,
    )

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

from manipulation_msgs.msg import PolicyOutput  # noqa: E402
from manipulation_policy.nodes import ros_conversion  # noqa: E402
from manipulation_policy.server.process import running_server  # noqa: E402

# A domain of this file's own: no other test's nodes in the `ros2` listings.
DOMAIN_ID = 150 + os.getpid() % 50
# The managed node's test: a domain apart from the module's autostarted stack.
MANAGED_DOMAIN_ID = DOMAIN_ID - 50
ENV = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN_ID)}
NODE = "/remote_policy_node"
WAIT_SEC = 30.0


def ros2(
    *arguments: str, timeout: float = WAIT_SEC, domain: int = DOMAIN_ID
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ros2", *arguments], env={**ENV, "ROS_DOMAIN_ID": str(domain)},
        capture_output=True, text=True, timeout=timeout,
    )


def ros2_param(verb: str, *arguments: str) -> str:
    """`ros2 param VERB` without the daemon (nothing left running), given time to
    discover the node on a busy machine; what it printed, both streams."""
    answer = ros2("param", verb, "--no-daemon", "--spin-time", "3", NODE, *arguments)
    return (answer.stdout + answer.stderr).strip()


class RobotInputs:
    """A camera and joint states at 10 Hz, as the robot's drivers publish them."""

    def __init__(self, domain: int = DOMAIN_ID) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("fake_robot_drivers", context=self.context)
        camera = self.node.create_publisher(
            Image, "/camera/color/image_raw", qos_profile_sensor_data
        )
        joints = self.node.create_publisher(JointState, "/joint_states", 10)
        rgb = np.full((48, 64, 3), (200, 40, 40), dtype=np.uint8)

        def publish() -> None:
            stamp = self.node.get_clock().now().to_msg()
            camera.publish(ros_conversion.rgb_to_image(rgb, stamp))
            joints.publish(JointState(name=["shoulder", "elbow"], position=[0.1, -0.2]))

        self.node.create_timer(0.1, publish)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.executor.spin_once(timeout_sec=0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.context.try_shutdown()


@contextlib.contextmanager
def launched(*arguments: str, domain: int = DOMAIN_ID) -> Iterator[subprocess.Popen]:
    """`ros2 launch` of the remote node against a stub server, with the robot's inputs."""
    with running_server("--backend", "stub") as url:
        launch = subprocess.Popen(
            ["ros2", "launch", "manipulation_bringup", "core_launch.py",
             "use_remote_policy:=true", f"remote_url:={url}", *arguments],
            env={**ENV, "ROS_DOMAIN_ID": str(domain)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        inputs = RobotInputs(domain)
        try:
            deadline = time.monotonic() + WAIT_SEC
            while NODE not in ros2("node", "list", "--no-daemon", domain=domain).stdout.split():
                assert launch.poll() is None, launch.stdout.read()
                assert time.monotonic() < deadline, "remote_policy_node never appeared"
                time.sleep(0.5)
            yield launch
        finally:
            inputs.close()
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGINT)
            try:
                launch.communicate(timeout=WAIT_SEC)
            except subprocess.TimeoutExpired:
                os.killpg(launch.pid, signal.SIGKILL)
                launch.communicate()


@pytest.fixture(scope="module")
def launched_stack():
    with launched() as launch:
        yield launch


def ros2_lifecycle(verb: str, *arguments: str, domain: int = DOMAIN_ID) -> str:
    """`ros2 lifecycle VERB` without the daemon; what it printed. "Node not found" means
    its discovery missed the node within --spin-time (a loaded machine), before any
    request went out: then it is asked again, a bounded number of times."""
    for _ in range(3):
        answer = ros2(
            "lifecycle", verb, "--no-daemon", "--spin-time", "5", NODE, *arguments,
            domain=domain,
        )
        printed = (answer.stdout + answer.stderr).strip()
        if printed != "Node not found":
            break
    return printed


def echo_once(topic: str, timeout: float = WAIT_SEC, domain: int = DOMAIN_ID):
    try:
        return ros2("topic", "echo", "--once", "--no-daemon", topic,
                    "manipulation_msgs/msg/PolicyOutput", timeout=timeout, domain=domain)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, "", "timed out")


def test_topic_echo_shows_the_policy_outputs(launched_stack):
    echoed = ros2(
        "topic", "echo", "--once", "--no-daemon", "/manipulation/policy_output",
        "manipulation_msgs/msg/PolicyOutput",
    )
    assert echoed.returncode == 0, echoed.stderr
    fields = dict(
        line.split(":", 1)
        for line in echoed.stdout.splitlines()
        if ":" in line and not line.startswith((" ", "-"))
    )
    assert fields["has_eef_target"].strip() == "true"  # a stub action, not a hold
    assert 0.0 < float(fields["confidence"]) <= 1.0
    assert int(fields["eef_target_mode"]) == PolicyOutput.EEF_TARGET_DELTA


def test_param_set_changes_the_remote_timeout_and_retries_live(launched_stack):
    for name, value in (("remote_timeout_sec", "2.0"), ("remote_retry_attempts", "5")):
        assert ros2_param("set", name, value) == "Set parameter successful"
    assert ros2_param("get", "remote_timeout_sec") == "Double value is: 2.0"
    assert ros2_param("get", "remote_retry_attempts") == "Integer value is: 5"
    assert ros2_param("set", "remote_max_in_flight", "2") == "Set parameter successful"
    assert ros2_param("get", "remote_max_in_flight") == "Integer value is: 2"


def test_param_set_refuses_a_bad_value_with_its_reason(launched_stack):
    before = ros2_param("get", "remote_timeout_sec")
    assert before.startswith("Double value is: ")
    assert ros2_param("set", "remote_timeout_sec", "-1.0") == (
        "Setting parameter failed: remote_timeout_sec must be a finite number > 0, got -1.0"
    )
    assert ros2_param("get", "remote_timeout_sec") == before
    assert ros2_param("set", "remote_max_in_flight", "5") == (
        "Setting parameter failed: remote_max_in_flight must be between 1 and 4, got 5"
    )


def test_param_describe_shows_the_range(launched_stack):
    described = ros2_param("describe", "remote_retry_attempts")
    assert "Type: integer" in described
    assert "Min value: 0" in described
    described = ros2_param("describe", "remote_max_in_flight")
    assert "Type: integer" in described
    assert "Min value: 1" in described and "Max value: 4" in described


def test_lifecycle_get_shows_the_autostarted_node_active(launched_stack):
    assert ros2_lifecycle("get") == "active [3]"


def test_lifecycle_set_walks_a_managed_node_from_unconfigured_to_commands_and_back():
    domain = MANAGED_DOMAIN_ID

    def lifecycle(verb: str, *arguments: str) -> str:
        return ros2_lifecycle(verb, *arguments, domain=domain)

    with launched("autostart:=false", domain=domain):
        assert lifecycle("get") == "unconfigured [1]"
        assert lifecycle("set", "configure") == "Transitioning successful"
        assert lifecycle("get") == "inactive [2]"
        quiet = echo_once("/manipulation/policy_output", timeout=5.0, domain=domain)
        assert quiet.returncode != 0, quiet.stdout  # configured, not active: no commands
        assert lifecycle("set", "activate") == "Transitioning successful"
        echoed = echo_once("/manipulation/policy_output", domain=domain)
        assert echoed.returncode == 0 and "has_eef_target: true" in echoed.stdout
        assert lifecycle("set", "deactivate") == "Transitioning successful"
        assert lifecycle("get") == "inactive [2]"
        assert lifecycle("set", "cleanup") == "Transitioning successful"
        assert lifecycle("get") == "unconfigured [1]"
