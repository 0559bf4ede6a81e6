"""Small LeRobot checkpoints built here, as a user's training run writes them.

LeRobot's own config classes (ACTConfig, DiffusionConfig) with random weights and
no download (no pretrained backbone), saved the way ``lerobot-train`` saves a
``pretrained_model`` folder: the policy's ``save_pretrained`` (config.json,
model.safetensors) and its pre- and post-processors, built by
``make_pre_post_processors`` with dataset statistics and saved beside it (their
JSON and the normalizer's stats). Two cameras, ``wrist`` and ``front`` (96x96),
a state of 6 and an action of 6, as a small follower arm.

The ACT checkpoint is written as a simulation run (its train_config.json names
the environment's fps, 50); the Diffusion one as a real-robot run (no fps: the
backend's ``fps`` option must say it).

``LEROBOT_REQUIRED`` (set by ``make test-lerobot``) turns a missing lerobot into a
failure; without it, a test that needs lerobot skips in the main lane.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CAMERAS = ("wrist", "front")
IMAGE_SIZE = 96
STATE_LENGTH = 6
ACTION_LENGTH = 6
ACT_CHUNK = 10
ACT_FPS = 50.0
DIFFUSION_ACTIONS = 8
ARM_LAYOUT = (
    "joint_position:shoulder_pan,joint_position:shoulder_lift,joint_position:elbow_flex,"
    "joint_position:wrist_flex,joint_position:wrist_roll,gripper"
)
LANE_VARIABLE = "LEROBOT_REQUIRED"
LANE_REASON = "needs lerobot: runs in the lerobot lane: make test-lerobot"


def require_lerobot() -> None:
    """Skip (main lane) or fail (lerobot lane) when lerobot cannot be imported."""
    if os.environ.get(LANE_VARIABLE):
        import lerobot  # noqa: F401  (the lerobot lane: an ImportError fails the test)
    else:
        pytest.importorskip("lerobot", reason=LANE_REASON)


def _features():
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {
        f"observation.images.{name}": PolicyFeature(FeatureType.VISUAL, (3, IMAGE_SIZE, IMAGE_SIZE))
        for name in CAMERAS
    }
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (STATE_LENGTH,))
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (ACTION_LENGTH,))}
    return inputs, outputs


def _stats():
    """Dataset statistics as a LeRobotDataset's meta has them (every kind, so any
    normalization mode finds its own)."""
    import torch

    def stat(shape, center, spread):
        return {
            "mean": torch.full(shape, center), "std": torch.full(shape, spread),
            "min": torch.full(shape, center - 2 * spread),
            "max": torch.full(shape, center + 2 * spread),
        }

    stats = {f"observation.images.{name}": stat((3, 1, 1), 0.45, 0.25) for name in CAMERAS}
    stats["observation.state"] = stat((STATE_LENGTH,), 0.1, 0.5)
    # An arm whose joints move around 0.3 rad, its gripper 0..100 in the dataset's units.
    stats["action"] = stat((ACTION_LENGTH,), 0.3, 0.2)
    return stats


def save_checkpoint(config, folder: Path, fps: float | None) -> Path:
    import torch
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    torch.manual_seed(0)
    policy = get_policy_class(config.type)(config)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=_stats())
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    if fps is not None:
        # What the backend reads of a training run's train_config.json: its env's fps.
        (folder / "train_config.json").write_text(json.dumps({"env": {"fps": fps}}))
    return folder


def build_act(folder: Path) -> Path:
    from lerobot.policies.act.configuration_act import ACTConfig

    inputs, outputs = _features()
    config = ACTConfig(
        input_features=inputs, output_features=outputs, device="cpu",
        chunk_size=ACT_CHUNK, n_action_steps=ACT_CHUNK, pretrained_backbone_weights=None,
        dim_model=64, n_heads=2, dim_feedforward=128, n_encoder_layers=1,
        n_decoder_layers=1, n_vae_encoder_layers=1, latent_dim=8,
    )
    return save_checkpoint(config, folder, ACT_FPS)


def build_diffusion(folder: Path) -> Path:
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    inputs, outputs = _features()
    config = DiffusionConfig(
        input_features=inputs, output_features=outputs, device="cpu",
        n_obs_steps=2, horizon=16, n_action_steps=DIFFUSION_ACTIONS, crop_shape=(84, 84),
        down_dims=(32, 64), diffusion_step_embed_dim=32, spatial_softmax_num_keypoints=8,
        num_inference_steps=4, n_groups=4,
    )
    return save_checkpoint(config, folder, None)
