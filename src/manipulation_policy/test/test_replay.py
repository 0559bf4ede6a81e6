"""python3 -m manipulation_policy.replay on small recorded episodes (written with rosbags).

Each replay runs in this process through ``cli.main``; the policy server runs as a real
process on 127.0.0.1. No ROS is needed here (test_replay_dds.py records a real node).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from replay_bags import (
    CAMERA,
    OUTPUT,
    STORE,
    Episode,
    frame_colour,
    write_episode,
)
from rosbags.rosbag2 import StoragePlugin

from manipulation_policy.replay import action_sources
from manipulation_policy.replay.bag_input import RecordedBag
from manipulation_policy.replay.cli import EXIT_BAD_INPUT, EXIT_BREACH, EXIT_PASSED, main
from manipulation_policy.replay.runs import run_from_bag
from manipulation_policy.server.process import ServerProcess

DIFFERENT_BACKEND = "server_test_backends:FixedDeltaBackend"


def replay(tmp_path: Path, bag: Path, *flags: str, name: str = "out") -> tuple[int, Path, dict]:
    """Replay ``bag``; (exit status, output bag, the JSON report or {})."""
    output, report = tmp_path / name, tmp_path / f"{name}.json"
    status = main([str(bag), "--output", str(output), "--report-json", str(report),
                   "--no-progress", *flags])
    return status, output, json.loads(report.read_text()) if report.exists() else {}


def recorded_episode(tmp_path: Path, **changes) -> Path:
    """An episode whose recorded outputs are a stub replay's (the DDS test records a node)."""
    plain = write_episode(tmp_path / "plain", Episode(**changes))
    status, output, _ = replay(tmp_path, plain, "--backend", "stub", name="stub_run")
    assert status == EXIT_PASSED
    run = run_from_bag(str(output), STORE, OUTPUT)
    with RecordedBag(str(output), STORE) as bag:
        outputs = [(t, msg) for _, t, msg in bag.messages({OUTPUT: "o"})]
    assert len(outputs) == len(run.steps) == changes.get("frames", 8)
    fields = [(t, _fields_of(msg)) for t, msg in outputs]
    shutil.rmtree(output)
    return write_episode(tmp_path / "episode", Episode(outputs=fields, **changes))


def _fields_of(msg) -> dict:
    """A deserialized message back to nested field dicts (what build_message takes)."""
    if hasattr(msg, "__dataclass_fields__"):
        return {name: _fields_of(getattr(msg, name)) for name in msg.__dataclass_fields__
                if name != "__msgtype__"}
    return msg


@pytest.fixture(scope="module")
def stub_server():
    with ServerProcess("--backend", "stub") as server:
        yield server


def test_the_stub_replays_to_the_recorded_commands_with_a_bag_a_report_and_a_plot(tmp_path):
    episode = recorded_episode(tmp_path)
    plot = tmp_path / "trajectories.png"
    status, output, report = replay(tmp_path, episode, "--backend", "stub", "--plot", str(plot))
    assert status == EXIT_PASSED
    summary = report["summary"]
    assert summary["steps"] == summary["paired"] == summary["within"] == 8
    assert summary["share_within"] == 1.0 and summary["passed"]
    assert summary["failures"]["candidate"] == 0
    assert summary["latency_p50_ms"]["candidate"] is not None
    assert plot.read_bytes().startswith(b"\x89PNG")
    # The replay's bag: MCAP, one command and one chunk per frame, stamped like the node's.
    assert list(output.glob("*.mcap")) and (output / "metadata.yaml").exists()
    with RecordedBag(str(output), STORE) as bag:
        topics = bag.topics()
        assert topics[OUTPUT] == "manipulation_msgs/msg/PolicyOutput"
        assert topics["/manipulation/policy_chunk"] == "manipulation_msgs/msg/PolicyActionChunk"
        outputs = [(t, m) for _, t, m in bag.messages({OUTPUT: "o"})]
    assert len(outputs) == 8
    for time_ns, msg in outputs:
        stamp_ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert time_ns == stamp_ns  # answered on arrival, in simulated time
        assert (msg.step_index, msg.chunk_length) == (0, 1)
        assert msg.request_id.startswith("policy_node-")
    grippers = [m.gripper_command for _, m in outputs]
    assert len(set(grippers)) == 8  # each frame's own answer, none repeated


