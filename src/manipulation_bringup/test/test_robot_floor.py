"""The robot side stays within what a stock ROS 2 Humble robot has.

A Humble robot runs Python 3.10 with Ubuntu 22.04's numpy, Pillow and PyYAML
(docker/robot-requirements.txt); the development venv has far newer ones, so
a test can pass here and the robot still fail (Pillow 9.0.1 has no
``Image.Resampling``). These checks read the robot-side code without running it:

- every ``from X import Y`` and every attribute chain on an imported module
  (``Image.Resampling.BILINEAR``, ``np.random.default_rng``, ``datetime.UTC``)
  resolves in the Python and libraries installed here. In the robot-floor lane
  (make test-floor) those are the floor's, so a name newer than the floor fails
  with its file and line; in the main lane a name since removed does;
- every Python file of the repository compiles under this Python (3.10 in the
  floor lane);
- every module of the two packages imports, except the ones that need ROS 2 or
  the GPU stack where those are missing (the floor lane), and those are exactly
  the ones listed here: the floor lane keeps testing the rest.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
POLICY = REPO / "src" / "manipulation_policy" / "manipulation_policy"
BRINGUP = REPO / "src" / "manipulation_bringup"
# What runs on the robot: manipulation_policy (the nodes and what they call: core, the
# backends the local node loads ...) and the bringup (launch file, its logic, the demo).
# Not the HTTP server and not the replay of recorded episodes: the GPU host runs them.
ROBOT_SIDE = (POLICY, BRINGUP / "manipulation_bringup", BRINGUP / "launch")
GPU_HOST_SIDE = (POLICY / "server", POLICY / "policy_server.py", POLICY / "replay")
PINS_FILE = REPO / "docker" / "robot-requirements.txt"
FIRST_PARTY = {"manipulation_policy", "manipulation_bringup", "manipulation_msgs"}

# Modules that need ROS 2 (rclpy, messages) or the GPU stack (torch) to import.
NEEDS_ROS_OR_GPU = {
    "manipulation_bringup.demo",
    "manipulation_policy.backends.lerobot",
    "manipulation_policy.backends.openvla",
    "manipulation_policy.backends.openvla_batching",
    "manipulation_policy.backends.torch_device",
    "manipulation_policy.nodes.guard_diagnostics",
    "manipulation_policy.nodes.node_execution",
    "manipulation_policy.nodes.node_inputs",
    "manipulation_policy.nodes.node_publishing",
    "manipulation_policy.nodes.node_safety",
    "manipulation_policy.nodes.parameter_declarations",
    "manipulation_policy.nodes.parameter_handling",
    "manipulation_policy.nodes.policy_node",
    "manipulation_policy.nodes.policy_node_base",
    "manipulation_policy.nodes.remote_diagnostics",
    "manipulation_policy.nodes.remote_policy_node",
    "manipulation_policy.nodes.ros_conversion",
}
ROS_OR_GPU_TOPS = {"rclpy", "rcl_interfaces", "builtin_interfaces", "ament_index_python",
                   "torch", "transformers", "tokenizers", "safetensors"}
# The replay's modules that read or write bags (rosbags): GPU-host side, not in the floor.
NEEDS_REPLAY_LIBRARIES = {
    "manipulation_policy.replay.bag_input",
    "manipulation_policy.replay.bag_output",
    "manipulation_policy.replay.bag_types",
    "manipulation_policy.replay.runs",
}
REPLAY_TOPS = {"rosbags", "matplotlib"}
# The LeRobot backend: LeRobot is in the lerobot lane's venv only (make test-lerobot).
NEEDS_LEROBOT = {"manipulation_policy.backends.lerobot"}
LEROBOT_TOPS = {"lerobot"}


def python_files(*roots: Path) -> list[Path]:
    files = []
    for root in roots:
        files.extend([root] if root.is_file() else sorted(root.rglob("*.py")))
    return files


# ------------------------------------------------------------ names newer than the floor


def _imports(tree: ast.AST) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """Each name an import statement binds -> (module, attributes) it stands for."""
    bound: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound.setdefault(alias.asname, set()).add((alias.name, ()))
                else:
                    top = alias.name.split(".")[0]
                    bound.setdefault(top, set()).add((top, ()))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if alias.name != "*":
                    target = (node.module, (alias.name,))
                    bound.setdefault(alias.asname or alias.name, set()).add(target)
    return bound


def _other_bindings(tree: ast.AST) -> set[str]:
    """Names also bound otherwise (arguments, assignments, loops, defs): not checked."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _attribute_chains(tree: ast.AST):
    """(root name, attributes, line) of each outermost chain like ``Image.Resampling.X``."""
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        attrs: list[str] = []
        value: ast.AST = node
        while isinstance(value, ast.Attribute):
            attrs.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name):
            yield value.id, tuple(reversed(attrs)), node.lineno


