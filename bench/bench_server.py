"""Policy server throughput and latency on loopback, beside the cost of JPEG decoding alone.

    .ci/ros_env.sh python bench/bench_server.py                 # ~30 s
    .ci/ros_env.sh python bench/bench_server.py --seconds 10

Starts the real server (stub backend: its predict, a plain mean colour, costs
under 1 ms, so the server itself is measured) as a subprocess on 127.0.0.1,
then for each row
sends requests for --seconds from N client threads, each on its own kept-alive
connection (http.client: the leanest client, so the client's own cost stays
small). Rows: GET /health (HTTP + framework floor), /infer without image,
/infer with a 224x224 JPEG at concurrency 1 and 8.

In this process, the same work without HTTP: JPEG decode alone (base64 +
Pillow, what the server must do to any image), the whole body decode
(JSON parse, validation, JPEG decode) and the stub's predict. The floor rows
send the same requests to bench/http_floor.py, a bare asyncio responder that
only parses the JSON and decodes the JPEG. Ratio columns: a row's p50 over
the JPEG decode alone, and a server row's p50 over the floor's for the same
request and client count (1.00 = no overhead beyond the unavoidable work). The
server and the floor run side by side and take turns within each row, so that
the noise of a shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from manipulation_policy.backends.stub import StubBackend
from manipulation_policy.core.imaging import decode_base64_image, encode_jpeg
from manipulation_policy.server.process import ServerProcess, free_port
from manipulation_policy.server.request_decoding import decode_infer_body

FLOOR_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "http_floor.py")


def scene_jpeg(size: int = 224, quality: int = 90) -> bytes:
    """A camera-like frame (smooth shading, edges, sensor noise), not a flat colour."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([200 * x + 30, 150 * y + 50, 120 * (1 - x * y) + 40], axis=-1)
    rgb[size // 3 : size // 2, size // 4 : size // 2] = (220, 40, 40)  # an object
    rgb += np.random.default_rng(0).normal(0, 6, rgb.shape)
    return encode_jpeg(np.clip(rgb, 0, 255).astype(np.uint8), quality)


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def time_in_process(
    functions: dict[str, Callable[[], object]], seconds: float, rounds: int = 5
) -> dict[str, list[float]]:
    """Sorted per-call times of each function, measured in interleaved rounds so that
    warm-up and machine noise fall on all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm-up
    for _ in range(rounds):
        for name, function in functions.items():
            deadline = time.perf_counter() + seconds / rounds / len(functions)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                function()
                samples[name].append(time.perf_counter() - started)
    return {name: sorted(values) for name, values in samples.items()}


def load(
    port: int, method: str, path: str, body: bytes, concurrency: int, seconds: float
) -> tuple[float, list[float], int]:
    """(requests/s, sorted latencies in s, non-200 answers) over ``seconds``."""
    headers = {"Content-Type": "application/json"} if body else {}
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    failures = [0] * concurrency
    start_gate = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start_gate.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            connection.request(method, path, body=body or None, headers=headers)
            answer = connection.getresponse()
            answer.read()
            latencies[slot].append(time.perf_counter() - started)
            failures[slot] += answer.status != 200
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start_gate.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    merged = sorted(value for per_client in latencies for value in per_client)
    return len(merged) / elapsed, merged, sum(failures)


def measure(ports: list[int], plan: list, seconds: float, rounds: int = 3) -> list[list]:
    """One list of rows per port. Each row's time is split into ``rounds`` turns that
    alternate between the ports, so that the shared machine's noise falls on the
    server and the floor alike, and the ratio of their p50s stays meaningful."""
    results: list[list] = [[] for _ in ports]
    for label, method, path, body, concurrency in plan:
        for port in ports:
            load(port, method, path, body, concurrency, min(0.5, seconds))  # warm-up
        merged = [(0, 0.0, [], 0) for _ in ports]  # (requests, seconds, latencies, failures)
        for _ in range(rounds):
            for index, port in enumerate(ports):
                rate, latencies, failures = load(
                    port, method, path, body, concurrency, seconds / rounds
                )
                count, spent, values, failed = merged[index]
                merged[index] = (
                    count + len(latencies),
                    spent + len(latencies) / rate if rate else spent,
                    values + latencies,
                    failed + failures,
                )
        for index, (count, spent, values, failed) in enumerate(merged):
            results[index].append((label, count / spent if spent else 0.0, sorted(values), failed))
    return results


@contextlib.contextmanager
def floor_process():
    """bench/http_floor.py on a free loopback port, until the block ends."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, FLOOR_SCRIPT, "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        if "listening" not in (process.stdout.readline() or ""):
            raise RuntimeError("the floor responder did not start")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def info(port: int) -> str:
    """The server's versions and what uvicorn runs on, from its /info."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/info")
    report = json.loads(connection.getresponse().read())
    connection.close()
    return ", ".join(f"{name} {value}" for name, value in report.get("runtime", {}).items())


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per load row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)

    jpeg = scene_jpeg()
    image_b64 = base64.b64encode(jpeg).decode("ascii")
    joints = {"name": [f"j{i}" for i in range(7)], "position": [0.1] * 7,
              "velocity": [0.0] * 7, "effort": []}  # fmt: skip
    no_image = json.dumps({"reference_frame": "base_link", "joint_states": joints}).encode()
    with_image = json.dumps(
        {"reference_frame": "base_link", "joint_states": joints, "image": image_b64,
         "image_encoding": "jpeg", "image_width": 224, "image_height": 224,
         "instruction": "pick up the red block"}
    ).encode()  # fmt: skip

    # In-process floors: what any server must spend on this request.
    observation = decode_infer_body(with_image, 4096 * 4096)[1]
    backend = StubBackend()
    floors = time_in_process(
        {
            "JPEG decode alone (in process)": lambda: decode_base64_image(image_b64, "jpeg"),
            "body decode: JSON + validation + JPEG (in process)": lambda: decode_infer_body(
                with_image, 4096 * 4096
            ),
            "stub predict (in process)": lambda: backend.predict(observation),
        },
        seconds=min(3.0, args.seconds),
    )
    decode_p50 = statistics.median(floors["JPEG decode alone (in process)"])

    plan = [("GET /health", "GET", "/health", b"", 1),
            ("POST /infer, no image", "POST", "/infer", no_image, 1)]  # fmt: skip
    plan += [
        (f"POST /infer, 224x224 JPEG, {c} client{'s' if c > 1 else ''}", "POST", "/infer",
         with_image, c)
        for c in args.concurrency
    ]  # fmt: skip
    queue = str(max(args.concurrency) * 2)
    with ServerProcess(
        "--backend", "stub", "--no-access-log", "--max-queue", queue
    ) as server, floor_process() as floor_port:
        rows = measure([server.port], plan[:1], args.seconds)[0]
        server_rows, floor_rows = measure([server.port, floor_port], plan[1:], args.seconds)
        rows += server_rows
        server_info = info(server.port)
    floor_p50 = {label: percentile(latencies, 0.5) for label, _, latencies, _ in floor_rows}

    print(f"machine: {machine()}")
    print(f"server: {server_info}")
    print(f"image: 224x224 JPEG q90, {len(jpeg)} bytes; request body {len(with_image)} bytes")
    print(f"{args.seconds:g} s per load row, client and server on the same machine\n")
    print("| what | requests/s | p50 ms | p99 ms | p50 / JPEG decode | p50 / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, samples in floors.items():
        print(
            f"| {label} | {1 / statistics.median(samples):,.0f} | "
            f"{percentile(samples, 0.5) * 1e3:.3f} | {percentile(samples, 0.99) * 1e3:.3f} | "
            f"{statistics.median(samples) / decode_p50:.2f} | |"
        )
    labelled = [(label, row) for label, *row in rows]
    labelled += [(f"floor: {label}", row) for label, *row in floor_rows]
    for label, (rate, latencies, failures) in labelled:
        note = f" ({failures} non-200)" if failures else ""
        p50 = percentile(latencies, 0.5)
        ratio = f"{p50 / floor_p50[label]:.2f}" if label in floor_p50 else ""
        print(
            f"| {label}{note} | {rate:,.0f} | {p50 * 1e3:.3f} | "
            f"{percentile(latencies, 0.99) * 1e3:.3f} | {p50 / decode_p50:.2f} | {ratio} |"
        )
    return 1 if any(failures for *_, failures in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
