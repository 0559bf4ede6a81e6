"""The OpenVLA GPU benchmark's harness, exercised on the CPU.

The real-size run needs a CUDA GPU; here the same harness runs on a tiny
config, the no-GPU path is checked to skip cleanly, and the real-size
stand-in is built on the meta device to check it has OpenVLA-7B's size.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_openvla_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_openvla_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_tiny_harness_prints_a_table_with_every_attention_row(bench, capsys):
    assert bench.main(["--tiny", "--iterations", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "p99 ms" in out and "actions/s" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:5] in ("sdpa ", "eager")
    }
    assert set(rows) == {"sdpa", "eager"}
    for cells in rows.values():
        p50, p99, mean, actions_per_s = (float(v) for v in cells[1:5])
        assert 0 < p50 <= p99 and mean > 0
        assert actions_per_s == pytest.approx(1000.0 / mean, rel=0.01)
    assert rows["sdpa"][-1] == "1.00x"


def test_without_cuda_the_real_benchmark_skips_cleanly(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real benchmark would run")
    assert bench.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_bad_arguments_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--iterations", "0"])


def test_real_size_stand_in_has_openvla_7b_parameter_count(bench):
    model = bench.StandInOpenVLA(bench.OPENVLA_7B, torch.device("meta"), torch.bfloat16)
    model.load_llm("eager")
    counts = model.parameter_counts()
    # OpenVLA-7B: ~7.54B parameters; Llama-2-7B with OpenVLA's 32064-token vocabulary ~6.74B.
    assert sum(counts.values()) == pytest.approx(7.54e9, rel=0.01)
    assert counts["llm"] == pytest.approx(6.74e9, rel=0.01)
    assert counts["vision"] == pytest.approx(0.73e9, rel=0.05)


def test_percentile_and_action_decoding(bench):
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == pytest.approx(50.5)
    assert bench.percentile(values, 99) == pytest.approx(99.01)
    assert bench.percentile([7.0], 99) == 7.0
    vocab = 512
    first, last = bench.decode_action_tokens([vocab - 1, vocab - 255], vocab)
    assert first == pytest.approx(-1 + 1 / 255) and last == pytest.approx(1 - 1 / 255)
    assert bench.decode_action_tokens([0], vocab) == [pytest.approx(1 - 1 / 255)]  # clipped
