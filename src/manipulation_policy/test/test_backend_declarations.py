"""A backend declares its options once (OPTIONS); the rest is derived from that.

A plugin backend (``module:Class``) written here, in a module nothing else
knows, declares a new option and gets a server flag (and its environment
variable), a node parameter (range shown by ``ros2 param describe``) and a real
node handing the value to the backend, with nothing else edited. Its launch
argument: manipulation_bringup's test_option_agreement.py. Also: core/ and the
robot's nodes import no model's module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from manipulation_policy import backends, policy_server
from manipulation_policy.core.options import NumberRange
from manipulation_policy.robot import node_parameters

PACKAGE = Path(__file__).resolve().parents[1] / "manipulation_policy"

PLUGIN_SOURCE = textwrap.dedent('''
    from manipulation_policy.backends.stub import StubBackend
    from manipulation_policy.core.options import NumberRange, Option

    class GripperForceBackend(StubBackend):
        name = "gripper_force"
        OPTIONS = (
            Option("grip_force", float, 5.0, "Grip force, N.",
                   NumberRange(0.0, 40.0, low_open=True), env=("GRIP_FORCE",),
                   launch_argument=True),
        )
        made_with = []

        def __init__(self, grip_force=None, **others):
            super().__init__(**others)
            type(self).made_with.append(grip_force)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The spec of a plugin backend declaring the option grip_force."""
    module = f"grip_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:GripperForceBackend"


def test_a_plugins_option_is_a_server_flag_and_variable(plugin):
    argv = ["--backend", plugin, "--grip-force", "12.5"]
    args = policy_server.build_parser(policy_server.backend_flag(argv)).parse_args(argv)
    assert policy_server.backend_arguments(args, {}) == {"grip_force": 12.5}
    args = policy_server.build_parser(plugin).parse_args(["--backend", plugin])
    assert policy_server.backend_arguments(args, {"GRIP_FORCE": "3"}) == {"grip_force": 3.0}
    # Refused by the declaration's check, in the server's one-line form.
    with pytest.raises(SystemExit):
        policy_server.build_parser(plugin).parse_args(["--grip-force", "41"])
    with pytest.raises(policy_server.StartupError, match="GRIP_FORCE"):
        policy_server.backend_arguments(args, {"GRIP_FORCE": "0"})
    # Without the plugin, no such flag.
    with pytest.raises(SystemExit):
        policy_server.build_parser().parse_args(["--grip-force", "1"])
    # The chosen backend reads only its own variables: the plugin's are not OpenVLA's.
    openvla = policy_server.build_parser().parse_args(["--backend", "openvla"])
    assert policy_server.backend_arguments(openvla, {"GRIP_FORCE": "3"}) == {}


def test_a_plugins_option_is_a_node_parameter(plugin):
    specs = node_parameters.specs_by_name(node_parameters.policy_node_parameters(plugin))
    spec = specs["grip_force"]
    assert spec.default == 5.0 and spec.live is False
    assert spec.number_range == NumberRange(0.0, 40.0, low_open=True)
    assert spec.problem(41.0) is not None and spec.problem(7) is None
    assert "grip_force" not in node_parameters.specs_by_name(node_parameters.POLICY_NODE_PARAMETERS)
    values = {name: s.default for name, s in specs.items()}
    assert node_parameters.parameter_backend_arguments(
        {**values, "backend": plugin, "grip_force": 9.0}
    ) == {"grip_force": 9.0}
    descriptor = pytest.importorskip(
        "manipulation_policy.nodes.parameter_declarations").descriptor_for(spec)
    assert descriptor.floating_point_range[0].to_value == 40.0 and descriptor.read_only


def test_a_plugin_without_a_declaration_gets_the_registered_options(tmp_path, monkeypatch):
    (tmp_path / "undeclared_plugin.py").write_text(
        "class Plain:\n    def __init__(self, **options):\n        self.options = options\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert backends.declared_options("undeclared_plugin:Plain") == ()
    values = {s.name: s.default for s in node_parameters.POLICY_NODE_PARAMETERS}
    given = node_parameters.parameter_backend_arguments(
        {**values, "backend": "undeclared_plugin:Plain"})
    assert set(given) == {o.name for o in backends.registered_options()}


def test_the_node_declares_a_plugins_option_and_hands_it_over(plugin):
    node_harness = pytest.importorskip("node_harness")
    from manipulation_policy.nodes.policy_node import PolicyNode

    with node_harness.Rig() as rig:
        node = rig.add(PolicyNode(**rig.node_kwargs(backend=plugin, grip_force=2)))
        assert node.get_parameter("grip_force").value == 2.0  # an int given, a double kept
        assert type(node.backend).made_with == [2.0]
        assert node.parameter_values()["grip_force"] == 2.0
        # Read at start, like every option.
        result = node.set_parameters([node_harness.Parameter(
            "grip_force", node_harness.Parameter.Type.DOUBLE, 3.0)])[0]
        assert not result.successful and "read-only" in result.reason


# ---------------------------------------------------------------- import boundaries


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("folder", ["core", "nodes"])
def test_core_and_the_nodes_import_no_models_module(folder):
    for path in sorted((PACKAGE / folder).glob("*.py")):
        model_imports = sorted(
            m for m in _imported_modules(path)
            if m.startswith("manipulation_policy.backends.openvla")
        )
        assert model_imports == [], path.name


def test_the_robots_client_loads_no_models_module():
    code = (
        "import sys\n"
        "import manipulation_policy.nodes.remote_policy_node\n"
        "import manipulation_policy.robot.node_parameters\n"
        "print(sorted(m for m in sys.modules if m.startswith('manipulation_policy.backends.')))\n"
    )
    pytest.importorskip("rclpy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
