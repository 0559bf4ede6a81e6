"""The batching benchmark's harness, run briefly on the CPU (its figures are not checked)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_batching.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_batching", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_prints_a_row_per_client_count_and_checks_every_answer(bench, capsys):
    code = bench.main(["--backend", "fixed-cost", "--call-ms", "5", "--clients", "1", "3",
                       "--seconds", "0.5", "--warmup", "1", "--baseline"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "actions/s" in out and "p99 ms" in out and "backend: backend=fixed-cost" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("batch 8", "unbatched"))]
    assert [(r[0], r[-10]) for r in rows] == [
        ("batch", "1"), ("batch", "3"), ("unbatched", "1"), ("unbatched", "3")
    ]
    for cells in rows:
        requests, errors = int(cells[-9]), int(cells[-8])
        equal, ok = cells[-3].split("/")
        assert requests > 0 and errors == 0 and equal == ok
    assert "answers that differ from the same observation alone: 0" in out
