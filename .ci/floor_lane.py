"""pytest plugin of the robot-floor lane (make test-floor), loaded with -p floor_lane.

The lane runs the whole suite under the robot's Python and library floor
(docker/robot-requirements.txt) in a venv with no ROS and no torch. A test
module or a test that stops on importing ROS 2 (rclpy, message packages,
launch), the GPU stack (torch, transformers) or the replay's libraries (rosbags,
matplotlib: the replay runs on a GPU host or a workstation, never on the robot) is
reported as skipped with that module's name: it runs in the main lane (LeRobot's
tests: in the lerobot lane). Any other error, an import
error of a library the floor does have included, fails as usual.

Only this lane loads the plugin, so the main lane never skips a test for a
missing import; and the plugin refuses to run where rclpy or torch is
importable, or where the installed floor is not exactly the pinned one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

PINS_FILE = Path(__file__).resolve().parents[1] / "docker" / "robot-requirements.txt"

# Top-level modules whose absence means "runs in the main lane".
ROS_MODULES = frozenset(
    {"rclpy", "rcl_interfaces", "builtin_interfaces", "ament_index_python", "launch",
     "launch_ros", "rosidl_runtime_py", "manipulation_msgs"}
)
GPU_MODULES = frozenset(
    {"torch", "torchvision", "transformers", "tokenizers", "safetensors", "accelerate",
     "peft", "timm", "bitsandbytes"}
)
REPLAY_MODULES = frozenset({"rosbags", "matplotlib"})
LEROBOT_MODULES = frozenset({"lerobot"})


def main_lane_reason(error: BaseException | None) -> str | None:
    """Why a test that raised ``error`` runs in the main lane only, or None."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.split(".")[0]
    if top in ROS_MODULES or top.endswith("_msgs"):
        return f"needs ROS 2 ({top}): runs in the main lane"
    if top in GPU_MODULES:
        return f"needs the GPU stack ({top}): runs in the main lane"
    if top in LEROBOT_MODULES:
        return f"needs LeRobot ({top}): runs in the lerobot lane: make test-lerobot"
    if top in REPLAY_MODULES:
        return f"needs the replay's libraries ({top}): runs in the main lane"
    return None


def floor_pins(path: Path = PINS_FILE) -> tuple[str, dict[str, str]]:
    """The pins file's Python ("3.10") and its packages, each at its floor version."""
    text = path.read_text()
    python = re.search(r"^# python: *(\d+\.\d+)", text, re.MULTILINE)
    assert python, f"{path}: no '# python: X.Y' line"
    pins = {}
    for line in text.splitlines():
        requirement = re.match(r"^([A-Za-z0-9_.-]+) *(?:>=|==) *([^ #;]+)", line)
        if requirement:
            pins[requirement[1].lower()] = requirement[2]
    return python[1], pins


def pytest_configure(config: pytest.Config) -> None:
    python, pins = floor_pins()
    problems = []
    if "{}.{}".format(*sys.version_info[:2]) != python:
        problems.append(f"Python is {sys.version.split()[0]}, the floor is {python}")
    for name in ("rclpy", "torch"):
        if importlib.util.find_spec(name) is not None:
            problems.append(f"{name} is importable here: this plugin is for the floor venv")
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            problems.append(f"{name} is {installed}, the floor is {version}")
    if problems:
        raise pytest.UsageError("floor lane: " + "; ".join(problems))


class FloorModule(pytest.Module):
    """A test module that skips (with the reason) when its import needs ROS or torch."""

    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            reason = main_lane_reason(error.__cause__)
            if reason is None:
                raise
            # Named in the reason: the summary then lists each skipped module.
            raise pytest.skip.Exception(
                f"{self.path.name}: {reason}", allow_module_level=True
            ) from None


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    return FloorModule.from_parent(parent, path=module_path)


def _skip_if_main_lane_only(error: ModuleNotFoundError) -> None:
    reason = main_lane_reason(error)
    if reason is not None:
        # Reported at the test's own location, as pytest's skip markers are.
        raise pytest.skip.Exception(reason, _use_item_location=True) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    try:
        return (yield)
    except ModuleNotFoundError as error:
        _skip_if_main_lane_only(error)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    try:
        return (yield)
    except ModuleNotFoundError as error:
        _skip_if_main_lane_only(error)
        raise


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if passed == 0:
        print("\nfloor lane: no test passed: the lane proved nothing", file=sys.stderr)
        if exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