def test_in_process_and_server_replays_agree(tmp_path, stub_server):
    episode = write_episode(tmp_path / "episode", Episode(frames=6))
    status, local, _ = replay(tmp_path, episode, "--backend", "stub", name="local")
    assert status == EXIT_PASSED
    status, remote, report = replay(
        tmp_path, episode, "--server", stub_server.base_url, "--compare-with", str(local),
        name="remote",
    )
    assert status == EXIT_PASSED, report
    summary = report["summary"]
    assert summary["steps"] == summary["paired"] == summary["within"] == 6
    # Not the same run twice: the remote client's request ids, none failed.
    with RecordedBag(str(remote), STORE) as bag:
        requests = [json.loads(m.data)
                    for _, _, m in bag.messages({"/manipulation/replay/requests": "r"})]
    assert len(requests) == 6 and not any(r["failure"] for r in requests)
    assert not any(r["request_id"].startswith("policy_node-") for r in requests)
    assert all(m.request_id.startswith("policy_node-") for m in _outputs(local))


def test_a_different_backend_fails_the_comparison(tmp_path):
    episode = recorded_episode(tmp_path, frames=5)
    status, output, report = replay(tmp_path, episode, "--backend", DIFFERENT_BACKEND)
    assert status == EXIT_BREACH
    assert not report["summary"]["passed"] and report["summary"]["within"] == 0
    assert output.exists()  # the bag is written either way
    # Each step says how it differs: another target, and no joint deltas (the stub has them).
    for step in report["steps"]:
        assert not step["within"] and step["position_m"] > 0.005
        assert step["note"] == "only one has joint deltas" and step["joint"] is None


def test_a_share_below_min_within_fails(tmp_path):
    episode = recorded_episode(tmp_path, frames=4)
    status, _, report = replay(tmp_path, episode, "--backend", DIFFERENT_BACKEND,
                               "--min-within", "0")
    assert status == EXIT_PASSED and report["summary"]["share_within"] == 0.0


def test_a_server_failing_mid_replay_is_counted_and_the_replay_goes_on(
    tmp_path, stub_server, monkeypatch
):
    episode = recorded_episode(tmp_path, frames=6)
    calls = []
    original = action_sources.ServerSource.__call__

    def failing_after_three(self, observation, request_id):
        calls.append(request_id)
        if len(calls) > 3:
            self.client.update(url="http://127.0.0.1:9")  # nothing listens on port 9
        return original(self, observation, request_id)

    monkeypatch.setattr(action_sources.ServerSource, "__call__", failing_after_three)
    status, output, report = replay(
        tmp_path, episode, "--server", stub_server.base_url, "-p", "remote_retry_attempts=0",
        "-p", "remote_timeout_sec=0.5",
    )
    assert len(calls) == 6
    summary = report["summary"]
    assert summary["failures"]["candidate"] == 3
    assert summary["holds"]["candidate"] == 3  # remote_fallback_on_failure
    assert summary["within"] == 3 and status == EXIT_BREACH
    assert output.exists()


@pytest.mark.parametrize("storage", [StoragePlugin.SQLITE3, StoragePlugin.MCAP])
def test_both_storage_formats_replay(tmp_path, storage):
    episode = write_episode(tmp_path / "episode", Episode(frames=3, storage=storage))
    status, output, _ = replay(tmp_path, episode, "--backend", "stub")
    assert status == EXIT_PASSED
    assert len(run_from_bag(str(output), STORE, OUTPUT).steps) == 3


# ---------------------------------------------------------------- bad input


def _bad_input(tmp_path: Path, capsys, bag: Path, *flags: str) -> str:
    """Replay a bag that cannot be used: exit 2, one line, nothing written."""
    before = set(tmp_path.iterdir())
    status, output, _ = replay(tmp_path, bag, "--backend", "stub", *flags)
    error = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_BAD_INPUT
    assert len([line for line in error if line.startswith("replay: error:")]) == 1, error
    assert "Traceback" not in "\n".join(error)
    assert not output.exists() and set(tmp_path.iterdir()) == before  # no leftovers
    return error[-1]


def test_a_truncated_bag_is_one_line_and_nothing_written(tmp_path, capsys):
    episode = write_episode(tmp_path / "episode", Episode(frames=8, width=64, height=48))
    [mcap] = episode.glob("*.mcap")
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 2])
    line = _bad_input(tmp_path, capsys, episode)
    assert "episode" in line and ("truncated" in line or "not a readable" in line)


