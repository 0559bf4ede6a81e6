"""What can be checked of the deployment files without a Docker engine or a GPU:
every file a Dockerfile copies is in the repo and in its build context, the compose
file points at real Dockerfiles and passes arguments the launch file and the server
accept, requirements.txt / colcon.meta are well formed, and the Dockerfiles and
shell scripts pass hadolint and shellcheck (both from PyPI wheels)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfiles import DOCKER, DOCKERFILES, REPO, instructions

from manipulation_bringup.launch_logic import REMOTE_NODE, plan_policy_node
from manipulation_policy.backends import lerobot_options

COMPOSE_FILE = DOCKER / "docker-compose.yml"
PARAMS_FILE = REPO / "src" / "manipulation_bringup" / "config" / "policy_params.yaml"


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for keyword, rest in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(word.startswith("--from") for word in words):
            continue  # from another stage, not the build context
        words = [word for word in words if not word.startswith("--")]
        sources.extend(words[:-1])
    return sources


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*/|\*|\?)", pattern)
    wildcards = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts) + "$")


def ignored_by(dockerignore: Path, path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent folder counts."""
    patterns = [
        line.strip()
        for line in dockerignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_there_are_a_robot_and_a_server_dockerfile():
    assert {path.name for path in DOCKERFILES} == {
        "robot.Dockerfile", "server.Dockerfile", "lerobot-server.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources, "no COPY found"
    dockerignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} missing"
        assert not ignored_by(dockerignore, source), f"{source} excluded by {dockerignore.name}"


def test_the_dockerignore_matcher_follows_dockers_rules(tmp_path):
    ignore = tmp_path / "x.dockerignore"
    ignore.write_text("*\n!src/\n**/__pycache__\n")
    assert ignored_by(ignore, ".venv/bin/python")
    assert ignored_by(ignore, "README.md")
    assert not ignored_by(ignore, "src/manipulation_policy/setup.py")
    assert ignored_by(ignore, "src/manipulation_policy/__pycache__/x.pyc")


def test_robot_image_builds_the_workspace_and_launches_the_stack():
    steps = instructions(DOCKER / "robot.Dockerfile")
    assert steps[0] == ("FROM", "ros:humble-ros-base")
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "rosdep install --from-paths src" in runs
    assert "colcon build" in runs
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd == [
        "ros2", "launch", "manipulation_bringup", "core_launch.py", "use_remote_policy:=true"
    ]
    assert (REPO / "src/manipulation_bringup/launch" / cmd[3]).is_file()


def test_robot_entrypoint_sources_ros_and_the_workspace_then_execs():
    script = DOCKER / "robot_entrypoint.sh"
    text = script.read_text()
    humble = text.index("source /opt/ros/humble/setup.bash")
    workspace = text.index("source /ws/install/setup.bash")
    assert humble < workspace < text.index('exec "$@"')
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)


def test_server_image_serves_the_policy_with_a_health_check():
    steps = instructions(DOCKER / "server.Dockerfile")
    assert steps[0][0] == "FROM" and steps[0][1].startswith("pytorch/pytorch:2.2.0-cuda")
    by_keyword = dict(steps)
    assert by_keyword["EXPOSE"] == "5000"
    assert "http://127.0.0.1:5000/health" in by_keyword["HEALTHCHECK"]
    cmd = json.loads(by_keyword["CMD"])
    assert cmd[:3] == ["python3", "-m", "manipulation_policy.policy_server"]
    server_args = _server_args(cmd[3:])
    assert (server_args.host, server_args.port) == ("0.0.0.0", 5000)


