"""`task_prompt_cli`: type tasks for the policy nodes, as with upstream's command of that name.

    ros2 run manipulation_policy task_prompt_cli [--topic TOPIC]
        [--wait-for-subscriber-sec SEC] [--ros-args ...]

Each line typed is sent as the task (std_msgs/String). Commands: ``stop`` or
``clear`` sends an empty task (the node stops acting), ``status`` shows the
last task and who listens, ``help`` lists the commands, ``quit`` / ``exit``
(or Ctrl-D, Ctrl-C) ends. Lines may also be piped in:
``echo "pick up the cup" | ros2 run manipulation_policy task_prompt_cli``.

Without ``--topic`` the tasks go to both task topics: upstream's
``/manipulation/task_prompt`` (where a node started with upstream's parameter
names, or with ``instruction_topic:=/manipulation/task_prompt``, listens) and
this project's default ``/manipulation/instruction``; so they reach a node
started either way. ``--topic`` sends to that one topic only. Before the first
prompt it waits up to ``--wait-for-subscriber-sec`` for a listener; before it
ends, until every task sent has been received (at most a few seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, TextIO

from manipulation_policy.core.contract import MAX_INSTRUCTION_CHARS

UPSTREAM_TASK_TOPIC = "/manipulation/task_prompt"
PROJECT_TASK_TOPIC = "/manipulation/instruction"
DEFAULT_TOPICS = (UPSTREAM_TASK_TOPIC, PROJECT_TASK_TOPIC)
FLUSH_TIMEOUT_SEC = 3.0
NODE_NAME = "task_prompt_cli"

HELP_TEXT = f"""\
Type a task and press Enter to send it to the policy node, e.g.
  pick up the red cup
  put the cup in the sink
Commands:
  stop, clear   end the current task (the robot stops acting on it)
  status        show the last task sent and who listens
  help          show this text
  quit, exit    leave (also Ctrl-D, Ctrl-C)
A task is at most {MAX_INSTRUCTION_CHARS} characters."""


# ---------------------------------------------------------------- arguments


def _topic(text: str) -> str:
    if not text or any(ch.isspace() for ch in text):
        raise argparse.ArgumentTypeError(f"must be a topic name without spaces, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value != value:  # NaN
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return max(0.0, value)  # as upstream: a negative wait is no wait


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=NODE_NAME,
        description="Send task prompts (std_msgs/String) to the policy node, one per line.",
        epilog="ROS arguments (--ros-args ...) are passed on to ROS.",
    )
    parser.add_argument(
        "--topic",
        type=_topic,
        default=None,
        help=f"topic to publish the tasks on (default: both {UPSTREAM_TASK_TOPIC}, "
        f"upstream's, and {PROJECT_TASK_TOPIC}, this project's node default)",
    )
    parser.add_argument(
        "--wait-for-subscriber-sec",
        type=_seconds,
        default=2.0,
        metavar="SEC",
        help="how long to wait for a listening policy node before the first prompt "
        "(default: 2.0)",
    )
    return parser


def parse_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our options, the rest for ROS); exits with status 2 on a bad option, as argparse."""
    return build_parser().parse_known_args(list(argv))


def topics_of(options: argparse.Namespace) -> tuple[str, ...]:
    return (options.topic,) if options.topic else DEFAULT_TOPICS


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    kind: str  # "send", "clear", "status", "help", "quit", "nothing", "refuse"
    text: str = ""  # the task for "send"; the reason for "refuse"


def interpret(line: str) -> Command:
    """What a typed line means; a task is sent stripped, an empty line does nothing."""
    text = line.strip()
    word = text.lower()
    if not text:
        return Command("nothing")
    if word in ("quit", "exit"):
        return Command("quit")
    if word in ("stop", "clear"):
        return Command("clear")
    if word in ("status", "help"):
        return Command(word)
    if len(text) > MAX_INSTRUCTION_CHARS:
        return Command("refuse", f"not sent: a task is at most {MAX_INSTRUCTION_CHARS} "
                                 f"characters, this one has {len(text)}")  # fmt: skip
    return Command("send", text)


