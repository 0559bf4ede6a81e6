"""bench/gpu_check_openvla.py, dry-run on the CPU.

The real run needs a GPU and OpenVLA's remote code; here the same script
serves the tiny OpenVLA double through the real server on two attention
paths, and, run as a command like a user runs it (``--tiny``), builds the
authors' remote code (``OPENVLA_HF_DIR``, else ../shared/openvla-hf; see
``openvla_hf_dir.py``) at the tiny size and serves it on every attention path
the CPU offers.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import openvla_hf_dir
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
    assert check.problem_line(log).endswith("boom")
    frames = check.scene_frames(3)
    assert len(set(frames)) == 3 and all(f[:2] == b"\xff\xd8" for f in frames)
    with pytest.raises(SystemExit):
        check.main(["--tiny", "--requests", "0", "--hf-dir", "x"])


@pytest.mark.skipif(
    Version(transformers.__version__) >= Version("5"),
    reason=f"OpenVLA's remote code cannot import under transformers {transformers.__version__}",
)
def test_dry_run_with_the_authors_remote_code(tmp_path):
    for missing in (openvla_hf_dir.missing_files(), openvla_hf_dir.missing_packages()):
        if missing:
            openvla_hf_dir.skip_or_fail(missing)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check_openvla.py"), "--hf-dir",
         str(openvla_hf_dir.hf_dir()), "--tiny", "--out", str(tmp_path), "--attn", "all",
         "--requests", "3", "--startup-timeout", "120", "--json", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(report.read_text())
    assert results["size"] == "tiny" and results["same_answers_on_every_served_path"] is True
    cases = {case["attn_requested"]: case for case in results["cases"]}
    assert {"auto", "sdpa", "eager"} <= set(cases)  # and flash_attention_2 where installed
    if Version(transformers.__version__) < Version("4.50"):  # the pinned line serves them all
        assert cases["auto"].get("attn_used") == "sdpa", cases["auto"]
        for attn in ("sdpa", "eager"):
            assert cases[attn]["started"] and cases[attn]["attn_used"] == attn, cases[attn]
    for case in cases.values():
        if case["started"]:
            assert case["image_check"] is True and case["statuses"] == {"200": 3}, case
