"""Each image's command can start in that image, checked without a Docker engine.

The command an image (or the compose file) runs is resolved to the Python
modules it ends up executing: `ros2 launch ... core_launch.py ARGS` through
the launch logic to the node and, for the in-process node, to the backend its
parameters choose; `python3 -m MODULE` to that module. Every import those
modules make, followed through this project's own modules, must be provided by
what the image installs: the standard library, the packages built in the
image, what its Dockerfile installs (rosdep from the package manifests, pip,
the base image's stack), nothing else. An import inside ``try: ... except
ImportError`` is optional and not required.

This caught a robot image whose default command started the in-process node
with ``backend: openvla`` in an image without torch: it exited at start.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dockerfiles import DOCKER, REPO, instructions

from manipulation_bringup.launch_logic import LOCAL_NODE, plan_policy_node

SRC = REPO / "src"
PARAMS_FILE = SRC / "manipulation_bringup" / "config" / "policy_params.yaml"
WORKSPACE_PACKAGES = ("manipulation_msgs", "manipulation_policy", "manipulation_bringup")
PYTHON_PACKAGES = ("manipulation_policy", "manipulation_bringup")

# rosdep keys of the manifests -> the Python modules they install. ROS package
# keys (rclpy, sensor_msgs, ...) import under their own name. A key missing
# here fails the test: add it with the module it really provides.
ROSDEP_PYTHON_MODULES = {
    "python3-numpy": ("numpy",),
    "python3-pil": ("PIL",),
    "python3-yaml": ("yaml",),
    "python3-pydantic": ("pydantic",),
    "python3-requests": ("requests",),
    "python3-pytest": ("pytest",),
}
# pip distribution names whose module name is not the name with - as _.
PIP_MODULES = {"pillow": ("PIL",), "pyyaml": ("yaml",), "pydantic": ("pydantic", "pydantic_core")}
# What a base image brings besides its Python's standard library.
BASE_IMAGE_MODULES = {
    "ros:humble-ros-base": (),  # ROS packages are declared in the manifests, rosdep installs them
    "pytorch/pytorch:2.2.0-cuda12.1-cudnn8-runtime": ("torch", "torchvision", "numpy"),
}


# ------------------------------------------------------------ the Dockerfile


def pip_requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower())
    return names


def pip_installed(dockerfile: Path) -> set[str]:
    """Distribution names each `pip install` of the Dockerfile names (-r files read)."""
    names: set[str] = set()
    for keyword, rest in instructions(dockerfile):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if "install" not in words or not any(re.fullmatch(r"pip3?", w) for w in words):
                continue
            arguments = words[words.index("install") + 1:]
            for i, word in enumerate(arguments):
                if word == "-r":
                    requirements = (REPO / arguments[i + 1]).read_text().splitlines()
                    names |= pip_requirement_names(requirements)
                elif not word.startswith("-") and (i == 0 or arguments[i - 1] != "-r"):
                    if not word.startswith("."):  # ./src/<package>: the project itself
                        names |= pip_requirement_names([word])
    return names


def manifest_dependencies(package: str) -> set[str]:
    root = ElementTree.parse(SRC / package / "package.xml").getroot()
    return {
        element.text.strip()
        for tag in ("depend", "exec_depend", "build_export_depend")
        for element in root.iter(tag)
    }


def modules_of_rosdep_key(key: str) -> tuple[str, ...]:
    if key.startswith("python3-"):
        if key not in ROSDEP_PYTHON_MODULES:
            pytest.fail(f"rosdep key {key!r}: add the modules it provides to ROSDEP_PYTHON_MODULES")
        return ROSDEP_PYTHON_MODULES[key]
    return (key,)


def modules_of_pip_names(names: set[str]) -> set[str]:
    modules: set[str] = set()
    for name in names:
        modules.update(PIP_MODULES.get(name, (name.replace("-", "_"),)))
    return modules


@dataclass(frozen=True)
class Image:
    dockerfile: Path
    base: str
    provided: frozenset[str]  # top-level module names importable in the image
    command: tuple[str, ...]


def robot_image() -> Image:
    dockerfile = DOCKER / "robot.Dockerfile"
    steps = instructions(dockerfile)
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "rosdep install --from-paths src" in runs
    # rosdep installs the workspace's exec dependencies; colcon builds the workspace.
    provided = set(WORKSPACE_PACKAGES)
    for package in WORKSPACE_PACKAGES:
        for key in manifest_dependencies(package) - set(WORKSPACE_PACKAGES):
            provided.update(modules_of_rosdep_key(key))
    provided |= modules_of_pip_names(pip_installed(dockerfile))
    base = dict(steps)["FROM"]
    provided.update(BASE_IMAGE_MODULES[base])
    return Image(dockerfile, base, frozenset(provided), tuple(json.loads(dict(steps)["CMD"])))


def server_image() -> Image:
    dockerfile = DOCKER / "server.Dockerfile"
    steps = instructions(dockerfile)
    base = dict(steps)["FROM"]
    provided = {"manipulation_policy", *BASE_IMAGE_MODULES[base]}
    provided |= modules_of_pip_names(pip_installed(dockerfile))
    return Image(dockerfile, base, frozenset(provided), tuple(json.loads(dict(steps)["CMD"])))


# ------------------------------------------------------- command -> modules


def console_script_module(package: str, executable: str) -> str:
    text = (SRC / package / "setup.py").read_text()
    match = re.search(rf'"{re.escape(executable)}\s*=\s*([\w.]+):\w+"', text)
    assert match, f"{package} installs no console script {executable!r}"
    return match.group(1)


def backend_module(backend: str) -> str:
    from manipulation_policy.backends import BACKEND_MODULES

    if ":" in backend:
        return backend.partition(":")[0]
    return f"manipulation_policy.backends.{BACKEND_MODULES[backend].partition(':')[0]}"


def entry_modules(command: tuple[str, ...]) -> list[str]:
    """The Python modules a command runs: a launch file's own imports, the
    node it starts and the backend that node loads, or a `python3 -m` module."""
    if command[:2] == ("ros2", "launch"):
        package, launch_file, *arguments = command[2:]
        assert (package, launch_file) == ("manipulation_bringup", "core_launch.py")
        plan = plan_policy_node(
            dict(argument.split(":=", 1) for argument in arguments),
            default_params_file=PARAMS_FILE,
        )
        modules = [
            f"file:{SRC / package / 'launch' / launch_file}",
            console_script_module(plan.package, plan.executable),
        ]
        if plan.executable == LOCAL_NODE:
            modules.append(backend_module(plan.parameters.get("backend", "stub")))
        return modules
    if command[:2] in (("python3", "-m"), ("python", "-m")):
        module, *arguments = command[2:]
        modules = [module]
        if module == "manipulation_policy.policy_server" and "--backend" in arguments:
            modules.append(backend_module(arguments[arguments.index("--backend") + 1]))
        return modules
    pytest.fail(f"do not know how to follow the command {shlex.join(command)}")


# ------------------------------------------------------- the import closure


def module_file(module: str) -> Path | None:
    if module.startswith("file:"):
        return Path(module[5:])
    top = module.split(".")[0]
    if top not in PYTHON_PACKAGES:
        return None
    base = SRC / top / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_optional(handlers: list[ast.ExceptHandler]) -> bool:
    names = set()
    for handler in handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names.update(getattr(t, "id", None) for t in types)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (dotted, parents included), optional ones left out."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        parts = name.split(".")
        found.update(".".join(parts[: i + 1]) for i in range(len(parts)))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try) and _is_optional(node.handlers):
            for child in node.orelse + node.finalbody:
                visit(child)
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            add(target)
            for alias in node.names:  # `from package import module`
                if module_file(f"{target}.{alias.name}") is not None:
                    add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def third_party_imports(entries: list[str]) -> dict[str, str]:
    """Top-level modules outside the standard library and this project's
    Python packages -> the first project file found importing each."""
    seen: set[str] = set()
    pending = list(entries)
    needed: dict[str, str] = {}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(module)
        if path is None:
            top = module.split(".")[0]
            if top not in PYTHON_PACKAGES and top not in sys.stdlib_module_names:
                needed.setdefault(top, "(the command itself)")
            continue
        for imported in imports_of(path, module):
            top = imported.split(".")[0]
            if top in PYTHON_PACKAGES:
                pending.append(imported)
            elif top not in sys.stdlib_module_names and top != "__future__":
                needed.setdefault(top, str(path))
    return needed


def compose_command(service: str) -> tuple[str, ...]:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    return tuple(compose["services"][service]["command"])


IMAGES = {"manipulation-robot": robot_image, "manipulation-policy-server": server_image}


def readme_docker_runs() -> list[tuple[str, tuple[str, ...]]]:
    """(image, command) of each `docker run` in the README that gives a command."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "README.md").read_text())
    runs = []
    for line in text.splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith("docker run") else []
        image = next((word for word in words if word in IMAGES), None)
        if image and words[-1] != image:
            runs.append((image, tuple(words[words.index(image) + 1:])))
    return runs


