"""Remote path latency: camera publish -> PolicyOutput receive, beside its floor.

    .ci/ros_env.sh python bench/bench_remote_path.py            # ~1 minute
    .ci/ros_env.sh python bench/bench_remote_path.py --seconds 30 --rates 30

Runs the real stack on loopback: the policy server (stub backend, so the
model costs ~nothing and the path itself is measured) and the remote policy
node as subprocesses, and in this process a 640x480 rgb8 camera at 30 Hz and
a PolicyOutput subscriber. Latency is the time from publishing a frame to
receiving the PolicyOutput stamped with it (one monotonic clock, this
process). It includes the node's sampling delay: the node infers on a timer
at inference_rate, so a frame waits up to one period for the next tick;
a row at a higher rate shows the path without most of that wait.

The floor, measured in the same run on the same frame:
- JPEG: what the node must do to the image (resize 640x480 -> 224x224,
  encode at quality 90) and the server must undo (decode);
- HTTP: a bare loopback POST of the same request bytes to an echo server in
  another process, on a kept-alive requests.Session (what the node uses).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Optional

import numpy as np
import rclpy
import requests
from builtin_interfaces.msg import Time
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState

from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.core.contract import observation_to_request
from manipulation_policy.core.imaging import decode_image_bytes, encode_jpeg, resize_rgb
from manipulation_policy.core.policy_types import JointStateData, Observation
from manipulation_policy.nodes.ros_conversion import (
    image_to_rgb,
    rgb_to_image,
    stamp_to_nanoseconds,
)
from manipulation_policy.server.process import ServerProcess, free_port

WIDTH, HEIGHT, SENT_SIDE, JPEG_QUALITY = 640, 480, 224, 90
JOINT_NAMES = ["j1", "j2", "j3", "j4", "j5", "j6", "gripper"]

ECHO_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
    """
)


def frame(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    base = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 40, size=(HEIGHT, WIDTH, 3))
    return np.clip(base * np.array([1.0, 0.6, 0.3]) + noise, 0, 255).astype(np.uint8)


def percentiles(samples_sec: list[float]) -> tuple[int, float, float]:
    values = np.asarray(samples_sec) * 1000.0
    return len(values), float(np.percentile(values, 50)), float(np.percentile(values, 99))


def time_calls(function: Callable[[], object], repeat: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return samples


# ---------------------------------------------------------------- floors


def jpeg_floor(rgb: np.ndarray, repeat: int) -> tuple[list[float], list[float]]:
    def node_and_server_image_work():
        sized = resize_rgb(rgb, SENT_SIDE, SENT_SIDE)
        decode_image_bytes(encode_jpeg(sized, JPEG_QUALITY), "JPEG")

    def full_frame():
        decode_image_bytes(encode_jpeg(rgb, JPEG_QUALITY), "JPEG")

    return time_calls(node_and_server_image_work, repeat), time_calls(full_frame, repeat)


HEADERS = {"Content-Type": "application/json"}


def time_posts(url: str, payload: bytes, repeat: int, echoed: bool) -> list[float]:
    with requests.Session() as session:

        def post():
            answer = session.post(url, data=payload, headers=HEADERS, timeout=5.0)
            answer.raise_for_status()
            assert not echoed or len(answer.content) == len(payload)

        return time_calls(post, repeat)


def http_floor(payload: bytes, repeat: int) -> list[float]:
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port)])
    url = f"http://127.0.0.1:{port}/infer"
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                requests.post(url, data=b"{}", headers=HEADERS, timeout=1.0)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return time_posts(url, payload, repeat, echoed=True)
    finally:
        echo.terminate()
        echo.wait(10)


# ---------------------------------------------------------------- end to end


class Camera(Node):
    def __init__(self, context: Context, prefix: str, rate_hz: float):
        super().__init__("bench_camera", context=context)
        self._frames = [frame(i) for i in range(8)]
        self._count = 0
        self._lock = threading.Lock()
        self._sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.recording = False
        self.published = 0
        self._image_pub = self.create_publisher(Image, f"{prefix}/image", qos_profile_sensor_data)
        self._joint_pub = self.create_publisher(JointState, f"{prefix}/joint_states", 10)
        self.create_subscription(PolicyOutput, f"{prefix}/output", self._on_output, 10)
        self.create_timer(1.0 / rate_hz, self._publish)

    def _publish(self) -> None:
        joints = JointState()
        joints.name = JOINT_NAMES
        joints.position = [0.1 * i for i in range(len(JOINT_NAMES))]
        self._joint_pub.publish(joints)
        stamp = self.get_clock().now().to_msg()
        msg = rgb_to_image(self._frames[self._count % len(self._frames)], stamp)
        self._count += 1
        with self._lock:
            self._sent[stamp_to_nanoseconds(stamp)] = time.monotonic()
            if self.recording:
                self.published += 1
        self._image_pub.publish(msg)

    def _on_output(self, msg: PolicyOutput) -> None:
        received = time.monotonic()
        with self._lock:
            sent = self._sent.pop(stamp_to_nanoseconds(msg.header.stamp), None)
            if self.recording and sent is not None and msg.confidence > 0:
                self.latencies.append(received - sent)

    def record(self, on: bool) -> None:
        with self._lock:
            self.recording = on


