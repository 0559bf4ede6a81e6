"""core_launch.py executed for real through the launch API, as `ros2 launch` runs it.

`launch` and `launch_ros` are not on PyPI, so CI skips this file; it runs
wherever they are importable (a ROS 2 install, or a workspace built from
ros2/launch and ros2/launch_ros). What it proves there: the launch file
starts the chosen node in the given namespace, the params file reaches the
node as ROS hands one over (a namespaced section applies), and a launch
argument set on top of it wins, typed as the parameter is. The decisions
themselves are covered without `launch` in test_launch_logic.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("launch.actions", reason="launch is not installed (not on PyPI)")
pytest.importorskip("launch_ros", reason="launch_ros is not installed (not on PyPI)")
rclpy = pytest.importorskip("rclpy")

from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import parameter_value_to_python  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parents[1] / "launch" / "core_launch.py"
WAIT_SEC = 20.0

# What `ros2 launch FILE a:=b ...` does, without the ros2 command line.
RUNNER = textwrap.dedent(
    """
    import sys
    from launch import LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    arguments = [item.split(":=", 1) for item in sys.argv[2:]]
    service = LaunchService()
    service.include_launch_description(
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(sys.argv[1]), launch_arguments=arguments
        )
    )
    sys.exit(service.run())
    """
)


def launch(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(LAUNCH_FILE), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=WAIT_SEC)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    return output


def read_parameters(node_fqn: str, names: list[str]) -> dict:
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("core_launch_test_probe", context=context)
        # The service `ros2 param get` calls (rclpy's AsyncParameterClient is newer than Humble).
        client = node.create_client(GetParameters, f"{node_fqn}/get_parameters")
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + WAIT_SEC
        while not client.service_is_ready():
            assert time.monotonic() < deadline, f"{node_fqn} never offered its parameters"
            executor.spin_once(timeout_sec=0.1)
        future = client.call_async(GetParameters.Request(names=names))
        executor.spin_until_future_complete(future, timeout_sec=WAIT_SEC)
        values = future.result().values
        return {
            name: parameter_value_to_python(value)
            for name, value in zip(names, values, strict=True)
        }
    finally:
        context.try_shutdown()


def test_the_params_file_and_launch_arguments_reach_the_node_in_its_namespace(tmp_path):
    params = tmp_path / "fleet.yaml"
    params.write_text(
        "/robot1/policy_node:\n  ros__parameters:\n"
        "    backend: stub\n    instruction: stack the blocks\n    inference_rate: 2.0\n"
        "/robot2/policy_node:\n  ros__parameters:\n    instruction: not for robot1\n"
    )
    process = launch(f"params_file:={params}", "namespace:=robot1", "inference_rate:=3")
    try:
        values = read_parameters(
            "/robot1/policy_node", ["backend", "instruction", "inference_rate"]
        )
    finally:
        output = stop(process)
    assert values == {"backend": "stub", "instruction": "stack the blocks", "inference_rate": 3.0}
    assert isinstance(values["inference_rate"], float)
    assert "starting /robot1/policy_node" in output
    assert process.returncode == 0, output


def test_a_bad_argument_stops_the_launch_before_any_node_starts():
    process = launch("remote_timeout_sec:=-1", "use_remote_policy:=true")
    output = stop(process) if process.wait(timeout=WAIT_SEC) is None else process.stdout.read()
    assert process.returncode != 0
    assert "remote_timeout_sec:='-1' is invalid" in output
    assert "process started" not in output
