"""Action chunks end to end: a simulated chunked policy through the real server and the
remote node over DDS, per latency L, chunk length H and chunk_merge.

    .ci/ros_env.sh python bench/bench_chunks.py                  # ~4 minutes
    .ci/ros_env.sh python bench/bench_chunks.py --seconds 10 --latencies 200 --lengths 8
    .ci/ros_env.sh python bench/bench_chunks.py --latencies 200 --lengths 8 --in-flight 1,2

For each (L, H) a policy server runs bench_chunk_backend:SimChunkBackend (it
sleeps L per answer, then answers H actions 50 ms apart whose targets follow
one smooth curve plus an offset that alternates +-1 cm between answers), and
a remote_policy_node subprocess (inference_rate 100 Hz: only the executor's
refill decides when observations go; refill_horizon_sec automatic) gets a
160x120 camera at 30 Hz from this process, which records every PolicyOutput.
``--in-flight K`` runs the server with ``--model-instances K`` and the node with
``remote_max_in_flight:=K``: up to K observations awaiting an answer, K predictions
at once (K = 1: one at a time, the defaults). Over the measured window it reports:

- cmd/s: commands published per second (underrun holds included), and steps/s
  (the chunks' own steps only);
- underrun: the fraction of the window's due ticks that found no action: the
  time the action timeline was dry (from an underrun hold to the next step),
  over the window; and the underrun holds seen;
- gaps: the fraction of the window's time with no step command in effect, a
  stricter figure that also counts cadence: a step is in effect for one period
  from its arrival here, or until the next command arrives if that is sooner,
  so a step that follows the previous one by more than a period leaves a gap
  (where a new chunk's grid, set by its own camera stamp, takes over from the
  old one's), and so does any underrun;
- max jump: the largest change of the target's x between consecutive commands
  (holds left out), in mm: what a controller would be asked to jump;
- age p50/p99: from the observation's stamp (header.stamp) to the command's
  arrival here, in ms (one clock: node and bench share the system clock).

H = 1 is a single-step policy: one command per answer, so 1/L commands/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from manipulation_msgs.msg import PolicyOutput
from manipulation_policy.core.api_key import API_KEY_ENV
from manipulation_policy.nodes.ros_conversion import rgb_to_image, stamp_to_nanoseconds
from manipulation_policy.server.process import ServerProcess

BENCH_DIR = str(Path(__file__).resolve().parent)
PERIOD_SEC = 0.05
CAMERA_HZ = 30.0
MERGES = ("replace", "temporal_ensemble", "crossfade")


class Recorder(Node):
    def __init__(self, context: Context, prefix: str):
        super().__init__("bench_chunks", context=context)
        self._image = np.full((120, 160, 3), 128, dtype=np.uint8)
        self._lock = threading.Lock()
        self.recording = False
        self.outputs: list[tuple[int, PolicyOutput]] = []  # (arrival, node clock ns)
        self._image_pub = self.create_publisher(Image, f"{prefix}/image", qos_profile_sensor_data)
        self.create_subscription(PolicyOutput, f"{prefix}/output", self._on_output, 100)
        self.create_timer(1.0 / CAMERA_HZ, self._publish)

    def _publish(self) -> None:
        self._image_pub.publish(rgb_to_image(self._image, self.get_clock().now().to_msg()))

    def _on_output(self, msg: PolicyOutput) -> None:
        now = self.get_clock().now().nanoseconds
        with self._lock:
            if self.recording:
                self.outputs.append((now, msg))

    def record(self, on: bool) -> None:
        with self._lock:
            self.recording = on


def run_node(
    server_url: str, merge: str, seconds: float, warmup: float, in_flight: int = 1
) -> tuple[list, int, int]:
    """(the outputs recorded in the window, the window's start and end, node clock ns)."""
    prefix = f"/bench_chunks_{os.getpid()}_{int(time.monotonic() * 1000)}"
    node = subprocess.Popen([
        sys.executable, "-m", "manipulation_policy.nodes.remote_policy_node", "--ros-args",
        "-p", f"remote_url:={server_url}",
        "-p", "inference_rate:=100.0",
        "-p", "remote_timeout_sec:=3.0",
        "-p", f"chunk_merge:={merge}",
        *(["-p", f"remote_max_in_flight:={in_flight}"] if in_flight > 1 else []),
        "-p", "image_width:=160", "-p", "image_height:=120",
        "-p", f"camera_topic:={prefix}/image",
        "-p", f"output_topic:={prefix}/output",
        "-p", f"chunk_topic:={prefix}/chunk",
        "--log-level", "error",
    ])  # fmt: skip
    context = Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    recorder = Recorder(context, prefix)
    executor.add_node(recorder)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        time.sleep(warmup)  # start-up, discovery, the first chunk
        recorder.record(True)
        start_ns = recorder.get_clock().now().nanoseconds
        time.sleep(seconds)
        recorder.record(False)
        end_ns = recorder.get_clock().now().nanoseconds
        return list(recorder.outputs), start_ns, end_ns
    finally:
        stop.set()
        spinner.join(5.0)
        node.terminate()
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(5)
        executor.remove_node(recorder)
        recorder.destroy_node()
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown(context=context)


def is_step(msg: PolicyOutput) -> bool:
    return msg.step_index < msg.chunk_length  # an underrun hold has step_index = chunk_length


def dry_fraction(outputs: list, start_ns: int, end_ns: int) -> float:
    """The fraction of [start, end) from each underrun hold to the next step command."""
    dry, since = 0, None
    for arrival, msg in outputs:
        if not is_step(msg):
            since = arrival if since is None else since
        elif since is not None:
            dry, since = dry + arrival - since, None
    if since is not None:
        dry += end_ns - since
    return dry / (end_ns - start_ns) if end_ns > start_ns else 0.0


def uncovered_fraction(outputs: list, start_ns: int, end_ns: int, period_ns: int) -> float:
    """The fraction of [start, end) in which no step command is in effect. A step is in
    effect for one period from its arrival, or until the next command (step or hold)
    arrives if that is sooner. Commands that arrived before the window are not
    recorded, so the window starts at the first one's arrival."""
    if not outputs:
        return 1.0
    covered = 0
    arrivals = [t for t, _ in outputs] + [end_ns]
    for (arrival, msg), next_arrival in zip(outputs, arrivals[1:], strict=True):
        if not is_step(msg):
            continue
        ends = min(next_arrival, arrival + period_ns, end_ns)
        covered += max(0, ends - arrival)
    window = end_ns - max(start_ns, arrivals[0])
    return max(0.0, 1.0 - covered / window) if window > 0 else 1.0


def figures(recorded: tuple[list, int, int], seconds: float) -> dict:
    outputs, start_ns, end_ns = recorded
    holds = [m for _, m in outputs if not is_step(m)]
    steps = [(t, m) for t, m in outputs if is_step(m)]
    xs = [m.eef_target_pose.position.x for _, m in steps]
    ages = [(t - stamp_to_nanoseconds(m.header.stamp)) / 1e6 for t, m in steps]
    return {
        "cmd_per_sec": len(outputs) / seconds,
        "steps_per_sec": len(steps) / seconds,
        "underrun": dry_fraction(outputs, start_ns, end_ns),
        "gaps": uncovered_fraction(outputs, start_ns, end_ns, int(PERIOD_SEC * 1e9)),
        "holds": len(holds),
        "max_jump_mm": 1000.0 * max(np.abs(np.diff(xs)), default=0.0) if len(xs) > 1 else 0.0,
        "age_p50": float(np.percentile(ages, 50)) if ages else float("nan"),
        "age_p99": float(np.percentile(ages, 99)) if ages else float("nan"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--latencies", default="50,200,500", help="L in ms, comma-separated")
    parser.add_argument("--lengths", default="1,8,50", help="H, comma-separated")
    parser.add_argument("--merges", default=",".join(MERGES),
                        help="chunk_merge values (H > 1; H = 1 runs replace only)")
    parser.add_argument("--in-flight", default="1",
                        help="K, comma-separated: server --model-instances K and node "
                        "remote_max_in_flight:=K")
    args = parser.parse_args(argv)
    latencies = [int(v) for v in args.latencies.split(",") if v.strip()]
    lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    merges = [v.strip() for v in args.merges.split(",") if v.strip()]
    in_flights = [int(v) for v in args.in_flight.split(",") if v.strip()]

    rows = []
    for latency, length, in_flight in itertools.product(latencies, lengths, in_flights):
        env = {
            API_KEY_ENV: "",
            "BENCH_LATENCY_MS": str(latency),
            "BENCH_CHUNK_H": str(length),
            "BENCH_PERIOD_SEC": str(PERIOD_SEC),
        }
        with ServerProcess(
            "--backend", "bench_chunk_backend:SimChunkBackend", "--log-level", "warning",
            "--no-access-log",
            *(["--model-instances", str(in_flight)] if in_flight > 1 else []),
            env=env, extra_pythonpath=[BENCH_DIR],
        ) as server:  # fmt: skip
            for merge in merges if length > 1 else ["replace"]:
                recorded = run_node(
                    server.base_url, merge, args.seconds, args.warmup, in_flight
                )
                figures_of_run = figures(recorded, args.seconds)
                rows.append((latency, length, in_flight, merge, figures_of_run))
                print(f"done: L={latency} ms H={length} K={in_flight} {merge}",
                      file=sys.stderr, flush=True)

    print(f"\nAction chunks through the server and the remote node (period "
          f"{PERIOD_SEC * 1000:g} ms, {args.seconds:g} s measured per run after "
          f"{args.warmup:g} s)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}\n")
    print("| L ms | H | in flight | chunk_merge | cmd/s | steps/s | underrun | holds | gaps "
          "| max jump mm | age p50 ms | age p99 ms |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for latency, length, in_flight, merge, f in rows:
        print(f"| {latency} | {length} | {in_flight} | {merge} | {f['cmd_per_sec']:.1f} | "
              f"{f['steps_per_sec']:.1f} | "
              f"{100 * f['underrun']:.0f}% | {f['holds']} | {100 * f['gaps']:.0f}% | "
              f"{f['max_jump_mm']:.1f} | "
              f"{f['age_p50']:.0f} | {f['age_p99']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