def test_lerobot_server_image_serves_with_its_own_requirements():
    steps = instructions(DOCKER / "lerobot-server.Dockerfile")
    assert steps[0][0] == "FROM" and steps[0][1].startswith("pytorch/pytorch:2.7.1-cuda")
    by_keyword = dict(steps)
    assert "pip install -r requirements-lerobot.txt" in [arg for kw, arg in steps if kw == "RUN"]
    assert by_keyword["EXPOSE"] == "5000"
    cmd = json.loads(by_keyword["CMD"])
    assert (_server_args(cmd[3:]).host, _server_args(cmd[3:]).port) == ("0.0.0.0", 5000)
    pins = dict(
        line.split("==") for line in (REPO / "requirements-lerobot.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # The base image's torch, and the transformers line OpenVLA's file cannot have.
    assert pins["torch"] == "2.7.1" and pins["lerobot"] == "0.4.4"
    assert pins["transformers"].startswith("4.57")


def _server_args(argv):
    from manipulation_policy.policy_server import build_parser

    return build_parser().parse_args(argv)


# ------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_builds_from_existing_dockerfiles(compose):
    services = compose["services"]
    assert set(services) == {"policy_server", "robot", "lerobot_server"}
    for name, service in services.items():
        context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
        assert context == REPO, name
        assert (context / service["build"]["dockerfile"]).is_file(), name


def test_compose_server_has_a_gpu_and_a_valid_command(compose):
    server = compose["services"]["policy_server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    command = server["command"]
    assert command[:3] == ["python3", "-m", "manipulation_policy.policy_server"]
    args = _server_args(command[3:])
    assert (args.host, args.port, args.backend) == ("0.0.0.0", 5000, "openvla")
    assert any(port.endswith(f":{args.port}") for port in server["ports"])


def test_compose_lerobot_server_is_its_own_image_behind_a_profile(compose):
    server = compose["services"]["lerobot_server"]
    assert server["build"]["dockerfile"] == "docker/lerobot-server.Dockerfile"
    assert server["profiles"] == ["lerobot"]  # `up` alone starts the OpenVLA server only
    args = _server_args(server["command"][3:])
    assert (args.host, args.port, args.backend, args.model) == (
        "0.0.0.0", 5000, "lerobot", "/models/policy")
    declared = {name for option in lerobot_options.OPTIONS for name in option.env}
    passed = {entry for entry in server["environment"] if entry.startswith("LEROBOT_")}
    assert passed and passed <= declared
    assert server["ports"] == ["127.0.0.1:5001:5000"]


def test_compose_robot_starts_the_remote_node_against_the_server(compose):
    robot = compose["services"]["robot"]
    assert robot["network_mode"] == "host"
    assert robot["depends_on"]["policy_server"]["condition"] == "service_healthy"
    command = robot["command"]
    assert command[:4] == ["ros2", "launch", "manipulation_bringup", "core_launch.py"]
    arguments = dict(word.split(":=", 1) for word in command[4:])
    plan = plan_policy_node(arguments, default_params_file=PARAMS_FILE)
    assert plan.name == REMOTE_NODE
    assert plan.parameters["remote_url"] == "http://policy_server:5000"
    # On the host network the service name resolves only through extra_hosts.
    assert "policy_server:127.0.0.1" in robot["extra_hosts"]


# ------------------------------------------------- requirements, colcon.meta


def test_requirements_are_pinned_with_the_openvla_stack():
    lines = [
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    pins = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9.]*)", line)
        assert match, f"not pinned as name==version: {line}"
        pins[match.group(1).lower()] = match.group(2)
    assert {
        "torch": "2.2.0",
        "torchvision": "0.17.0",
        "transformers": "4.40.1",
        "tokenizers": "0.19.1",
        "timm": "0.9.10",
    }.items() <= pins.items()
    assert {"accelerate", "bitsandbytes", "peft", "fastapi", "uvicorn", "pydantic"} <= set(pins)
    assert {"pillow", "numpy", "requests"} <= set(pins)
    assert int(pins["pydantic"].split(".")[0]) >= 2
    assert "flash-attn" not in pins  # optional: built by hand with --no-build-isolation


def test_colcon_meta_names_real_packages_with_known_keys():
    meta = json.loads((REPO / "colcon.meta").read_text())
    packages = {path.parent.name for path in (REPO / "src").glob("*/package.xml")}
    assert set(meta) == {"names"}
    assert set(meta["names"]) <= packages
    for settings in meta["names"].values():
        assert set(settings) <= {"cmake-args", "ament-cmake-args", "catkin-cmake-args"}
        assert all(isinstance(arg, str) for args in settings.values() for arg in args)


# ------------------------------------------------------------------ linters


def _linter(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed here (.ci/requirements-dev.txt has it)")
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run(
        [_linter("hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_sees_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    result = subprocess.run(
        [_linter("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "DL3007" in result.stdout  # `latest` tag


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(
        {*DOCKER.glob("*.sh"), *(REPO / ".ci").glob("*.sh")}, key=str
    )
    assert scripts
    result = subprocess.run(
        [_linter("shellcheck"), *map(str, scripts)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
