"""`make demo` end to end, shortened: real server process, real node, real DDS."""

import re

from manipulation_bringup import demo


def test_demo_prints_outputs_with_latency_and_a_summary(capsys):
    assert demo.main(["--outputs", "3", "--deadline", "30"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\.\d{3}\s", line)]
    assert len(rows) == 3, out
    assert all(line.rstrip().endswith("ms") for line in rows), rows
    # The gripper column says what the number means (0 = closed, 1 = open).
    for line in rows:
        value, state = re.search(r"\s(\d\.\d{3}) (open|closed)\s", line).groups()
        assert (float(value) >= 0.5) == (state == "open"), line
    assert "synthetic" in out and "0 = closed, 1 = open" in out
    assert re.search(r"3 PolicyOutputs \(0 holds\); .* latency median \d+\.\d ms", out), out
    assert "stopped the node and the policy server" in out


def test_the_moving_pattern_moves():
    first, later = demo.moving_pattern(0), demo.moving_pattern(7)
    assert first.shape == (480, 640, 3) and first.dtype.name == "uint8"
    assert abs(float(first.mean()) - float(later.mean())) > 1.0
