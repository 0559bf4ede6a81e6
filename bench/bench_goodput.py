#!/usr/bin/env python3
"""Policy server goodput when clients ignore Retry-After: 8, 16 and 64 of them.

    .ci/ros_env.sh python bench/bench_goodput.py                  # ~40 s
    .ci/ros_env.sh python bench/bench_goodput.py --seconds 5 --model-ms 10

Starts the real server (``--max-queue 8``) as a subprocess on 127.0.0.1 with a
stub backend that takes ``--model-ms`` per prediction. For each row, N client
threads each keep one connection alive and send /infer with a 224x224 JPEG as
fast as they can; a 503 is retried at once (no back-off: the clients that make
admission matter). Each row runs for --seconds, and each client stops after
--max-requests, whichever comes first.

Columns: goodput (200 answers/s), p50/p99 latency of the admitted (200)
requests, the number of 503s, and goodput relative to the 8-client row. The
server must keep its goodput when overloaded: admission is decided before the
body is read, so a refused request costs it almost nothing.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.server.process import ServerProcess

BENCH_DIR = str(Path(__file__).resolve().parent)
CLIENT_COUNTS = (8, 16, 64)


class TimedStubBackend(StubBackend):
    """The stub, plus a fixed model time (BENCH_MODEL_MS) spent sleeping like a GPU wait."""

    name = "timed-stub"

    def __init__(self, **options):
        super().__init__(**options)
        self._seconds = float(os.environ.get("BENCH_MODEL_MS", "0")) / 1000.0

    def predict(self, observation):
        if self._seconds:
            time.sleep(self._seconds)
        return super().predict(observation)


def request_body() -> bytes:
    size = 224
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([200 * x + 30, 150 * y + 50, 120 * (1 - x * y) + 40], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 6, rgb.shape)
    jpeg = encode_jpeg(np.clip(rgb, 0, 255).astype(np.uint8), 90)
    return json.dumps(
        {
            "image": base64.b64encode(jpeg).decode("ascii"),
            "image_encoding": "jpeg",
            "joint_states": {"name": ["j1", "j2"], "position": [0.1, 0.2]},
            "instruction": "pick up the red block",
        }
    ).encode()


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_row(port: int, clients: int, seconds: float, max_requests: int, body: bytes) -> dict:
    admitted: list[list[float]] = [[] for _ in range(clients)]
    refused = [0] * clients
    failed = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]
    headers = {"Content-Type": "application/json"}

    def client(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        sent = 0
        while sent < max_requests and time.perf_counter() < stop_at[0]:
            sent += 1
            began = time.perf_counter()
            try:
                connection.request("POST", "/infer", body, headers)
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                failed[slot] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            if answer.status == 200:
                admitted[slot].append(time.perf_counter() - began)
            elif answer.status == 503:
                refused[slot] += 1  # Retry-After ignored on purpose
            else:
                failed[slot] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join(seconds + 60)
    elapsed = time.perf_counter() - began
    latencies = sorted(t for per_client in admitted for t in per_client)
    return {
        "clients": clients,
        "goodput": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "ok": len(latencies),
        "refused": sum(refused),
        "failed": sum(failed),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each row")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per client and row")
    parser.add_argument("--model-ms", type=float, default=0.0, help="stub prediction time")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENT_COUNTS))
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 120 or not 0 < args.max_requests <= 1_000_000:
        parser.error("--seconds must be in (0, 120] and --max-requests in (0, 1e6]")

    body = request_body()
    server = ServerProcess(
        "--backend", "bench_goodput:TimedStubBackend", "--max-queue", "8", "--no-access-log",
        "--log-level", "warning",
        env={"BENCH_MODEL_MS": str(args.model_ms), "MANIPULATION_POLICY_API_KEY": ""},
        extra_pythonpath=[BENCH_DIR],
    )  # fmt: skip
    rows = []
    with server:
        run_row(server.port, 2, 1.0, 200, body)  # warm-up
        for clients in args.clients:
            rows.append(run_row(server.port, clients, args.seconds, args.max_requests, body))
            print(f"  ... {clients} clients done", file=sys.stderr)

    print(f"# policy server goodput, clients ignoring Retry-After ({machine()})")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, max queue 8, "
        f"model {args.model_ms:g} ms, {args.seconds:g} s per row, body {len(body)} B"
    )
    base = rows[0]["goodput"] if rows else float("nan")
    print("| clients | goodput (200/s) | vs first row | admitted p50 ms | admitted p99 ms "
          "| 503s | other failures |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['clients']} | {row['goodput']:.1f} | {row['goodput'] / base:.2f} "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['refused']} | {row['failed']} |"
        )
    if rows:
        ratios = [row["goodput"] / base for row in rows]
        print(f"# median goodput ratio to the first row: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