def _where(module_name: str) -> str:
    """'Pillow 9.0.1' for PIL: what answered for a top-level module here."""
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top)
    if not dists:
        return f"Python {sys.version.split()[0]}"
    return ", ".join(f"{d} {importlib.metadata.version(d)}" for d in sorted(set(dists)))


def resolve(module_name: str, attrs: tuple[str, ...]) -> str | None:
    """None if ``module_name.attrs`` exists here, else what is missing. Attributes are
    followed through modules and classes only (an instance's are not known)."""
    obj = importlib.import_module(module_name)
    path = module_name
    for attr in attrs:
        if not (inspect.ismodule(obj) or inspect.isclass(obj)):
            return None
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
        elif hasattr(obj, "__path__") and importlib.util.find_spec(f"{obj.__name__}.{attr}"):
            obj = importlib.import_module(f"{obj.__name__}.{attr}")
        else:
            return f"{path} has no {attr!r} in {_where(module_name)}"
        path = f"{path}.{attr}"
    return None


def _checkable(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top not in FIRST_PARTY and importlib.util.find_spec(top) is not None


def newer_than_installed(path: Path) -> list[str]:
    """Every imported name and attribute chain of ``path`` that does not exist here."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not _checkable(node.module):
                continue
            for alias in node.names:
                missing = alias.name != "*" and resolve(node.module, (alias.name,))
                if missing:
                    problems.append(f"{where}:{node.lineno}: from {node.module} import "
                                    f"{alias.name}: {missing}")
    bound, shadowed = _imports(tree), _other_bindings(tree)
    for name, attrs, line in _attribute_chains(tree):
        if name in shadowed:
            continue
        for module_name, first in bound.get(name, ()):
            if _checkable(module_name):
                missing = resolve(module_name, first + attrs)
                if missing:
                    problems.append(f"{where}:{line}: {'.'.join((name, *attrs))}: {missing}")
    return problems


def robot_side_files() -> list[Path]:
    return [
        path for path in python_files(*ROBOT_SIDE)
        if not any(path == other or other in path.parents for other in GPU_HOST_SIDE)
    ]


@pytest.mark.parametrize(
    "path", robot_side_files(), ids=lambda path: str(path.relative_to(REPO))
)
def test_the_robot_side_uses_only_names_the_installed_libraries_have(path):
    assert newer_than_installed(path) == []


def test_the_check_finds_a_name_the_installed_pillow_lacks(tmp_path):
    """The check itself: Image.Resampling (Pillow 9.1+) and datetime.UTC (Python 3.11+)
    are flagged wherever they are missing, and a chain that exists is not."""
    source = tmp_path / "uses_pillow.py"
    source.write_text(
        "import datetime\n\nimport numpy as np\nfrom PIL import Image\n\n\n"
        "def shrink(rgb):\n"
        "    return Image.fromarray(rgb).resize((2, 2), Image.BILINEAR)\n\n\n"
        "def shrink_newer(rgb):\n"
        "    return Image.fromarray(rgb).resize((2, 2), Image.Resampling.BILINEAR)\n\n\n"
        "def utc():\n"
        "    return datetime.timezone.utc, datetime.UTC\n\n\n"
        "def missing():\n"
        "    return np.no_such_function, Image.NoSuchThing.X\n"
    )
    import PIL.Image

    problems = [p.split(": ", 1)[1] for p in newer_than_installed(source)]
    expected = [
        "np.no_such_function: numpy has no 'no_such_function'",
        "Image.NoSuchThing.X: PIL.Image has no 'NoSuchThing'",
    ]
    if not hasattr(PIL.Image, "Resampling"):  # Pillow < 9.1, as on a Humble robot
        expected.append("Image.Resampling.BILINEAR: PIL.Image has no 'Resampling'")
    if sys.version_info < (3, 11):  # the standard library is checked too
        expected.append("datetime.UTC: datetime has no 'UTC'")
    assert sorted(p.split(" in ")[0] for p in problems) == sorted(expected)


# -------------------------------------------------------------- syntax and imports


@pytest.mark.parametrize(
    "path",
    python_files(REPO / "src", REPO / "bench", REPO / ".ci"),
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_every_python_file_compiles_under_this_python(path):
    compile(path.read_text(), str(path), "exec", dont_inherit=True)


def _package_modules() -> list[str]:
    import manipulation_bringup
    import manipulation_policy

    names = []
    for package in (manipulation_policy, manipulation_bringup):
        names.append(package.__name__)
        prefix = package.__name__ + "."
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix)]
    return sorted(names)


def test_only_the_listed_modules_need_ros_or_the_gpu_stack():
    """Everything else imports without ROS 2, torch and rosbags, so the floor lane tests it."""
    needing = set()
    for name in _package_modules():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            top = (error.name or "").split(".")[0]
            if not (top in ROS_OR_GPU_TOPS | REPLAY_TOPS | LEROBOT_TOPS
                    or top.endswith("_msgs")):
                raise
            needing.add(name)
    expected = set()
    if importlib.util.find_spec("rclpy") is None and importlib.util.find_spec("torch") is None:
        expected |= NEEDS_ROS_OR_GPU
    if importlib.util.find_spec("rosbags") is None:
        expected |= NEEDS_REPLAY_LIBRARIES
    if importlib.util.find_spec("lerobot") is None:
        expected |= NEEDS_LEROBOT
    assert needing == expected


# ------------------------------------------------------------------ one pins file


def test_the_floor_is_one_file_that_the_readme_the_robot_image_and_the_lane_read():
    text = PINS_FILE.read_text()
    python = re.search(r"^# python: (\d+\.\d+)", text, re.MULTILINE)[1]
    pins = re.findall(r"^([A-Za-z0-9_.-]+)(?:>=|==)(\S+)", text, re.MULTILINE)
    assert {name for name, _ in pins} == {"numpy", "pillow", "pyyaml", "pydantic"}

    dockerfile = (REPO / "docker" / "robot.Dockerfile").read_text()
    assert "COPY docker/robot-requirements.txt docker/robot-requirements.txt" in dockerfile
    assert "pip3 install --no-cache-dir -r docker/robot-requirements.txt" in dockerfile
    assert not re.search(r"pip3? install[^\n]*==", dockerfile), "a pin outside the file"

    readme = (REPO / "README.md").read_text()
    assert "pip3 install -r docker/robot-requirements.txt" in readme
    assert not re.search(r"pip3 install \"?pydantic", readme), "a pin outside the file"
    statement = readme.split("**Supported versions on the robot side**")[1].split("\n\n")[0]
    statement = " ".join(statement.split())
    assert f"Python {python} or newer" in statement
    for name, version in pins:
        assert re.search(rf"{name} {re.escape(version)}\b", statement, re.IGNORECASE), name

    lane = (REPO / ".ci" / "bootstrap_floor_venv.sh").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "pins=docker/robot-requirements.txt" in lane
    assert re.search(r"^\$\(FLOOR_STAMP\):.*docker/robot-requirements.txt", makefile, re.MULTILINE)
