"""The LeRobot backend on checkpoints built here with LeRobot's own classes
(lerobot_checkpoints: ACT and Diffusion, two cameras, a state of 6, an action of 6),
loaded as a user's training run left them. Runs in the lerobot lane (make
test-lerobot); the main lane skips it."""

from __future__ import annotations

import json
import logging

import lerobot_checkpoints as lc
import numpy as np
import pytest

lc.require_lerobot()

import torch  # noqa: E402
from lerobot.async_inference.helpers import resize_robot_observation_image  # noqa: E402

from manipulation_policy.backends import create_backend, declared_options  # noqa: E402
from manipulation_policy.backends.lerobot import LeRobotBackend  # noqa: E402
from manipulation_policy.backends.model_options import DEVICE, DTYPE, MODEL  # noqa: E402
from manipulation_policy.backends.openvla_options import OPTIONS as OPENVLA  # noqa: E402
from manipulation_policy.core.errors import BackendStartupError, InputError  # noqa: E402
from manipulation_policy.core.policy_types import Observation, PolicyInputs  # noqa: E402

JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")


def observation(seed: int = 0, robot_id: str = "arm", instruction: str = "pick the cube",
                **changes) -> Observation:
    rng = np.random.default_rng(seed)
    fields = {
        "images": {name: rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
                   for name in lc.CAMERAS},
        "state": tuple(float(v) for v in rng.normal(0.1, 0.5, lc.STATE_LENGTH)),
        "instruction": instruction,
        "robot_id": robot_id,
    }
    fields.update(changes)
    return Observation(**fields)


@pytest.fixture(scope="module")
def act(act_checkpoint):
    backend = create_backend("lerobot", model=str(act_checkpoint), action_layout=lc.ARM_LAYOUT,
                             gripper_closed=0.0, gripper_open=0.6)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def diffusion(diffusion_checkpoint):
    backend = create_backend("lerobot", model=str(diffusion_checkpoint),
                             action_layout=lc.ARM_LAYOUT, fps="30")
    yield backend
    backend.close()


def joint_matrix(chunk) -> np.ndarray:
    return np.array([a.joint_positions + (a.gripper_command,) for a in chunk.actions])


def test_model_device_dtype_are_openvlas_very_options():
    lerobot = {o.name: o for o in declared_options("lerobot")}
    openvla = {o.name: o for o in OPENVLA}
    for option in (MODEL, DEVICE, DTYPE):
        assert lerobot[option.name] is option is openvla[option.name]


def test_act_answers_its_chunk_with_the_checkpoints_fps_and_the_layout(act):
    assert act.inputs() == PolicyInputs(lc.CAMERAS, lc.STATE_LENGTH, lc.ACTION_LENGTH)
    chunk = act.predict(observation())
    assert len(chunk.actions) == lc.ACT_CHUNK
    assert chunk.action_period_sec == pytest.approx(1 / lc.ACT_FPS)
    first = chunk.actions[0]
    assert first.joint_names == JOINTS and len(first.joint_positions) == 5
    assert first.joint_deltas is None and first.eef_target is None
    assert all(0.0 <= a.gripper_command <= 1.0 for a in chunk.actions)
    assert first.confidence == 1.0
    info = act.describe()
    assert (info["policy_type"], info["fps_source"], info["device"]) == ("act", "checkpoint",
                                                                         "cpu")
    # Unnormalized with the checkpoint's statistics (actions around 0.3 +- 0.2):
    # not the normalized network output around 0.
    positions = joint_matrix(chunk)[:, :5]
    assert np.all(np.abs(positions - 0.3) < 0.2 * 8)
    # ACT answers the same chunk for the same observation, and another for another.
    assert np.array_equal(joint_matrix(act.predict(observation())), joint_matrix(chunk))
    assert not np.allclose(joint_matrix(act.predict(observation(seed=5))), joint_matrix(chunk))


def test_the_robots_state_and_each_camera_reach_the_policy(act):
    base = joint_matrix(act.predict(observation()))
    moved_state = observation(state=(2.0,) * lc.STATE_LENGTH)
    assert not np.allclose(joint_matrix(act.predict(moved_state)), base)
    for name in lc.CAMERAS:
        images = dict(observation().images)
        images[name] = np.zeros_like(images[name])
        assert not np.allclose(joint_matrix(act.predict(observation(images=images))), base)


def test_act_batch_is_each_alone(act):
    observations = [observation(seed) for seed in (1, 2, 3)]
    alone = [joint_matrix(act.predict(o)) for o in observations]
    assert act.batches_observations
    together = act.predict_batch(observations)
    for single, batched in zip(alone, together, strict=True):
        np.testing.assert_allclose(joint_matrix(batched), single, atol=1e-5)