def describe_listeners(counts: dict[str, int]) -> str:
    return ", ".join(
        f"{topic} ({count} subscriber{'' if count == 1 else 's'})"
        for topic, count in counts.items()
    )


# ---------------------------------------------------------------- ROS


class TaskPublisher:
    """One node with a reliable String publisher per topic (as the nodes subscribe)."""

    def __init__(self, topics: Sequence[str], ros_args: Sequence[str]):
        import rclpy
        from rclpy.context import Context
        from std_msgs.msg import String

        self._rclpy = rclpy
        self._string = String
        self.context = Context()
        rclpy.init(args=[NODE_NAME, *ros_args], context=self.context)
        try:
            self.node = rclpy.create_node(NODE_NAME, context=self.context)
            self.publishers = {
                topic: self.node.create_publisher(String, topic, 10) for topic in topics
            }
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            raise

    def subscriber_counts(self) -> dict[str, int]:
        return {
            publisher.topic_name: publisher.get_subscription_count()
            for publisher in self.publishers.values()
        }

    def wait_for_subscribers(self, timeout_sec: float) -> None:
        deadline = time.monotonic() + timeout_sec
        while time.monotonic() < deadline and not any(self.subscriber_counts().values()):
            time.sleep(0.05)

    def send(self, task: str) -> None:
        message = self._string(data=task)
        for publisher in self.publishers.values():
            publisher.publish(message)

    def flush(self, timeout_sec: float = FLUSH_TIMEOUT_SEC) -> bool:
        """Wait until each listener acknowledged what was sent (bounded)."""
        from rclpy.duration import Duration

        deadline = time.monotonic() + timeout_sec
        acked = True
        for publisher in self.publishers.values():
            left = max(0.0, deadline - time.monotonic())
            acked = publisher.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))) and acked
        return acked

    def close(self) -> None:
        try:
            self.node.destroy_node()
        finally:
            self._rclpy.try_shutdown(context=self.context)


def run(publisher: TaskPublisher, wait_sec: float, read_line: Callable[[], str],
        out: TextIO) -> None:  # fmt: skip
    """The prompt loop: ``read_line`` (``input("> ")``: a line, EOFError at the end of
    input) until quit or the end of input."""
    print(HELP_TEXT, file=out)
    publisher.wait_for_subscribers(wait_sec)
    counts = publisher.subscriber_counts()
    print(f"Publishing to: {describe_listeners(counts)}"
          + ("" if any(counts.values()) else " - no policy node listens yet"),
          file=out, flush=True)  # fmt: skip
    last_task = ""
    while True:
        try:
            line = read_line()
        except EOFError:  # Ctrl-D, or the end of piped lines
            print(file=out)
            return
        command = interpret(line)
        if command.kind == "quit":
            return
        if command.kind == "send":
            publisher.send(command.text)
            last_task = command.text
            print(f'Sent: "{command.text}"', file=out, flush=True)
        elif command.kind == "clear":
            publisher.send("")
            last_task = ""
            print("Task cleared: the robot stops acting on it.", file=out, flush=True)
        elif command.kind == "status":
            print(f'Last task: "{last_task}"' if last_task else "No task active.", file=out)
            print(f"Topics: {describe_listeners(publisher.subscriber_counts())}",
                  file=out, flush=True)  # fmt: skip
        elif command.kind == "help":
            print(HELP_TEXT, file=out, flush=True)
        elif command.kind == "refuse":
            print(command.text, file=out, flush=True)


def main(args: Optional[Sequence[str]] = None) -> int:
    options, ros_args = parse_arguments(sys.argv[1:] if args is None else args)
    publisher = TaskPublisher(topics_of(options), ros_args)
    try:
        run(publisher, options.wait_for_subscriber_sec, lambda: input("> "), sys.stdout)
    except KeyboardInterrupt:
        print(file=sys.stdout)
    finally:
        try:
            if not publisher.flush():
                print("warning: not every listener confirmed the last task", file=sys.stderr)
        except Exception:  # noqa: BLE001 - e.g. ROS already shut down by Ctrl-C
            pass
        publisher.close()
    print("Task prompt CLI ended.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
