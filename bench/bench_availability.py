#!/usr/bin/env python3
"""Policy server availability: well-behaved robots and /health under attacks and load.

    .ci/ros_env.sh python bench/bench_availability.py                        # ~90 s
    .ci/ros_env.sh python bench/bench_availability.py --seconds 5 --slow-bodies 100 \\
        --slow-headers 100 --idle 100                                         # smaller
    .ci/ros_env.sh python bench/bench_availability.py --server-path OTHER/src/manipulation_policy

Starts the real server (stub backend spending --model-ms per prediction,
``--max-queue 8``, its open-file limit lowered to --nofile as on a default Linux
host) on 127.0.0.1. In this process: 8 robots (--robots), each on a kept-alive
connection sending the robot's request (224x224 JPEG, 16 KiB) at --robot-hz and
honouring Retry-After, and a /health probe every 50 ms. In a second process (so
that its threads do not take this one's GIL): the attack or the load of the phase.

Phases, --seconds each:
  unloaded     robots and probe alone.
  slow bodies  --slow-bodies connections send headers, then their body at a byte
               per --trickle-s; each reconnects when the server closes it.
  slow headers --slow-headers connections (default 1000) send their headers at a
               byte per --trickle-s, and --idle connections (600) send nothing;
               all reconnect when closed.
  load 8, 64   8, then 64 clients send /infer back to back and retry a 503 at once
               (ignoring Retry-After); goodput is their 200s per second.
  big bodies   --big-clients clients send 7 MiB bodies (a noise JPEG) back to back.

Per phase: the robots' share of 200 answers, their p50/p99 and p99 over the
unloaded p99; the /health probe's p50/p99 and failures; the load's goodput.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import multiprocessing
import os
import platform
import resource
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np

from manipulation_policy.core.imaging import encode_jpeg
from manipulation_policy.server.process import ServerProcess

BENCH_DIR = str(Path(__file__).resolve().parent)
sys.path.insert(0, BENCH_DIR)
from bench_goodput import percentile, request_body  # noqa: E402

HEADERS = {"Content-Type": "application/json"}
PHASES = ("unloaded", "slow_bodies", "slow_headers", "load", "big_bodies")


def big_body(target_bytes: int = 7 * 1024 * 1024) -> bytes:
    """A request whose base64 JPEG (noise, quality 95) makes the body about 7 MiB."""
    rng = np.random.default_rng(1)
    side = 1000
    while True:
        jpeg = encode_jpeg(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), 95)
        if len(jpeg) * 4 // 3 >= target_bytes * 0.95 or side > 4000:
            break
        side = int(side * (target_bytes / (len(jpeg) * 4 / 3)) ** 0.5) + 8
    return json.dumps(
        {"image": base64.b64encode(jpeg).decode("ascii"), "image_encoding": "jpeg"}
    ).encode()


# --------------------------------------------------------------- this process


class Robots:
    """Well-behaved robots: one request per period each, Retry-After honoured."""

    def __init__(self, port: int, count: int, hz: float, body: bytes):
        self.port, self.count, self.period, self.body = port, count, 1.0 / hz, body
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self.latencies, self.statuses = [], {}
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.count)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_at = time.perf_counter() + self.period * slot / self.count
        while not self._stop.is_set():
            pause = next_at - time.perf_counter()
            if pause > 0 and self._stop.wait(pause):
                break
            next_at = max(next_at + self.period, time.perf_counter())
            began = time.perf_counter()
            try:
                connection.request("POST", "/infer", self.body, HEADERS)
                answer = connection.getresponse()
                answer.read()
                status = answer.status
            except (OSError, http.client.HTTPException):
                status = 0  # a failure; the next request gets a fresh connection
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.latencies.append(time.perf_counter() - began)
            elif status == 503:
                retry = float(answer.getheader("Retry-After") or 1)
                next_at = max(next_at, time.perf_counter() + min(retry, 1.0))
        connection.close()


class HealthProbe:
    """GET /health every ``period`` s on a kept-alive connection (as an orchestrator)."""

    def __init__(self, port: int, period: float = 0.05):
        self.port, self.period = port, period
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._stop.clear()
        self.latencies, self.failures = [], 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.wait(self.period):
            began = time.perf_counter()
            try:
                connection.request("GET", "/health")
                answer = connection.getresponse()
                answer.read()
                ok = answer.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            if ok:
                self.latencies.append(time.perf_counter() - began)
            else:
                self.failures += 1
        connection.close()


# ------------------------------------------------------------ the load process


async def _exchange(reader, writer, request: bytes) -> int:
    """Send one request, read its answer (Content-Length bodies); the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _hammer(port: int, request: bytes, until: float, counts: dict) -> None:
    """Back to back, a 503 retried at once; reconnects when closed."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < until:
                status = await _exchange(reader, writer, request)
                counts[status] = counts.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            counts["closed"] += 1
        finally:
            writer.close()


async def _trickler(port: int, first: bytes, rest: bytes, trickle_s: float, until: float,
                    counts: dict) -> None:  # fmt: skip
    """Send ``first`` at once, then ``rest`` a byte per ``trickle_s`` (nothing when
    ``rest`` is empty: an idle connection); reconnect whenever the server closes."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["connections"] += 1
        closed = asyncio.ensure_future(reader.read(65536))
        try:
            writer.write(first)
            for byte in rest or b"":
                done, _ = await asyncio.wait({closed}, timeout=trickle_s)
                if done or time.monotonic() >= until:
                    break
                writer.write(bytes([byte]))
            remaining = until - time.monotonic()
            if remaining > 0:
                await asyncio.wait({closed}, timeout=remaining)
        except OSError:
            pass
        finally:
            closed.cancel()
            writer.close()