def test_a_bad_observation_in_a_batch_is_its_own_answer(act):
    bad = observation(seed=2, state=(0.0,) * 4)
    answers = act.predict_batch([observation(seed=1), bad])
    assert isinstance(answers[1], InputError) and answers[1].field == "state"
    np.testing.assert_allclose(joint_matrix(answers[0]),
                               joint_matrix(act.predict(observation(seed=1))), atol=1e-5)


@pytest.mark.parametrize("changes, field", [
    ({"images": {"wrist": np.zeros((96, 96, 3), np.uint8)}}, "images.front"),
    ({"state": None}, "state"),
    ({"state": (0.0,) * 7}, "state"),
    ({"images": {"wrist": np.zeros((96, 96, 3), np.uint8),
                 "front": np.zeros((96, 96, 3), np.float32)}}, "images.front"),
    ({"images": {"wrist": np.zeros((96, 96, 4), np.uint8),
                 "front": np.zeros((96, 96, 3), np.uint8)}}, "images.wrist"),
    ({"images": {"wrist": np.zeros((96, 96, 3), np.uint8),
                 "front": np.zeros((96, 96), np.uint8)}}, "images.front"),
])
def test_an_observation_that_does_not_fit_names_the_field(act, changes, field):
    with pytest.raises(InputError) as raised:
        act.predict(observation(**changes))
    assert raised.value.field == field


def lerobot_resized(rgb: np.ndarray) -> np.ndarray:
    """The frame resized to the checkpoint's size by LeRobot's own async-inference
    helper, back as HxWx3 uint8."""
    shape = (3, lc.IMAGE_SIZE, lc.IMAGE_SIZE)
    return resize_robot_observation_image(torch.tensor(rgb), shape).permute(1, 2, 0).numpy()


def test_a_frame_of_another_size_is_resized_as_lerobots_async_inference_does(act, caplog):
    rng = np.random.default_rng(11)
    big = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    images = {"wrist": big, "front": small}
    with caplog.at_level(logging.INFO, logger="manipulation_policy.backends.lerobot"):
        answered = joint_matrix(act.predict(observation(images=images)))
        act.predict(observation(images=images))
    resized = {name: lerobot_resized(rgb) for name, rgb in images.items()}
    assert resized["wrist"].shape == (lc.IMAGE_SIZE, lc.IMAGE_SIZE, 3)
    np.testing.assert_allclose(answered, joint_matrix(act.predict(observation(images=resized))),
                               atol=1e-6)
    # Another resize (Pillow's antialiased bilinear, as the remote node's) answers
    # differently: the comparison above sees the interpolation.
    from PIL import Image
    pillow = {name: np.asarray(Image.fromarray(rgb).resize((lc.IMAGE_SIZE,) * 2,
                                                          Image.BILINEAR))
              for name, rgb in images.items()}
    assert not np.allclose(answered, joint_matrix(act.predict(observation(images=pillow))),
                           atol=1e-6)
    lines = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert sorted(lines) == sorted([
        "camera wrist: frames of 160x120 are resized to the checkpoint's 96x96 "
        "(send that size to avoid a second, lossy resize)",
        "camera front: frames of 64x48 are resized to the checkpoint's 96x96 "
        "(send that size to avoid a second, lossy resize)",
    ])


def test_diffusion_answers_n_action_steps_at_the_fps_option(diffusion):
    chunk = diffusion.predict(observation())
    assert len(chunk.actions) == lc.DIFFUSION_ACTIONS
    assert chunk.action_period_sec == pytest.approx(1 / 30)
    assert chunk.actions[0].joint_names == JOINTS
    info = diffusion.describe()
    assert info["history_per_robot"] and info["n_obs_steps"] == 2
    assert not diffusion.batches_observations


def _history(backend, robot: str):
    queues = backend._histories[robot].queues
    return [frame.clone() for frame in queues["observation.state"]]


def test_diffusion_keeps_one_history_per_robot(diffusion):
    a1, b1, a2 = observation(1, "robot_a"), observation(2, "robot_b"), observation(3, "robot_a")
    diffusion.predict(a1)
    diffusion.predict(b1)
    diffusion.predict(a2)
    history_a, history_b = _history(diffusion, "robot_a"), _history(diffusion, "robot_b")
    # Each queue holds that robot's own normalized states, oldest first; b's never in a's.
    assert not any(np.allclose(frame.numpy(), history_b[0].numpy()) for frame in history_a)
    assert not np.allclose(history_a[0].numpy(), history_a[1].numpy())  # a1 then a2
    assert np.allclose(history_b[0].numpy(), history_b[1].numpy())  # b1, padded as LeRobot does
    # A new instruction starts that robot's history again (a new episode).
    diffusion.predict(observation(4, "robot_a", instruction="open the drawer"))
    restarted = _history(diffusion, "robot_a")
    assert np.allclose(restarted[0].numpy(), restarted[1].numpy())


