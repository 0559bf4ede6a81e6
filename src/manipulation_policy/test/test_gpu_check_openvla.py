"""bench/gpu_check_openvla.py, dry-run on the CPU.

The real run needs a GPU and OpenVLA's remote code; here the same script
serves the tiny OpenVLA double through the real server on two attention
paths, and (with OPENVLA_HF_DIR and a transformers 4.x stack) builds and
serves the authors' remote code at the tiny size.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import tiny_openvla
import torch
import transformers
from packaging.version import Version

BENCH = Path(__file__).resolve().parents[3] / "bench"


@pytest.fixture(scope="module")
def check():
    path = BENCH / "gpu_check_openvla.py"
    spec = importlib.util.spec_from_file_location("gpu_check_openvla", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # puts bench/ on sys.path for openvla_checkpoint
        yield module
    finally:
        if str(BENCH) in sys.path:
            sys.path.remove(str(BENCH))
        sys.modules.pop("openvla_checkpoint", None)


def test_serves_a_checkpoint_on_each_attention_path(check, tiny_openvla_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = check.main(
        [
            "--checkpoint", str(tiny_openvla_dir), "--unnorm-key", tiny_openvla.DEFAULT_UNNORM_KEY,
            "--tiny", "--attn", "auto,eager", "--requests", "4", "--frames", "4",
            "--startup-timeout", "120", "--json", str(report),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"transformers {transformers.__version__}" in out
    results = json.loads(report.read_text())
    cases = {case["attn_requested"]: case for case in results["cases"]}
    assert cases["auto"]["attn_used"] == "sdpa" and cases["eager"]["attn_used"] == "eager"
    for case in cases.values():
        assert case["started"] and case["image_check"] is True
        assert case["statuses"] == {"200": 4} and case["exit_code"] == 0
        assert 0 < case["p50_ms"] <= case["p99_ms"]
        assert case["distinct_answers"] > 1  # different scenes, different targets
    assert results["same_answers_on_every_served_path"] is True


def test_a_refused_case_is_a_row_not_an_abort(check, tiny_openvla_image_blind_dir, capsys):
    code = check.main(
        [
            "--checkpoint", str(tiny_openvla_image_blind_dir), "--unnorm-key",
            tiny_openvla.DEFAULT_UNNORM_KEY, "--tiny", "--attn", "auto", "--requests", "1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "refused:" in out and "ignores its camera input" in out


def test_without_cuda_the_real_run_says_so(check, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert check.main(["--hf-dir", "/nonexistent"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_helpers(check):
    assert check.percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert check.attn_cases("eager, sdpa") == ["eager", "sdpa"]
    assert check.attn_cases("all")[:3] == ["auto", "sdpa", "eager"]
    log = "INFO starting\npolicy_server: error: cannot load backend 'openvla': boom\n"
    assert check.refusal_line(log).endswith("boom")
    frames = check.scene_frames(3)
    assert len(set(frames)) == 3 and all(f[:2] == b"\xff\xd8" for f in frames)
    with pytest.raises(SystemExit):
        check.main(["--tiny", "--requests", "0", "--hf-dir", "x"])


@pytest.mark.skipif(
    not os.environ.get("OPENVLA_HF_DIR") or Version(transformers.__version__) >= Version("5"),
    reason="needs OPENVLA_HF_DIR (OpenVLA's prismatic/extern/hf) and transformers 4.x",
)
def test_dry_run_with_the_authors_remote_code(check, tmp_path, capsys):
    for package in ("timm", "torchvision"):
        pytest.importorskip(package)
    report = tmp_path / "report.json"
    code = check.main(
        ["--tiny", "--out", str(tmp_path), "--attn", "auto,eager", "--requests", "3",
         "--json", str(report)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    results = json.loads(report.read_text())
    assert results["size"] == "tiny" and results["same_answers_on_every_served_path"] is True