def test_a_corrupt_bag_is_one_line(tmp_path, capsys):
    episode = write_episode(tmp_path / "episode", Episode(frames=4))
    [mcap] = episode.glob("*.mcap")
    data = bytearray(mcap.read_bytes())
    quarter = len(data) // 4
    data[quarter: 3 * quarter] = b"\xa5" * (2 * quarter)  # records and their lengths
    mcap.write_bytes(bytes(data))
    line = _bad_input(tmp_path, capsys, episode)
    assert "episode" in line


def test_a_missing_camera_topic_is_named(tmp_path, capsys):
    episode = write_episode(tmp_path / "episode", Episode(camera_topic="/other/image"))
    line = _bad_input(tmp_path, capsys, episode)
    assert CAMERA in line and "/other/image" in line


def test_a_bag_without_any_image_is_refused(tmp_path, capsys):
    episode = write_episode(tmp_path / "episode", Episode(frames=0))
    assert "no image topic" in _bad_input(tmp_path, capsys, episode)


def test_an_unknown_message_type_on_an_input_is_refused(tmp_path, capsys):
    episode = write_episode(
        tmp_path / "episode",
        Episode(frames=0, extra=[(CAMERA, "std_msgs/msg/String", 1, {"data": "x"})]),
    )
    line = _bad_input(tmp_path, capsys, episode)
    assert "std_msgs/msg/String" in line and CAMERA in line


def test_a_missing_bag_and_a_bad_parameter_are_one_line(tmp_path, capsys):
    assert "no such bag" in _bad_input(tmp_path, capsys, tmp_path / "nothing")
    episode = write_episode(tmp_path / "episode", Episode(frames=1))
    line = _bad_input(tmp_path, capsys, episode, "-p", "inference_rate=-1")
    assert "inference_rate" in line


def test_frame_colours_differ():
    assert len({frame_colour(i) for i in range(8)}) == 8


# ---------------------------------------------------------------- chunks, the command


def test_a_chunked_policy_replays_on_the_node_timeline(tmp_path):
    """Five-step chunks: each step goes out when due (the executor's timeline, simulated),
    the chunk message carries the guard's view of all five, and a new frame is taken
    only when the timeline runs low."""
    episode = write_episode(tmp_path / "episode", Episode(frames=6, task="chunk 5"))
    status, output, _ = replay(tmp_path, episode, "--backend",
                               "server_test_backends:ChunkedBackend",
                               "-p", "refill_horizon_sec=0.15")
    assert status == EXIT_PASSED
    with RecordedBag(str(output), STORE) as bag:
        outputs = [(t, m) for _, t, m in bag.messages({OUTPUT: "o"})]
        chunks = [m for _, _, m in bag.messages({"/manipulation/policy_chunk": "c"})]
    assert chunks and all(len(c.actions) == 5 for c in chunks)
    assert {c.action_period_sec for c in chunks} == {0.1}
    steps = [m for _, m in outputs if m.step_index < m.chunk_length]
    assert {m.chunk_length for m in steps} == {5}
    chunks_seen = set()
    for time_ns, msg in outputs:
        due_ns = msg.due.sec * 10**9 + msg.due.nanosec
        # On the 10 ms tick at or after it fell due (due times are float sums: 1 us slack);
        # a chunk's first step may go up to half a period later: the takeover, when the
        # previous chunk's command has served its period.
        late_ns = 20_000_000 if msg.request_id in chunks_seen else 70_000_000
        chunks_seen.add(msg.request_id)
        assert -1_000 <= time_ns - due_ns < late_ns
    # Each chunk from a newer frame; a new chunk takes over: 6 chunks, fewer than 30 steps.
    stamps = [c.header.stamp.sec * 10**9 + c.header.stamp.nanosec for c in chunks]
    assert stamps == sorted(set(stamps)) and len(chunks) == 6
    assert len({(m.header.stamp.sec, m.header.stamp.nanosec, m.step_index) for _, m in outputs}
               ) == len(outputs) < 30


def test_the_command_line_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "manipulation_policy.replay", str(tmp_path / "none"),
         "--backend", "stub", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )
    assert result.returncode == EXIT_BAD_INPUT
    expected = f"replay: error: {tmp_path / 'none'}: no such bag"
    assert result.stderr.strip().splitlines() == [expected]


# ---------------------------------------------------------------- inputs as the node takes them


def _outputs(output: Path) -> list:
    with RecordedBag(str(output), STORE) as bag:
        return [m for _, _, m in bag.messages({OUTPUT: "o"})]