def end_to_end(server_url: str, inference_rate: float, camera_hz: float, seconds: float,
               warmup: float) -> tuple[list[float], int]:
    prefix = f"/bench_{os.getpid()}_{int(inference_rate)}"
    node = subprocess.Popen(
        [
            sys.executable, "-m", "manipulation_policy.nodes.remote_policy_node", "--ros-args",
            "-p", f"remote_url:={server_url}",
            "-p", f"inference_rate:={float(inference_rate)}",
            "-p", f"camera_topic:={prefix}/image",
            "-p", f"joint_states_topic:={prefix}/joint_states",
            "-p", f"output_topic:={prefix}/output",
            "--log-level", "warn",
        ]
    )
    context = Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    camera = Camera(context, prefix, camera_hz)
    executor.add_node(camera)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        time.sleep(warmup)  # node start-up, discovery, first connections
        camera.record(True)
        time.sleep(seconds)
        camera.record(False)
        return list(camera.latencies), camera.published
    finally:
        stop.set()
        spinner.join(5.0)
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(5)
        executor.remove_node(camera)
        camera.destroy_node()
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown(context=context)


# ---------------------------------------------------------------- report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--rates", default="30,120",
                        help="inference_rate values to run, comma-separated (default 30,120)")
    parser.add_argument("--repeat", type=int, default=300, help="floor repetitions")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    rgb = frame(0)
    # The request the node sends for this frame.
    ros_image = rgb_to_image(rgb, Time())
    sized = resize_rgb(image_to_rgb(ros_image), SENT_SIDE, SENT_SIDE)
    body = observation_to_request(
        Observation(JointStateData(tuple(JOINT_NAMES), tuple(0.1 * i for i in range(7))),
                    sized, instruction="pick up the object"),
        jpeg_quality=JPEG_QUALITY,
    )
    payload = json.dumps(body, separators=(",", ":")).encode()

    jpeg_node, jpeg_full = jpeg_floor(rgb, args.repeat)
    conversion = time_calls(lambda: image_to_rgb(ros_image), args.repeat)
    http = http_floor(payload, args.repeat)

    rows: list[tuple[str, tuple[int, float, float]]] = [
        ("ROS Image -> RGB array (640x480 rgb8)", percentiles(conversion)),
        (f"JPEG: resize to {SENT_SIDE}x{SENT_SIDE} + encode q{JPEG_QUALITY} + decode",
         percentiles(jpeg_node)),
        (f"JPEG: 640x480 encode q{JPEG_QUALITY} + decode (reference)", percentiles(jpeg_full)),
        (f"HTTP: loopback echo of the request ({len(payload) / 1024:.1f} KiB)", percentiles(http)),
    ]
    floor_p50 = rows[0][1][1] + rows[1][1][1] + rows[3][1][1]
    end_to_end_rows = []
    with ServerProcess("--backend", "stub", "--log-level", "warning") as server:
        served = time_posts(f"{server.base_url}/infer", payload, args.repeat, echoed=False)
        end_to_end_rows.append(
            ("HTTP: POST /infer to the stub policy server (same request)", percentiles(served))
        )
        for rate in rates:
            latencies, published = end_to_end(
                server.base_url, rate, args.camera_hz, args.seconds, args.warmup
            )
            if not latencies:
                print(f"no PolicyOutput received at inference_rate {rate:g}", file=sys.stderr)
                return 1
            label = f"end to end, inference_rate {rate:g} Hz ({len(latencies)}/{published} frames)"
            end_to_end_rows.append((label, percentiles(latencies)))

    print(f"\nRemote path (ROS -> HTTP -> ROS): camera {WIDTH}x{HEIGHT} rgb8 at "
          f"{args.camera_hz:g} Hz, stub backend, loopback")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}\n")
    print(f"| {'step':62s} | {'n':>5s} | {'p50 ms':>7s} | {'p99 ms':>7s} |")
    print(f"|{'-' * 64}|{'-' * 7}|{'-' * 9}|{'-' * 9}|")
    for label, (n, p50, p99) in rows + end_to_end_rows:
        print(f"| {label:62s} | {n:5d} | {p50:7.2f} | {p99:7.2f} |")
    print(f"| {'floor: conversion + JPEG (sent size) + HTTP echo, p50 sum':62s} | {'':5s} | "
          f"{floor_p50:7.2f} | {'':7s} |")
    print()
    for label, (_, p50, _) in end_to_end_rows[1:]:
        print(f"ratio {label.split(' (')[0]} p50 / floor p50: {p50 / floor_p50:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