def _raise_own_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def load_process(kind: str, port: int, count: int, seconds: float, options: dict, results):
    _raise_own_file_limit()
    if options.get("nice"):
        os.nice(options["nice"])  # the attacker's CPU, not the server's: see --load-nice
    counts: dict = {"connect_failed": 0, "closed": 0, "connections": 0}
    until = time.monotonic() + seconds
    body = options["body"]
    request = (
        b"POST /infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    head, _, payload = request.partition(b"\r\n\r\n")
    head += b"\r\n\r\n"
    trickle = options.get("trickle_s", 1.0)

    async def main() -> None:
        if kind == "hammer":
            tasks = [_hammer(port, request, until, counts) for _ in range(count)]
        elif kind == "slow_bodies":
            tasks = [_trickler(port, head, payload, trickle, until, counts) for _ in range(count)]
        else:  # ``count`` slow-header connections and options["idle"] idle ones
            tasks = [_trickler(port, b"", head, trickle, until, counts) for _ in range(count)]
            idle = options.get("idle", 0)
            tasks += [_trickler(port, b"", b"", trickle, until, counts) for _ in range(idle)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    results.put(counts)


class Load:
    def __init__(self, kind: str, port: int, count: int, seconds: float, **options):
        self._results = multiprocessing.Queue()
        self._process = multiprocessing.Process(
            target=load_process,
            args=(kind, port, count, seconds, options, self._results),
            daemon=True,
        )
        self.counts: dict = {}

    def __enter__(self) -> Load:
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self.counts = self._results.get(timeout=120)
        self._process.join(30)


# ------------------------------------------------------------------- phases


def summary(name: str, robots: Robots, probe: HealthProbe, seconds: float, load=None) -> dict:
    latencies = sorted(robots.latencies)
    health = sorted(probe.latencies)
    sent = sum(robots.statuses.values())
    row = {
        "phase": name,
        "robot_requests": sent,
        "robot_ok_share": robots.statuses.get(200, 0) / sent if sent else float("nan"),
        "robot_statuses": dict(sorted(robots.statuses.items())),
        "robot_p50_ms": percentile(latencies, 0.5) * 1e3,
        "robot_p99_ms": percentile(latencies, 0.99) * 1e3,
        "health_p50_ms": percentile(health, 0.5) * 1e3,
        "health_p99_ms": percentile(health, 0.99) * 1e3,
        "health_failures": probe.failures,
        "load": load.counts if load is not None else {},
    }
    if load is not None:
        row["goodput"] = load.counts.get(200, 0) / seconds
    print(f"  ... {name}: {json.dumps(row)}", file=sys.stderr)
    return row


def run_phase(name, robots, probe, seconds, load: Optional[Load] = None, settle: float = 1.0):
    if load is None:
        robots.start()
        probe.start()
        time.sleep(seconds)
        robots.stop()
        probe.stop()
        return summary(name, robots, probe, seconds)
    with load:
        time.sleep(settle)  # the attack or load is under way before the robots measure
        robots.start()
        probe.start()
        time.sleep(seconds - settle)
        robots.stop()
        probe.stop()
    return summary(name, robots, probe, seconds, load)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--robots", type=int, default=8)
    parser.add_argument("--robot-hz", type=float, default=10.0)
    parser.add_argument("--model-ms", type=float, default=5.0, help="stub prediction time")
    parser.add_argument("--slow-bodies", type=int, default=500)
    parser.add_argument("--slow-headers", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=600, help="idle connections")
    parser.add_argument("--trickle-s", type=float, default=1.0, help="seconds per byte")
    parser.add_argument("--load-clients", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--big-clients", type=int, default=2)
    parser.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--load-nice", type=int, default=0,
                        help="niceness of the attack/load process: on a small machine "
                        "the attacker's own CPU is the server's, unlike attackers elsewhere")
    parser.add_argument("--server-path", default=None,
                        help="a package folder put first on the server's PYTHONPATH, to "
                        "measure another checkout (src/manipulation_policy of it)")  # fmt: skip
    parser.add_argument("server_args", nargs="*", help="more server flags (after --)")
    args = parser.parse_args(argv)
    if not 2 <= args.seconds <= 300:
        parser.error("--seconds must be in [2, 300]")

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

    _raise_own_file_limit()
    body = request_body()
    server = ServerProcess(
        "--backend", "bench_goodput:TimedStubBackend", "--max-queue", "8", "--no-access-log",
        "--log-level", "warning", *args.server_args,
        env={"BENCH_MODEL_MS": str(args.model_ms), "MANIPULATION_POLICY_API_KEY": ""},
        extra_pythonpath=[p for p in (args.server_path, BENCH_DIR) if p],
        preexec_fn=limit_files,
    )  # fmt: skip
    rows: list[dict] = []
    seconds = args.seconds
    with server:
        port = server.port
        robots = Robots(port, args.robots, args.robot_hz, body)
        probe = HealthProbe(port)
        run_phase("warm-up", robots, probe, 2.0)
        for phase in args.phases:
            if phase == "unloaded":
                rows.append(run_phase("unloaded", robots, probe, seconds))
            elif phase == "slow_bodies":
                load = Load("slow_bodies", port, args.slow_bodies, seconds, body=body,
                            trickle_s=args.trickle_s, nice=args.load_nice)  # fmt: skip
                rows.append(run_phase(f"{args.slow_bodies} slow bodies", robots, probe,
                                      seconds, load))  # fmt: skip
            elif phase == "slow_headers":
                load = Load("slow_headers", port, args.slow_headers, seconds, body=body,
                            trickle_s=args.trickle_s, idle=args.idle,
                            nice=args.load_nice)  # fmt: skip
                name = f"{args.slow_headers} slow headers + {args.idle} idle"
                rows.append(run_phase(name, robots, probe, seconds, load))
            elif phase == "load":
                for clients in args.load_clients:
                    load = Load("hammer", port, clients, seconds, body=body,
                                nice=args.load_nice)  # fmt: skip
                    rows.append(run_phase(f"{clients} clients ignoring Retry-After", robots,
                                          probe, seconds, load))  # fmt: skip
            elif phase == "big_bodies":
                load = Load("hammer", port, args.big_clients, seconds, body=big_body(),
                            nice=args.load_nice)  # fmt: skip
                rows.append(run_phase(f"{args.big_clients} clients sending 7 MiB bodies",
                                      robots, probe, seconds, load))  # fmt: skip
        with urllib.request.urlopen(f"{server.base_url}/info", timeout=10) as answer:
            connections = json.load(answer).get("connections")
    print_report(args, rows, connections)
    return 0


def print_report(args, rows: list[dict], connections: Optional[dict]) -> None:
    print(f"# policy server availability ({machine()})")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.robots} robots at "
        f"{args.robot_hz:g} Hz; model {args.model_ms:g} ms; {args.seconds:g} s a phase; "
        f"server open-file limit {args.nofile}; server flags {args.server_args or 'default'}"
        + (f"; server code from {args.server_path}" if args.server_path else "")
        + (f"; load process at nice {args.load_nice}" if args.load_nice else "")
    )
    base = next((row for row in rows if row["phase"] == "unloaded"), None)
    print("| phase | robot 200s | robot p50 ms | robot p99 ms | p99 / unloaded | "
          "/health p50 ms | /health p99 ms | /health failed | goodput 200/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = row["robot_p99_ms"] / base["robot_p99_ms"] if base else float("nan")
        goodput = f"{row['goodput']:.1f}" if "goodput" in row else ""
        print(
            f"| {row['phase']} | {row['robot_ok_share'] * 100:.1f}% of {row['robot_requests']} "
            f"| {row['robot_p50_ms']:.1f} | {row['robot_p99_ms']:.1f} | {ratio:.2f} "
            f"| {row['health_p50_ms']:.1f} | {row['health_p99_ms']:.1f} "
            f"| {row['health_failures']} | {goodput} |"
        )
    hammer = [row for row in rows if "ignoring" in row["phase"]]
    if len(hammer) == 2 and hammer[0]["goodput"]:
        print(f"# goodput {hammer[1]['phase']} / {hammer[0]['phase']}: "
              f"{hammer[1]['goodput'] / hammer[0]['goodput']:.2f}")  # fmt: skip
    for row in rows:
        if row["load"]:
            print(f"# {row['phase']}: load-side counts {row['load']}; robot statuses "
                  f"{row['robot_statuses']}")  # fmt: skip
    print(f"# the server's connections at the end (/info): {json.dumps(connections)}")


if __name__ == "__main__":
    sys.exit(main())