def test_compressed_frames_replay_as_the_raw_ones(tmp_path):
    raw = write_episode(tmp_path / "raw", Episode(frames=4))
    compressed = write_episode(tmp_path / "compressed", Episode(frames=4, compressed=True))
    status, raw_out, _ = replay(tmp_path, raw, "--backend", "stub", name="raw_out")
    assert status == EXIT_PASSED
    status, _, report = replay(tmp_path, compressed, "--backend", "stub",
                               "--image-transport", "compressed", "--compare-with", str(raw_out),
                               "--gripper-tolerance", "0", "--position-tolerance", "0")
    assert status == EXIT_PASSED and report["summary"]["within"] == 4  # PNG is lossless


def test_the_end_effector_pose_goes_with_a_frame_only_in_the_reference_frame(tmp_path):
    in_frame = write_episode(tmp_path / "in", Episode(frames=3, eef_frame="base_link"))
    status, output, _ = replay(tmp_path, in_frame, "--backend", "stub", name="in_out")
    assert status == EXIT_PASSED
    absolute = _outputs(output)
    # The stub's delta (at most 1 cm) composed with the pose recorded before the frame.
    assert len(absolute) == 3
    for index, msg in enumerate(absolute):
        pose_x = 0.4 + 0.01 * (2 + 5 * index)  # poses every 50 ms, frames every 250 ms
        assert msg.eef_target_mode == 0 and abs(msg.eef_target_pose.position.x - pose_x) < 0.011
    elsewhere = write_episode(tmp_path / "other", Episode(frames=3, eef_frame="tool0"))
    status, output, _ = replay(tmp_path, elsewhere, "--backend", "stub", name="other_out")
    assert all(m.eef_target_mode == 1 for m in _outputs(output))  # no pose: a delta


def test_the_aggregated_observation_is_an_input(tmp_path):
    episode = write_episode(tmp_path / "episode", Episode(frames=3, as_observation=True))
    status, output, _ = replay(tmp_path, episode, "--backend", "stub")
    assert status == EXIT_PASSED and len(_outputs(output)) == 3
    status, _, _ = replay(tmp_path, episode, "--backend", "stub", "-p", "use_observation=false",
                          name="off")
    assert status == EXIT_BAD_INPUT  # then the camera topic is needed, and missing


def test_a_server_that_does_not_answer_at_the_start_is_one_line(tmp_path, capsys):
    episode = write_episode(tmp_path / "episode", Episode(frames=1))
    before = set(tmp_path.iterdir())
    status = main([str(episode), "--server", "http://127.0.0.1:9", "--output",
                   str(tmp_path / "out")])
    assert status == EXIT_BAD_INPUT and set(tmp_path.iterdir()) == before
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("replay: error:") and "127.0.0.1:9" in line


def test_an_existing_output_is_not_overwritten(tmp_path, capsys):
    episode = write_episode(tmp_path / "episode", Episode(frames=1))
    (tmp_path / "out" / "kept").mkdir(parents=True)
    before = set(tmp_path.iterdir())
    status, _, _ = replay(tmp_path, episode, "--backend", "stub")
    assert status == EXIT_BAD_INPUT and set(tmp_path.iterdir()) == before
    assert "exists already" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept"]


def test_the_progress_bar_reaches_the_total():
    import io

    from manipulation_policy.replay.progress import Progress

    stream = io.StringIO()
    progress = Progress(3, True, stream)
    for _ in range(3):
        progress.advance()
    progress.close()
    assert stream.getvalue().rstrip().endswith("100.0 % 3/3 messages")


def test_a_frame_held_back_by_the_rate_goes_when_the_rate_first_allows(tmp_path):
    """Frames every 30 ms, 20 Hz: a frame goes on arrival when 45 ms (0.9 period) have
    passed since the last, else the moment they have, unless a newer one came first:
    frames 0 (0 ms), 1 (at 45), 2 (at 90), 4 (at 135); frame 3 was overtaken."""
    episode = write_episode(tmp_path / "episode", Episode(frames=5, frame_period_ns=30_000_000))
    status, output, _ = replay(tmp_path, episode, "--backend", "stub",
                               "-p", "inference_rate=20.0")
    assert status == EXIT_PASSED
    first = Episode().frame_time(0)
    used = [(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec - first) // 30_000_000
            for m in _outputs(output)]
    assert used == [0, 1, 2, 4]
    with RecordedBag(str(output), STORE) as bag:
        sent = [t - first for _, t, _ in bag.messages({"/manipulation/replay/requests": "r"})]
    assert sent == [0, 45_000_000, 90_000_000, 135_000_000]