def test_diffusion_batch_answers_each_robot_from_its_own_history(diffusion):
    answers = diffusion.predict_batch([observation(1, "r1"), observation(2, "r2")])
    assert [len(a.actions) for a in answers] == [lc.DIFFUSION_ACTIONS] * 2
    assert set(diffusion._histories) >= {"r1", "r2"}


@pytest.fixture(scope="module")
def seeded(diffusion_checkpoint):
    backend = create_backend("lerobot", model=str(diffusion_checkpoint),
                             action_layout=lc.ARM_LAYOUT, fps="30", seed="7")
    yield backend
    backend.close()


def test_seeded_diffusion_gives_one_chunk_per_observation_whatever_others_ask(seeded):
    assert seeded.describe()["seed"] == 7 and not seeded.batches_observations
    global_state = torch.get_rng_state()
    first = joint_matrix(seeded.predict(observation(1, "s1")))
    seeded.predict(observation(2, "s2"))  # another robot asks in between
    again = joint_matrix(seeded.predict(observation(1, "s3")))  # a fresh history, as s1's
    np.testing.assert_array_equal(first, again)
    # The same robot, the same frame again: its history holds that frame twice, as the
    # first call's padding did, so the same chunk.
    np.testing.assert_array_equal(joint_matrix(seeded.predict(observation(1, "s1"))), first)
    assert not np.allclose(joint_matrix(seeded.predict(observation(4, "s4"))), first)
    # Torch's global generator is left as it was: the seed perturbs nobody else.
    assert torch.equal(torch.get_rng_state(), global_state)
    [batched] = seeded.predict_batch([observation(1, "s5")])
    np.testing.assert_array_equal(joint_matrix(batched), first)


def test_unseeded_diffusion_samples_anew_each_call(diffusion):
    assert diffusion.describe()["seed"] is None
    one = joint_matrix(diffusion.predict(observation(1, "u1")))
    two = joint_matrix(diffusion.predict(observation(1, "u2")))
    assert one.shape == two.shape and not np.allclose(one, two)


@pytest.mark.parametrize("seed", ["-1", "1.5", "x", str(2**32), True])
def test_a_bad_seed_is_refused_at_start(diffusion_checkpoint, seed):
    message = start(diffusion_checkpoint, action_layout=lc.ARM_LAYOUT, fps="30", seed=seed)
    assert message.startswith("seed must be a whole number from 0 to 4294967295")


def start(checkpoint, **options) -> str:
    with pytest.raises(BackendStartupError) as raised:
        LeRobotBackend(model=str(checkpoint), **options)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_layout_of_the_wrong_length_is_refused_at_start(act_checkpoint):
    message = start(act_checkpoint, action_layout="joint_position:a,gripper")
    assert message == ("action_layout has 2 entries, but the checkpoint's action has 6 values")


def test_no_layout_and_a_bad_layout_are_refused_at_start(act_checkpoint):
    assert "action_layout is required: the checkpoint's action has 6 values" in start(
        act_checkpoint)
    assert "unknown kind 'wheel'" in start(act_checkpoint, action_layout="wheel:x," * 5 + "ignore")


def test_a_checkpoint_without_fps_needs_the_option(diffusion_checkpoint):
    message = start(diffusion_checkpoint, action_layout=lc.ARM_LAYOUT)
    assert message.startswith("fps: the checkpoint") and "--fps" in message


def test_gripper_values_that_do_not_differ_are_refused(act_checkpoint):
    message = start(act_checkpoint, action_layout=lc.ARM_LAYOUT, gripper_closed=0.5,
                    gripper_open=0.5)
    assert "gripper_closed and gripper_open are both 0.5" in message


def test_a_folder_that_is_no_checkpoint_and_the_openvla_default_are_refused(tmp_path,
                                                                            act_checkpoint):
    assert "is not a LeRobot pretrained policy" in start(tmp_path, action_layout=lc.ARM_LAYOUT)
    with pytest.raises(BackendStartupError, match="give the LeRobot checkpoint"):
        LeRobotBackend(action_layout=lc.ARM_LAYOUT)


def test_a_simulation_runs_fps_is_read_from_train_config(act_checkpoint):
    assert json.loads((act_checkpoint / "train_config.json").read_text())["env"]["fps"] == 50


def test_a_reduced_dtype_runs_under_autocast_close_to_float32(act, act_checkpoint):
    assert act.describe()["dtype"] == "float32" and not act.describe()["autocast"]
    bf16 = LeRobotBackend(model=str(act_checkpoint), action_layout=lc.ARM_LAYOUT,
                          gripper_closed=0.0, gripper_open=0.6, dtype="bf16", device="cpu")
    try:
        assert (bf16.describe()["dtype"], bf16.describe()["autocast"]) == ("bfloat16", True)
        reduced = joint_matrix(bf16.predict(observation()))
    finally:
        bf16.close()
    full = joint_matrix(act.predict(observation()))
    assert not np.array_equal(reduced, full)  # it did run in bfloat16
    np.testing.assert_allclose(reduced, full, atol=0.05)
