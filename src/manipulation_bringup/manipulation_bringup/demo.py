"""`make demo`: the remote path end to end on the stub backend, printed as it runs.

Starts the HTTP policy server (stub backend) on a free 127.0.0.1 port, the
remote policy node in this process, a synthetic camera (640x480 rgb8, a
moving colour pattern) and a joint-state publisher; prints the PolicyOutputs
it receives with the camera-publish -> PolicyOutput latency, then a summary,
and shuts everything down. Exit status 0 when outputs arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Optional

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState

from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.nodes.remote_policy_node import RemotePolicyNode
from manipulation_policy.nodes.ros_conversion import rgb_to_image, stamp_to_nanoseconds
from manipulation_policy.server.process import ServerProcess, ServerStartError

WIDTH, HEIGHT = 640, 480
JOINT_NAMES = ["base", "shoulder", "elbow", "wrist_1", "wrist_2", "wrist_3", "gripper"]
CAMERA_TOPIC = "/camera/color/image_raw"
JOINT_STATES_TOPIC = "/joint_states"
OUTPUT_TOPIC = "/manipulation/policy_output"


def moving_pattern(frame: int, cycle: int = 30) -> np.ndarray:
    """A 640x480 RGB frame; colours and a wave drift over a ``cycle``-frame loop, so the
    mean colour, and with it the stub's answer, changes from frame to frame."""
    turn = 2 * np.pi * (frame % cycle) / cycle
    x = np.linspace(0.0, 1.0, WIDTH, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None]
    red = 0.5 + 0.35 * np.sin(turn) + 0.15 * (x - 0.5)
    green = 0.5 + 0.35 * np.cos(2 * turn) + 0.15 * (y - 0.5)
    blue = 0.5 + 0.3 * np.sin(2 * np.pi * (x + y) * 3 - turn) + 0.1 * np.sin(turn)
    channels = np.broadcast_arrays(red, green, blue)
    return (np.clip(np.dstack(channels), 0.0, 1.0) * 255).astype(np.uint8)


class DemoRobot(Node):
    """Plays the robot: camera and joint states out, PolicyOutputs in."""

    def __init__(self, context: Context, camera_hz: float):
        super().__init__("demo_robot", context=context)
        self._frames = [moving_pattern(i) for i in range(30)]
        self._frame = 0
        self._lock = threading.Lock()
        self._sent_at: dict[int, float] = {}
        self.received: list[tuple[PolicyOutput, Optional[float]]] = []
        self.new_output = threading.Event()
        self._camera = self.create_publisher(Image, CAMERA_TOPIC, qos_profile_sensor_data)
        self._joints = self.create_publisher(JointState, JOINT_STATES_TOPIC, 10)
        self.create_subscription(PolicyOutput, OUTPUT_TOPIC, self._on_output, 10)
        self.create_timer(1.0 / camera_hz, self._publish_frame)
        self.create_timer(0.02, self._publish_joints)

    def _publish_frame(self) -> None:
        stamp = self.get_clock().now().to_msg()
        msg = rgb_to_image(self._frames[self._frame % len(self._frames)], stamp, "camera")
        self._frame += 1
        with self._lock:
            self._sent_at[stamp_to_nanoseconds(stamp)] = time.monotonic()
        self._camera.publish(msg)

    def _publish_joints(self) -> None:
        msg = JointState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.name = JOINT_NAMES
        t = time.monotonic()
        msg.position = [0.3 * np.sin(t / 2 + i) for i in range(len(JOINT_NAMES))]
        self._joints.publish(msg)

    def _on_output(self, msg: PolicyOutput) -> None:
        received = time.monotonic()
        with self._lock:
            sent = self._sent_at.get(stamp_to_nanoseconds(msg.header.stamp))
            self.received.append((msg, None if sent is None else received - sent))
        self.new_output.set()