CASES = {
    "robot image, default command": (robot_image, None),
    "robot image, compose command": (robot_image, "robot"),
    "server image, default command": (server_image, None),
    "server image, compose command": (server_image, "policy_server"),
    **{
        f"README docker run {number} ({image})": (IMAGES[image], command)
        for number, (image, command) in enumerate(readme_docker_runs(), 1)
    },
}


def test_the_readme_shows_a_docker_run_command_for_each_image():
    assert {image for image, _ in readme_docker_runs()} == set(IMAGES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_import_of_the_command_is_installed_in_its_image(case):
    make_image, command_source = CASES[case]
    image = make_image()
    if command_source is None:
        command = image.command
    elif isinstance(command_source, tuple):
        command = command_source
    else:
        command = compose_command(command_source)
    needed = third_party_imports(entry_modules(command))
    missing = {name: where for name, where in needed.items() if name not in image.provided}
    assert not missing, (
        f"{case}: `{shlex.join(command)}` imports what {image.dockerfile.name} does not install: "
        + "; ".join(f"{name} (imported by {where})" for name, where in sorted(missing.items()))
    )


# ------------------------------------------- the checker itself can see a gap


def test_the_in_process_openvla_node_needs_torch_which_the_robot_image_lacks():
    command = ("ros2", "launch", "manipulation_bringup", "core_launch.py", "backend:=openvla")
    needed = third_party_imports(entry_modules(command))
    assert {"torch", "transformers", "rclpy", "numpy"} <= set(needed)
    assert "torch" not in robot_image().provided


def test_the_remote_node_needs_ros_but_neither_torch_nor_an_http_framework():
    command = (
        "ros2", "launch", "manipulation_bringup", "core_launch.py", "use_remote_policy:=true"
    )
    needed = set(third_party_imports(entry_modules(command)))
    assert {"rclpy", "sensor_msgs", "manipulation_msgs", "numpy", "PIL", "launch"} <= needed
    assert not needed & {"torch", "transformers", "fastapi", "uvicorn", "requests"}


def test_optional_and_type_checking_imports_are_not_required(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        "import os\nimport numpy\n"
        "try:\n    import orjson\nexcept ImportError:\n    orjson = None\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "def later():\n    import transformers\n"
    )
    assert set(third_party_imports([f"file:{source}"])) == {"numpy", "transformers"}
