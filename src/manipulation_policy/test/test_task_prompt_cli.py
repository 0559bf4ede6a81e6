"""task_prompt_cli: upstream's command, its arguments, and its tasks arriving over real DDS.

Upstream's users start it as ``ros2 run manipulation_policy task_prompt_cli``
(a console script of manipulation_policy) and type tasks that its policy node
reads on /manipulation/task_prompt. Here ``main()`` is called with arguments
and typed lines (``ros2`` is not installed on this machine), and the
installed script is run as a process where the workspace is built.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from node_harness import Rig, ScriptedPolicyServer, sample_image, wait_until
from rclpy.parameter import Parameter
from std_msgs.msg import String

from manipulation_policy import task_prompt_cli
from manipulation_policy.core.contract import MAX_INSTRUCTION_CHARS
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.task_prompt_cli import Command, interpret, parse_arguments, topics_of

PACKAGE_DIR = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- without ROS


def test_arguments_are_upstreams_with_its_defaults():
    options, ros_args = parse_arguments([])
    assert options.topic is None and options.wait_for_subscriber_sec == 2.0 and ros_args == []
    # No --topic: upstream's task topic and this project's node default, both.
    assert topics_of(options) == ("/manipulation/task_prompt", "/manipulation/instruction")
    options, ros_args = parse_arguments(
        ["--topic", "/robot1/task", "--wait-for-subscriber-sec", "0.5",
         "--ros-args", "-r", "__node:=prompt"])  # fmt: skip
    assert topics_of(options) == ("/robot1/task",) and options.wait_for_subscriber_sec == 0.5
    assert ros_args == ["--ros-args", "-r", "__node:=prompt"]  # handed to rclpy.init
    # As upstream: a negative wait is no wait.
    assert parse_arguments(["--wait-for-subscriber-sec", "-3"])[0].wait_for_subscriber_sec == 0.0


@pytest.mark.parametrize("argv", [["--topic", "task prompt"], ["--topic", ""],
                                  ["--wait-for-subscriber-sec", "soon"],
                                  ["--wait-for-subscriber-sec", "nan"]])  # fmt: skip
def test_bad_arguments_stop_with_status_2_naming_the_option(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_arguments(argv)
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "command"),
    [("pick up the bottle\n", Command("send", "pick up the bottle")),
     ("  place it on the table  ", Command("send", "place it on the table")),
     ("stop", Command("clear")), ("CLEAR", Command("clear")),
     ("status", Command("status")), ("help", Command("help")),
     ("quit", Command("quit")), ("Exit", Command("quit")),
     ("", Command("nothing")), ("   \n", Command("nothing")),
     ("stop the robot", Command("send", "stop the robot"))],
)  # fmt: skip
def test_typed_lines_mean_what_upstreams_cli_says(line, command):
    assert interpret(line) == command


def test_a_task_the_node_would_refuse_is_not_sent():
    assert interpret("x" * MAX_INSTRUCTION_CHARS).kind == "send"
    refused = interpret("x" * (MAX_INSTRUCTION_CHARS + 1))
    assert refused.kind == "refuse" and str(MAX_INSTRUCTION_CHARS) in refused.text


def test_installed_as_upstream_installs_it():
    # A console script of manipulation_policy, into lib/manipulation_policy: `ros2 run` finds it.
    setup = (PACKAGE_DIR / "setup.py").read_text()
    assert re.search(r'"task_prompt_cli = manipulation_policy\.task_prompt_cli:main"', setup)
    setup_cfg = (PACKAGE_DIR / "setup.cfg").read_text()
    assert "install_scripts=$base/lib/manipulation_policy" in setup_cfg


# ---------------------------------------------------------------- over DDS


class Listener:
    """A subscriber on ``topic`` in ``rig``, recording the strings received."""

    def __init__(self, rig: Rig, topic: str):
        self.received: list[str] = []
        self._lock = threading.Lock()
        rig.node.create_subscription(String, topic, self._on, 10)

    def _on(self, msg: String) -> None:
        with self._lock:
            self.received.append(msg.data)

    def messages(self) -> list[str]:
        with self._lock:
            return list(self.received)


def type_into_cli(monkeypatch, lines: str, *args: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return task_prompt_cli.main(["--wait-for-subscriber-sec", "10", *args])


def test_typed_tasks_and_stop_arrive_in_order_and_quit_ends(monkeypatch, capsys):
    with Rig() as rig:
        topic = f"{rig.namespace}/task_prompt"
        listener = Listener(rig, topic)
        status = type_into_cli(monkeypatch, "pick up the bottle\n\nstatus\nhelp\nstop\n"
                               "place it on the table\nquit\nnever sent\n",
                               "--topic", topic)  # fmt: skip
        assert status == 0
        # main() returns once every listener acknowledged: nothing is still in flight.
        assert wait_until(lambda: len(listener.messages()) >= 3, timeout=5.0)
        assert listener.messages() == ["pick up the bottle", "", "place it on the table"]
    out = capsys.readouterr().out
    assert f"Publishing to: {topic} (1 subscriber)" in out
    assert 'Sent: "pick up the bottle"' in out and 'Last task: "pick up the bottle"' in out
    assert "Task cleared" in out


def test_without_topic_tasks_go_to_upstreams_and_this_projects_task_topic(monkeypatch):
    with Rig() as rig:
        upstream = Listener(rig, "/manipulation/task_prompt")
        project = Listener(rig, "/manipulation/instruction")
        assert type_into_cli(monkeypatch, "open the drawer\n") == 0  # then end of input
        assert wait_until(lambda: upstream.messages() and project.messages(), timeout=5.0)
        assert upstream.messages() == project.messages() == ["open the drawer"]


def test_a_node_started_with_upstreams_names_acts_on_the_clis_tasks(monkeypatch):
    """Upstream's user: the node gets upstream's parameter names and no topic, the task comes
    from task_prompt_cli with its defaults."""
    with Rig() as rig, ScriptedPolicyServer() as server:
        overrides = [p for p in rig.parameters(remote_url=server.url, inference_rate=20.0)
                     if p.name != "instruction_topic"]  # fmt: skip
        overrides.append(Parameter("use_remote", value=True))
        node = rig.add(RemotePolicyNode(context=rig.context, namespace=rig.namespace,
                                        parameter_overrides=overrides))  # fmt: skip
        assert node.get_parameter("instruction_topic").value == "/manipulation/task_prompt"
        rig.stream_joint_states()
        rig.stream_camera(sample_image())
        assert not wait_until(lambda: server.request_count() > 0, timeout=1.0)  # no task yet

        assert type_into_cli(monkeypatch, "put the cup in the sink\n") == 0
        assert wait_until(lambda: server.observations()
                          and server.observations()[-1].instruction == "put the cup in the sink")
        assert wait_until(lambda: len(rig.outputs()) >= 3)
        assert node.task_active

        assert type_into_cli(monkeypatch, "stop\n") == 0
        assert wait_until(lambda: not node.task_active)


def test_the_installed_command_sends_piped_tasks():
    packages = pytest.importorskip("ament_index_python.packages")
    try:
        prefix = Path(packages.get_package_prefix("manipulation_policy"))
    except packages.PackageNotFoundError:
        pytest.skip("workspace not built (make build)")
    script = prefix / "lib" / "manipulation_policy" / "task_prompt_cli"
    assert script.is_file() and os.access(script, os.X_OK)
    with Rig() as rig:
        topic = f"{rig.namespace}/task_prompt"
        listener = Listener(rig, topic)
        done = subprocess.run(
            [str(script), "--topic", topic, "--wait-for-subscriber-sec", "10"],
            input="wipe the table\nexit\n", capture_output=True, text=True, timeout=60,
            env=os.environ.copy(),
        )
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: listener.messages() == ["wipe the table"], timeout=5.0)
    assert 'Sent: "wipe the table"' in done.stdout and "Traceback" not in done.stderr