def describe(index: int, msg: PolicyOutput, latency: Optional[float]) -> str:
    stamp = f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec // 1_000_000:03d}"
    mode = "absolute" if msg.eef_target_mode == PolicyOutput.EEF_TARGET_ABSOLUTE else "delta"
    if msg.has_eef_target:
        p = msg.eef_target_pose.position
        target = f"({p.x:+.4f}, {p.y:+.4f}, {p.z:+.4f}) m"
    else:
        target, mode = "hold", "-"
    # PolicyOutput's gripper meaning (OpenVLA's and upstream's): 0 = closed, 1 = open.
    if msg.gripper_active:
        state = "open" if msg.gripper_command >= 0.5 else "closed"
        gripper = f"{msg.gripper_command:.3f} {state:6s}"
    else:
        gripper = "  -          "
    shown = f"{latency * 1000:6.1f} ms" if latency is not None else "     ?"
    return (
        f"{index:3d}  {stamp}  {mode:8s}  {target:32s}  {gripper:13s}  "
        f"{msg.confidence:4.2f}  {shown}"
    )


def run(outputs_wanted: int, deadline_sec: float, camera_hz: float, rate_hz: float) -> int:
    print("demo: starting the policy server (stub backend) on 127.0.0.1 ...", flush=True)
    try:
        server = ServerProcess("--backend", "stub", startup_timeout=20.0).start()
    except ServerStartError as exc:
        print(f"demo: the policy server did not start: {exc}", file=sys.stderr)
        return 1
    context = Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    nodes: list[Node] = []
    try:
        policy = RemotePolicyNode(
            context=context,
            parameter_overrides=[
                Parameter("remote_url", value=server.base_url),
                Parameter("inference_rate", value=rate_hz),
            ],
        )
        robot = DemoRobot(context, camera_hz)
        nodes = [policy, robot]
        for node in nodes:
            executor.add_node(node)
        print(
            f"demo: server {server.base_url}; camera {WIDTH}x{HEIGHT} rgb8 at {camera_hz:g} Hz "
            f"on {CAMERA_TOPIC}; remote_policy_node at {rate_hz:g} Hz -> {OUTPUT_TOPIC}\n",
            flush=True,
        )
        print(
            "demo: the stub backend's answers are synthetic (derived from the image colour); "
            "gripper_command 0 = closed, 1 = open\n"
        )
        print(
            "  #  stamp [s]       mode      eef target                        gripper        conf"
            "  latency"
        )
        printed = 0
        end = time.monotonic() + deadline_sec
        while printed < outputs_wanted and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
            while printed < min(len(robot.received), outputs_wanted):
                msg, latency = robot.received[printed]
                printed += 1
                print(describe(printed, msg, latency), flush=True)
        latencies = [lat for _, lat in robot.received[:printed] if lat is not None]
        holds = sum(1 for msg, _ in robot.received[:printed] if msg.confidence == 0.0)
        print()
        if printed == 0:
            print(
                f"demo: FAILED: no PolicyOutput arrived on {OUTPUT_TOPIC} within "
                f"{deadline_sec:g} s (policy node counters: {policy.counters})",
                file=sys.stderr,
            )
            return 1
        summary = f"demo: {printed} PolicyOutputs ({holds} holds)"
        if latencies:
            summary += (
                f"; camera publish -> PolicyOutput latency median "
                f"{statistics.median(latencies) * 1000:.1f} ms "
                f"(min {min(latencies) * 1000:.1f}, max {max(latencies) * 1000:.1f})"
            )
        print(summary, flush=True)
        return 0
    finally:
        for node in nodes:
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown(context=context)
        server.stop(timeout=10.0)
        print("demo: stopped the node and the policy server", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=15, help="outputs to print (default 15)")
    parser.add_argument(
        "--deadline",
        type=float,
        default=20.0,
        help="give up after this many seconds without enough outputs",
    )
    parser.add_argument("--camera-hz", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=10.0, help="inference_rate of the node")
    args = parser.parse_args(argv)
    try:
        return run(args.outputs, args.deadline, args.camera_hz, args.rate)
    except (KeyboardInterrupt, ExternalShutdownException):
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
