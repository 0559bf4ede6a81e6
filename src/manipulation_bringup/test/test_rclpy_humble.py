"""Only rclpy that ROS 2 Humble has, in the code and in the tests.

The tests run on kilted's rclpy from PyPI; robots run Humble's, which lacks
whole modules that kilted has (``rclpy.parameter_client``,
``rclpy.event_handler``, ``rclpy.type_hash`` ...) and names in others. Humble's
rclpy cannot be installed here, so its module-level names are recorded in
rclpy_humble.json (made with ``python test_rclpy_humble.py RCLPY_CHECKOUT humble``
from a checkout of github.com/ros2/rclpy) and every ``import rclpy.X``,
``from rclpy.X import Y`` and ``rclpy.X.Y`` in src/ and bench/ is checked
against them, with the file and line of each that Humble lacks.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HUMBLE = json.loads((Path(__file__).with_name("rclpy_humble.json")).read_text())["modules"]


def humble_lacks(module: str, names: tuple[str, ...] = ()) -> str | None:
    """None if Humble's rclpy has ``module.names`` (followed through its modules), else
    what it lacks."""
    if module not in HUMBLE:
        return f"Humble's rclpy has no module {module}"
    for name in names:
        if f"{module}.{name}" in HUMBLE:
            module = f"{module}.{name}"
        elif name in HUMBLE[module]:
            return None  # a class or function: its members are not recorded
        else:
            return f"Humble's {module} has no {name!r}"
    return None


def rclpy_uses(tree: ast.AST):
    """(line, what, module, names) for each use of rclpy in a parsed file."""
    rclpy_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rclpy":
                    yield node.lineno, f"import {alias.name}", alias.name, ()
                    if alias.asname is None or alias.name == "rclpy":
                        rclpy_names.add(alias.asname or "rclpy")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rclpy":
            for alias in node.names:
                what = f"from {node.module} import {alias.name}"
                yield node.lineno, what, node.module, (alias.name,) * (alias.name != "*")
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            attrs, value = [], node
            while isinstance(value, ast.Attribute):
                attrs.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in rclpy_names:
                attrs.reverse()
                yield node.lineno, ".".join(["rclpy", *attrs]), "rclpy", tuple(attrs)


def python_files() -> list[Path]:
    return sorted([*(REPO / "src").rglob("*.py"), *(REPO / "bench").rglob("*.py")])


def newer_than_humble(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    problems = []
    for line, what, module, names in rclpy_uses(tree):
        lacks = humble_lacks(module, names)
        if lacks:
            problems.append(f"{where}:{line}: {what}: {lacks}")
    return problems


@pytest.mark.parametrize("path", python_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_only_rclpy_that_humble_has(path):
    assert newer_than_humble(path) == []


def test_the_check_finds_what_humble_lacks(tmp_path):
    source = tmp_path / "uses_rclpy.py"
    source.write_text(
        "import rclpy\nimport rclpy.event_handler\n"
        "from rclpy.executors import SingleThreadedExecutor, ExternalShutdownException\n"
        "from rclpy.parameter_client import AsyncParameterClient\n"
        "from rclpy.qos import qos_profile_sensor_data, QoSProfile\n"
        "rclpy.init()\nrclpy.qos.QoSProfile(depth=1)\nrclpy.type_hash.TypeHash\n"
    )
    assert [problem.split(": ", 1)[1] for problem in newer_than_humble(source)] == [
        "import rclpy.event_handler: Humble's rclpy has no module rclpy.event_handler",
        "from rclpy.parameter_client import AsyncParameterClient: "
        "Humble's rclpy has no module rclpy.parameter_client",
        "rclpy.type_hash.TypeHash: Humble's rclpy has no 'type_hash'",
    ]


def humble_names(checkout: Path, ref: str) -> dict[str, list[str]]:
    """Module-level names of each rclpy/rclpy/**.py of ``ref`` in an rclpy checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True, check=True).stdout

    modules = {}
    for file in git("ls-tree", "-r", "--name-only", ref, "--", "rclpy/rclpy").split():
        if not file.endswith(".py"):
            continue
        module = file.removeprefix("rclpy/").removesuffix(".py").replace("/", ".")
        names = set()
        for node in ast.walk(ast.parse(git("show", f"{ref}:{file}"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.col_offset == 0:
                    names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.col_offset == 0:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        modules[module.removesuffix(".__init__")] = sorted(n for n in names if n[0] != "_")
    return dict(sorted(modules.items()))


if __name__ == "__main__":
    checkout, ref = Path(sys.argv[1]), sys.argv[2]
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", ref], capture_output=True,
                            text=True, check=True).stdout.strip()
    modules = humble_names(checkout, ref)
    rows = [f"    {json.dumps(name)}: {json.dumps(names)}" for name, names in modules.items()]
    print('{\n  "source": ' + json.dumps(
        f"github.com/ros2/rclpy, {ref} at {commit}: the module-level names of each "
        "rclpy/rclpy/**.py") + ',\n  "modules": {\n' + ",\n".join(rows) + "\n  }\n}")
