#!/usr/bin/env python3
"""Many robots, one model: actions/s and latency for 1 and N concurrent clients, batched.

    # CPU: the stub (server cost only), a simulated memory-bound model, the tiny OpenVLA
    .ci/ros_env.sh python bench/bench_batching.py
    .ci/ros_env.sh python bench/bench_batching.py --backend fixed-cost --call-ms 30
    .ci/ros_env.sh python bench/bench_batching.py --backend tiny-openvla
    # a GPU host: OpenVLA itself (any policy_server option after --)
    .ci/ros_env.sh python bench/bench_batching.py --backend openvla --startup-timeout 1200 \\
        -- --model /models/openvla-7b --unnorm-key bridge_orig

Starts the real policy server (``python -m manipulation_policy.policy_server``)
on 127.0.0.1 and, for each client count, runs that many robots for --seconds:
each client its own kept-alive connection and its own camera frame (same
instruction, so they can share a batch), sending its next request as soon as
it has its answer (a robot at full speed). Printed per row: requests, errors,
actions/s (answers with status 200 per second, all clients together), latency
p50/p99, the mean batch the server formed (from /info), how many answers equal
the answer the same observation got alone (sent one at a time before the
load), and GPU memory as /info reports it (allocated/reserved, CUDA only).
``--baseline`` repeats the rows with ``--max-batch-size 1`` (no batching).
The header names the machine, versions and the backend's description.

Backends: ``stub`` (sub-millisecond model: the server's own cost),
``fixed-cost`` (bench_backends.FixedCostBackend: a call costs --call-ms plus
--item-ms per observation, as memory-bound GPU decoding does; a simulation,
not a model), ``tiny-openvla`` (the tests' tiny OpenVLA checkpoint, built
into a temporary directory), ``openvla`` (the real backend; model options
after ``--``).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

import manipulation_policy
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.server.process import ServerProcess

BENCH_DIR = Path(__file__).resolve().parent
TEST_DIR = BENCH_DIR.parent / "src" / "manipulation_policy" / "test"
ROBOT_TIMEOUT_S = 1.0  # remote_timeout_sec's default on the robot side
INSTRUCTION = "pick up the red block"


def camera_frame(client: int, size: int = 224) -> bytes:
    """A camera-like JPEG, different for each client (shading, an object, noise)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([200 * x + 30, 150 * y + 50, 120 * (1 - x * y) + 40], axis=-1)
    top = size // 8 + (client * 17) % (size // 2)
    rgb[top : top + size // 6, size // 4 : size // 2] = (220, 40 + 20 * client % 200, 40)
    rgb += np.random.default_rng(client).normal(0, 6, rgb.shape)
    return encode_jpeg(np.clip(rgb, 0, 255).astype(np.uint8), 90)


def request_body(client: int) -> bytes:
    joints = {"name": [f"j{i}" for i in range(7)], "position": [0.05 * client] * 7,
              "velocity": [], "effort": []}  # fmt: skip
    return json.dumps({
        "reference_frame": "base_link", "joint_states": joints,
        "image": base64.b64encode(camera_frame(client)).decode("ascii"),
        "image_encoding": "jpeg", "image_width": 224, "image_height": 224,
        "instruction": INSTRUCTION,
    }).encode()  # fmt: skip


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, Any]:
    connection.request("POST", "/infer", body=body, headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    payload = answer.read()
    try:
        return answer.status, json.loads(payload)
    except ValueError:
        return answer.status, None


def comparable(answer: Any) -> Any:
    if isinstance(answer, dict):
        return {k: v for k, v in answer.items() if k != "inference_time_ms"}
    return answer


def get_json(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_row(port: int, bodies: list[bytes], alone: list[Any], seconds: float) -> dict:
    clients = len(bodies)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    equal = [0] * clients
    gate = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        gate.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            status, answer = post(connection, bodies[slot])
            if status == 200:
                latencies[slot].append(time.perf_counter() - started)
                equal[slot] += comparable(answer) == alone[slot]
            else:
                errors[slot] += 1
        connection.close()

    before = get_json(port, "/info")["batching"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    info = get_json(port, "/info")
    after = info["batching"]
    merged = sorted(v for per_client in latencies for v in per_client)
    mean_batch = None
    if after.get("batches_total") is not None:
        batches = after["batches_total"] - before["batches_total"]
        served = after["batched_requests_total"] - before["batched_requests_total"]
        mean_batch = served / batches if batches else None
    return {
        "clients": clients,
        "requests": len(merged) + sum(errors),
        "errors": sum(errors),
        "actions_per_s": len(merged) / elapsed,
        "p50_ms": percentile(merged, 0.5) * 1e3,
        "p99_ms": percentile(merged, 0.99) * 1e3,
        "mean_batch": mean_batch,
        "equal": sum(equal),
        "ok": len(merged),
        "gpu_memory": info.get("gpu_memory"),
    }


def gib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_row(label: str, row: dict) -> str:
    memory = row["gpu_memory"] or {}
    batch = "-" if row["mean_batch"] is None else f"{row['mean_batch']:.2f}"
    return (
        f"{label:<10} {row['clients']:>7} {row['requests']:>8} {row['errors']:>6} "
        f"{row['actions_per_s']:>10.1f} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f} "
        f"{batch:>10} {row['equal']:>6}/{row['ok']:<6} "
        f"{gib(memory.get('allocated_bytes')):>8} {gib(memory.get('reserved_bytes')):>8}"
    )


HEADER = (
    f"{'serving':<10} {'clients':>7} {'requests':>8} {'errors':>6} {'actions/s':>10} "
    f"{'p50 ms':>9} {'p99 ms':>9} {'mean batch':>10} {'==alone':>13} "
    f"{'GPU alloc':>8} {'GPU resv':>8}"
)


def server_arguments(args: argparse.Namespace, workdir: str) -> tuple[list[str], list[str]]:
    """(policy_server arguments for the backend, extra PYTHONPATH entries)."""
    if args.backend == "stub":
        return ["--backend", "stub"], []
    if args.backend == "fixed-cost":
        os.environ["BENCH_CALL_MS"] = str(args.call_ms)
        os.environ["BENCH_ITEM_MS"] = str(args.item_ms)
        return ["--backend", "bench_backends:FixedCostBackend"], [str(BENCH_DIR)]
    if args.backend == "tiny-openvla":
        sys.path.insert(0, str(TEST_DIR))
        import tiny_openvla

        model_dir = tiny_openvla.build_tiny_openvla(
            Path(workdir) / "tiny_openvla",
            dataset_statistics=tiny_openvla.norm_stats_for(tiny_openvla.DEFAULT_UNNORM_KEY),
        )
        return ["--backend", "openvla", "--model", str(model_dir)], []
    return ["--backend", args.backend], []


def measure(args, backend_args, pythonpath, max_batch_size: int) -> tuple[dict, list[dict]]:
    serving = [*backend_args, "--max-batch-size", str(max_batch_size),
               "--batch-window-ms", str(args.batch_window_ms),
               "--max-queue", str(max(args.clients) * 2), "--no-access-log",
               "--log-level", "warning", *args.server_args]  # fmt: skip
    with ServerProcess(*serving, env={"MANIPULATION_POLICY_API_KEY": ""},
                       extra_pythonpath=pythonpath,
                       startup_timeout=args.startup_timeout) as server:  # fmt: skip
        bodies = [request_body(i) for i in range(max(args.clients))]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        for _ in range(args.warmup):
            post(connection, bodies[0])
        alone = []
        for body in bodies:  # one at a time: the answer each observation gets alone
            status, answer = post(connection, body)
            if status != 200:
                raise SystemExit(f"the server answered {status}: {answer}")
            alone.append(comparable(answer))
        connection.close()
        info = get_json(server.port, "/info")
        rows = [
            run_row(server.port, bodies[:clients], alone[:clients], args.seconds)
            for clients in args.clients
        ]
    return info, rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="stub",
                        help="stub | fixed-cost | tiny-openvla | openvla | module:Class")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="per row")
    parser.add_argument("--warmup", type=int, default=3, help="requests before measuring")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--baseline", action="store_true",
                        help="also measure without batching (--max-batch-size 1)")
    parser.add_argument("--call-ms", type=float, default=30.0, help="fixed-cost: per call")
    parser.add_argument("--item-ms", type=float, default=1.0, help="fixed-cost: per observation")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("server_args", nargs="*", help="more policy_server options, after --")
    args = parser.parse_args(argv)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench_batching_") as workdir:
        backend_args, pythonpath = server_arguments(args, workdir)
        settings = [(f"batch {args.max_batch_size}", args.max_batch_size)]
        if args.baseline:
            settings.append(("unbatched", 1))
        results = []
        info: dict = {}
        for label, size in settings:
            info, rows = measure(args, backend_args, pythonpath, size)
            results.append((label, rows))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench_batching  {now}  manipulation_policy {manipulation_policy.__version__}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {platform.platform()}")  # fmt: skip
    backend = info.get("backend", {})
    keep = ("backend", "model", "device", "dtype", "quantization", "attn_implementation",
            "transformers_version", "torch_version", "batched_decoding",
            "batched_decoding_off_reason")  # fmt: skip
    print("backend: " + ", ".join(f"{k}={backend[k]}" for k in keep if k in backend))
    if args.backend == "fixed-cost":
        print(f"simulated model: {args.call_ms} ms per call + {args.item_ms} ms per observation")
    memory = info.get("gpu_memory") or {}
    print(f"gpu: {memory.get('device', 'none (CPU)')}")
    print(f"window {args.batch_window_ms} ms, {args.seconds} s per row, "
          f"robot timeout {ROBOT_TIMEOUT_S} s")  # fmt: skip
    print()
    print(HEADER)
    for label, rows in results:
        for row in rows:
            print(format_row(label, row))
    batched = results[0][1]
    if len(batched) > 1 and batched[0]["actions_per_s"] > 0:
        last = batched[-1]
        print()
        gain = last["actions_per_s"] / batched[0]["actions_per_s"]
        first = batched[0]["clients"]
        print(f"{last['clients']} clients: {gain:.2f}x the actions/s of {first}; "
              f"p99 {last['p99_ms']:.0f} ms "
              f"{'within' if last['p99_ms'] < ROBOT_TIMEOUT_S * 1e3 else 'OVER'} the robots' "
              f"{ROBOT_TIMEOUT_S:g} s timeout")  # fmt: skip
    unequal = sum(row["ok"] - row["equal"] for _, rows in results for row in rows)
    print(f"answers that differ from the same observation alone: {unequal}")
    return 0 if unequal == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
