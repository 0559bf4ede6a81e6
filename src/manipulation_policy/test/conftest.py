"""Fixtures shared by manipulation_policy's tests.

pytest runs with ``--import-mode=importlib``, which puts no test folder on
sys.path; this one is added so tests can import their helper modules
(``tiny_openvla``, ...) by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TEST_DIR = Path(__file__).resolve().parent
if str(TEST_DIR) not in sys.path:
    sys.path.insert(0, str(TEST_DIR))

import lerobot_checkpoints  # noqa: E402
import tiny_openvla  # noqa: E402


@pytest.fixture(scope="session")
def act_checkpoint(tmp_path_factory) -> Path:
    """A small ACT checkpoint saved as a training run saves it (lerobot_checkpoints);
    skips in the main lane, fails in the lerobot lane, without lerobot."""
    lerobot_checkpoints.require_lerobot()
    return lerobot_checkpoints.build_act(tmp_path_factory.mktemp("act") / "pretrained_model")


@pytest.fixture(scope="session")
def diffusion_checkpoint(tmp_path_factory) -> Path:
    """A small Diffusion checkpoint of a real-robot run (no fps of its own)."""
    lerobot_checkpoints.require_lerobot()
    return lerobot_checkpoints.build_diffusion(
        tmp_path_factory.mktemp("diffusion") / "pretrained_model"
    )


@pytest.fixture(scope="session")
def tiny_openvla_dir(tmp_path_factory) -> Path:
    """A tiny OpenVLA-interface checkpoint (remote code, safetensors, tokenizer,
    dataset_statistics.json with the single key ``tiny_openvla.DEFAULT_UNNORM_KEY``).
    Load it like a real one: OpenVLABackend(model=str(tiny_openvla_dir))."""
    return tiny_openvla.build_tiny_openvla(
        tmp_path_factory.mktemp("tiny_openvla"),
        dataset_statistics=tiny_openvla.norm_stats_for(tiny_openvla.DEFAULT_UNNORM_KEY),
    )


@pytest.fixture(scope="session")
def tiny_openvla_image_blind_dir(tmp_path_factory) -> Path:
    """The same tiny checkpoint, but its model drops the image (as OpenVLA does
    under transformers >= 4.50), so it answers one action for every frame."""
    return tiny_openvla.build_tiny_openvla(
        tmp_path_factory.mktemp("tiny_openvla_blind"),
        dataset_statistics=tiny_openvla.norm_stats_for(tiny_openvla.DEFAULT_UNNORM_KEY),
        ignores_image=True,
    )
