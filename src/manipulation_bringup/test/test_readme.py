"""The README stays true to the code: its commands, parameters and contract examples."""

import json
import re
from pathlib import Path

from manipulation_bringup.launch_logic import LAUNCH_ARGUMENT_NAMES, NODE_PARAMETERS
from manipulation_policy.core.contract import (
    InferRequest,
    InferResponse,
    parse_request,
    parse_response,
)

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_every_node_parameter_is_in_a_parameter_table_with_its_default():
    for specs in NODE_PARAMETERS.values():
        for name, spec in specs.items():
            default = json.dumps(spec.default) if not isinstance(spec.default, str) else None
            shown = f"`{spec.default}`" if default is None else f"`{default}`"
            if spec.default == "":
                shown = '`""`'
            rows = re.findall(rf"^\| `{name}` \| ([^|]+) \|", README, re.MULTILINE)
            assert shown in [cell.strip() for cell in rows], f"{name} = {shown} not in a table"


def test_every_launch_argument_is_documented():
    for name in LAUNCH_ARGUMENT_NAMES:
        assert f"`{name}`" in README, name


def test_the_minimal_curl_request_is_valid():
    bodies = re.findall(r"-d '(\{.*?\})'", README)
    minimal = json.loads(bodies[0])
    assert minimal["joint_states"] == {"name": [], "position": [], "velocity": [], "effort": []}
    assert "image" not in minimal
    parse_request(minimal)


def test_the_example_response_has_every_response_field():
    block = re.search(r"```json\n(\{\n.*?\n\})\n```", README, re.DOTALL).group(1)
    example = json.loads(block)
    parse_response(example)
    assert set(example) == set(InferResponse.model_fields)


def test_every_contract_field_is_in_a_contract_table():
    rows = [line for line in README.splitlines() if line.startswith("| `")]
    for model in (InferRequest, InferResponse):
        for name in model.model_fields:
            assert any(f"`{name}`" in row or f"`{name}." in row for row in rows), name
