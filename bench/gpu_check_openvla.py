#!/usr/bin/env python3
"""OpenVLA on a GPU through the real policy server, with the authors' own remote code.

    python bench/gpu_check_openvla.py --hf-dir $OPENVLA_HF_DIR              # on a GPU host
    python bench/gpu_check_openvla.py --hf-dir $OPENVLA_HF_DIR --tiny       # CPU dry run

``--hf-dir`` defaults to ``$OPENVLA_HF_DIR``, else the project's shared copy
``../shared/openvla-hf`` beside the checkout. ``make test`` runs the CPU dry
run (test_gpu_check_openvla.py) whenever that copy is there.

No ROS is needed: on a GPU host with requirements.txt installed, run it from
a project checkout with ``PYTHONPATH=src/manipulation_policy``. The 7B
checkpoint needs ~15 GB of disk under ``--out`` and ~16 GiB of GPU memory; the
whole run takes a few minutes (build, then one server start per case).

1. Prints the versions that decide what OpenVLA's remote code does (torch,
   CUDA, GPU, transformers, tokenizers, timm, torchvision, flash_attn).
2. Builds a random-weight OpenVLA checkpoint from that remote code with
   ``openvla_checkpoint.py`` (``--size real``: 7.5B parameters, bf16, on the
   GPU; ``--tiny``: the small size on the CPU), unless ``--checkpoint`` names
   one already built.
3. For each attention case (auto, sdpa, eager, and flash_attention_2 where
   flash_attn is installed) starts ``python -m manipulation_policy.policy_server
   --backend openvla`` on loopback, the start-up image check included, and
   records the start-up time, what ``/info`` reports (attention used, KV cache,
   GPU memory), then ``--requests`` sequential ``/infer`` calls with 224x224
   JPEG frames of different scenes: status codes, latency p50/p99 and how
   many different answers they got.
4. Prints one row per case, says whether every served case answered the same
   frames with the same targets, and writes everything to ``--json``.

A case that refuses to start is a row with the first line of its refusal
(e.g. sdpa under transformers 4.50-4.57), not an abort. Exit code 0 when
every case that the installed transformers can serve started and answered
200 to every request; 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import importlib.util
import json
import platform
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openvla_checkpoint  # noqa: E402
from manipulation_policy.core.imaging import encode_jpeg  # noqa: E402
from manipulation_policy.server.process import ServerProcess, ServerStartError  # noqa: E402

UNNORM_KEY = "bridge_orig"
VERSION_PACKAGES = ("torch", "transformers", "tokenizers", "timm", "torchvision", "flash_attn")


def versions() -> dict[str, Optional[str]]:
    found: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: report, do not fail
            found[name] = None
    import torch

    found["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return found


def scene_frames(count: int, size: int = 224) -> list[bytes]:
    """Different camera-like scenes: shaded background, an object that moves and changes colour."""
    rng = np.random.default_rng(0)
    frames = []
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        rgb = np.stack([180 * x + 40, 140 * y + 60, 100 * (1 - x * y) + 50], axis=-1)
        top, left = (37 * i) % (size // 2), (53 * i) % (size // 2)
        rgb[top : top + size // 4, left : left + size // 4] = rng.integers(0, 255, 3)
        rgb += rng.normal(0, 5, rgb.shape)
        frames.append(encode_jpeg(np.clip(rgb, 0, 255).astype(np.uint8), 90))
    return frames


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _call(url: str, body: Optional[bytes] = None, timeout: float = 120.0) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"} if body else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")[:300]


def infer_body(jpeg: bytes) -> bytes:
    return json.dumps(
        {
            "reference_frame": "base_link",
            "image": base64.b64encode(jpeg).decode("ascii"),
            "image_encoding": "jpeg",
            "instruction": "pick up the red block",
        }
    ).encode()


def answer_key(response: dict) -> tuple:
    """What the robot would act on, rounded: target pose and gripper."""
    pose = response.get("eef_target_pose", {})
    values = [*pose.get("position", {}).values(), *pose.get("orientation", {}).values()]
    return tuple(round(float(v), 5) for v in (*values, response.get("gripper_command", 0.0)))


def problem_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if "refusing" in line or "cannot" in line or "Error" in line:
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def run_case(
    checkpoint: Path,
    attn: str,
    frames: list[bytes],
    requests: int,
    timeout: float,
    unnorm_key: str = UNNORM_KEY,
) -> dict:
    case: dict[str, Any] = {"attn_requested": attn}
    server = ServerProcess(
        "--backend", "openvla", "--model", str(checkpoint), "--unnorm-key", unnorm_key,
        "--attn-implementation", attn,
        startup_timeout=timeout,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        server.start()
    except ServerStartError:
        case.update(started=False, refusal=problem_line(server.log()))
        server.stop()
        return case
    try:
        case["startup_s"] = round(time.perf_counter() - started, 2)
        _, info = _call(f"{server.base_url}/info")
        backend = info.get("backend", {}) if isinstance(info, dict) else {}
        case.update(
            started=True,
            attn_used=backend.get("attn_implementation"),
            kv_cache=backend.get("kv_cache"),
            image_check=backend.get("image_sensitivity_checked"),
            dtype=backend.get("dtype"),
            device=backend.get("device"),
        )
        statuses, latencies, answers = [], [], []
        for i in range(requests):
            begin = time.perf_counter()
            body = infer_body(frames[i % len(frames)])
            status, response = _call(f"{server.base_url}/infer", body)
            latencies.append((time.perf_counter() - begin) * 1000.0)
            statuses.append(status)
            answers.append(answer_key(response) if status == 200 else None)
            if status != 200 and "error" not in case:
                case["error"] = f"HTTP {status}: {response}"
        _, info = _call(f"{server.base_url}/info")
        case.update(
            statuses={str(s): statuses.count(s) for s in sorted(set(statuses))},
            p50_ms=round(percentile(latencies, 50), 1),
            p99_ms=round(percentile(latencies, 99), 1),
            distinct_answers=len({a for a in answers if a is not None}),
            answers=answers[: len(frames)],
            gpu_memory=info.get("gpu_memory") if isinstance(info, dict) else None,
        )
    finally:
        case["exit_code"] = server.stop()
    return case


def attn_cases(requested: str) -> list[str]:
    if requested != "all":
        return [name.strip() for name in requested.split(",") if name.strip()]
    cases = ["auto", "sdpa", "eager"]
    if importlib.util.find_spec("flash_attn") is not None:
        cases.append("flash_attention_2")
    return cases


def format_rows(cases: list[dict]) -> str:
    header = (
        f"{'attention':<18} {'used':<18} {'start s':>8} {'kv':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'distinct':>8}  statuses / refusal"
    )
    lines = [header, "-" * len(header)]
    for case in cases:
        if not case.get("started"):
            lines.append(f"{case['attn_requested']:<18} refused: {case.get('refusal')}")
            continue
        lines.append(
            f"{case['attn_requested']:<18} {case.get('attn_used') or '?':<18} "
            f"{case['startup_s']:8.1f} {str(case.get('kv_cache')):>5} {case['p50_ms']:8.1f} "
            f"{case['p99_ms']:8.1f} {case['distinct_answers']:8d}  {case['statuses']}"
            + (f" {case['error']}" if "error" in case else "")
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hf-dir",
        default=openvla_checkpoint.default_hf_dir(),
        help="OpenVLA's prismatic/extern/hf (default: $OPENVLA_HF_DIR, else ../shared/openvla-hf)",
    )
    parser.add_argument("--checkpoint", help="use this built checkpoint instead of building one")
    parser.add_argument("--out", help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="small size on the CPU (dry run)")
    parser.add_argument("--attn", default="all", help="comma-separated cases, or all")
    parser.add_argument("--unnorm-key", default=UNNORM_KEY)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.frames < 2:
        parser.error("--requests must be >= 1 and --frames >= 2")
    if not args.checkpoint and not args.hf_dir:
        parser.error(
            "set --hf-dir or OPENVLA_HF_DIR (OpenVLA's prismatic/extern/hf); "
            "no ../shared/openvla-hf beside this checkout"
        )

    import torch

    found = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check_openvla: no CUDA GPU; run with --tiny for a CPU dry run")
        return 0
    results: dict[str, Any] = {"versions": found, "size": "tiny" if args.tiny else "real"}
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        out = Path(args.out or tempfile.mkdtemp(prefix="openvla_ckpt_")) / "openvla"
        begin = time.perf_counter()
        checkpoint = openvla_checkpoint.build_checkpoint(
            out,
            Path(args.hf_dir),
            size="tiny" if args.tiny else "real",
            device="cpu" if args.tiny else "cuda",
            dtype="float32" if args.tiny else "bfloat16",
        )
        results["build_s"] = round(time.perf_counter() - begin, 1)
        if not args.tiny:
            torch.cuda.empty_cache()
    results["checkpoint"] = str(checkpoint)
    size = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    print(f"checkpoint: {checkpoint} ({size / 2**30:.2f} GiB)")

    frames = scene_frames(args.frames)
    cases = [
        run_case(checkpoint, attn, frames, args.requests, args.startup_timeout, args.unnorm_key)
        for attn in attn_cases(args.attn)
    ]
    results["cases"] = cases
    print(format_rows(cases))
    for case in cases:
        if case.get("gpu_memory"):
            print(f"{case['attn_requested']}: gpu_memory {json.dumps(case['gpu_memory'])}")
    served = [c for c in cases if c.get("started") and "error" not in c]
    same = len({tuple(c["answers"]) for c in served}) <= 1
    results["same_answers_on_every_served_path"] = same
    print(
        f"served cases: {len(served)} of {len(cases)}; same answers on every served path: "
        f"{'yes' if same else 'NO'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [c for c in cases if c.get("started") and "error" in c]
    auto_served = any(c["attn_requested"] == "auto" and c.get("started") for c in cases)
    return 0 if served and same and not failed and auto_served else 1


if __name__ == "__main__":
    sys.exit(main())
