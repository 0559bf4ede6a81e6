"""LeRobot policies (ACT, Diffusion, and any other LeRobot policy type), loaded with
LeRobot's own classes.

``--model DIR`` is a pretrained-policy folder as a training run saves it
(``.../checkpoints/last/pretrained_model``: config.json, model.safetensors, the
processors' JSON and the dataset statistics), or a Hub id LeRobot itself can load.
Start-up:

- ``PreTrainedConfig.from_pretrained`` reads the config; ``get_policy_class(type)``
  and its ``from_pretrained`` load the weights; ``make_pre_post_processors(cfg,
  pretrained_path=DIR)`` loads the checkpoint's own pre- and post-processors with
  its normalization statistics (the device overridden to the chosen one).
- The checkpoint's features are checked against the options: the action length
  against ``action_layout``; the period of the chunk is 1 / fps, fps from the
  training run's environment (train_config.json) or the ``fps`` option, else a
  refusal. Every refusal is a BackendStartupError of one line.

Each observation becomes LeRobot's batch: ``observation.images.<name>`` (float CHW in
[0, 1], batch dimension first, the size the checkpoint declares), ``observation.state``
and ``task`` (the instruction), then preprocessor -> ``predict_action_chunk`` ->
postprocessor -> the first ``n_action_steps`` actions (what LeRobot's own
``select_action`` executes of a chunk) -> ``core.action_layout`` -> ActionChunk.
A frame of another size than the checkpoint's is resized to it as LeRobot's async
inference does (``resize_robot_observation_image``: the uint8 CHW tensor, bilinear,
align_corners=False, before the conversion to float), logged once per camera and size.

Policies with an observation history (Diffusion: ``n_obs_steps`` frames in its
``_queues``, filled by LeRobot's ``populate_queues``) keep one history per
``Observation.robot_id``, so two robots never mix. A robot's history restarts (as
LeRobot's ``policy.reset()`` at an episode's start) when its instruction changes or
when HISTORY_GAP_SEC passed since its last observation. ``predict_batch`` stacks
observations into one forward pass for policies without a history (ACT); the others
are predicted one after the other.

``device`` resolves as for OpenVLA; ``dtype`` "auto" is float32 (LeRobot's own
precision: its policies make float32 tensors of their own), bfloat16 / float16 run
``predict_action_chunk`` under ``torch.autocast`` with the weights in float32, as
LeRobot's ``use_amp`` does. Diffusion samples its noise from torch's global generator:
two calls on one observation give two (equally valid) chunks, unless ``seed`` is set.
With a seed every prediction starts from generators seeded with it: the initial noise
goes in through LeRobot's ``predict_action_chunk(batch, noise=...)`` where the policy
takes one, and the noise its scheduler draws at each denoising step (DDPM; LeRobot
passes no generator there) comes from torch's global generator, forked and seeded for
the call (``torch.random.fork_rng``) and restored after, so a chunk depends on the
observation (and that robot's history) only, and no robot's request shifts another's.
Seeded sampling policies predict one observation at a time (a batch would draw
another noise than each alone).

This module imports torch and lerobot; the registry imports it only when the
"lerobot" backend is chosen.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
from lerobot.policies.utils import populate_queues
from lerobot.utils.constants import ACTION, OBS_IMAGES

from manipulation_policy.backends import lerobot_options
from manipulation_policy.backends.torch_device import resolve_device, resolve_dtype
from manipulation_policy.core.action_layout import ActionLayout, parse_action_layout, to_action
from manipulation_policy.core.errors import BackendStartupError, InputError
from manipulation_policy.core.options import resolve
from manipulation_policy.core.policy_inputs import check_observation, named_images
from manipulation_policy.core.policy_types import (
    MAX_CHUNK_LENGTH,
    ActionChunk,
    Observation,
    PolicyInputs,
)

logger = logging.getLogger(__name__)

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
TRAIN_CONFIG_FILE = "train_config.json"
# A robot silent this long starts a new history (a new episode, as LeRobot's reset).
HISTORY_GAP_SEC = 5.0
# At most this many robots' histories are kept; the least recently seen goes first.
MAX_HISTORIES = 64
OPENVLA_DEFAULT_MODEL = lerobot_options.OPTIONS_BY_NAME["model"].default


def resize_like_lerobot(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A uint8 3xHxW frame resized to height x width as LeRobot's async inference
    (``helpers.resize_robot_observation_image``) resizes a robot's camera to the
    policy's image feature: bilinear, align_corners=False, on the uint8 tensor."""
    return torch.nn.functional.interpolate(
        chw[None], size=(height, width), mode="bilinear", align_corners=False
    )[0]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def checkpoint_fps(model: str) -> Optional[float]:
    """The fps of the training run's environment, where the checkpoint folder has a
    train_config.json that names one (a simulation run); None otherwise."""
    path = Path(model) / TRAIN_CONFIG_FILE
    try:
        env = json.loads(path.read_text()).get("env") or {}
    except (OSError, ValueError, AttributeError):
        return None
    fps = env.get("fps") if isinstance(env, dict) else None
    if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0:
        return float(fps)
    return None


class _History:
    """One robot's observation history (a copy of the policy's ``_queues``)."""

    def __init__(self, queues: dict, instruction: str, now: float):
        self.queues = queues
        self.instruction = instruction
        self.seen = now


class LeRobotBackend:
    name = "lerobot"
    OPTIONS = lerobot_options.OPTIONS

    def __init__(self, **options: Any):
        try:
            chosen = resolve(self.OPTIONS, options)
        except ValueError as exc:
            raise BackendStartupError(str(exc)) from None
        model = chosen["model"]
        if model == OPENVLA_DEFAULT_MODEL:
            raise BackendStartupError(
                "model: give the LeRobot checkpoint, --model DIR (a pretrained_model folder "
                "of a training run) or a LeRobot Hub id"
            )
        self.model_id = model
        self.device = resolve_device(chosen["device"], torch.cuda.is_available())
        # LeRobot runs its policies in float32 (their code makes float32 tensors of its
        # own) and reduced precision under autocast (its use_amp): "auto" is float32,
        # bfloat16 / float16 run the policy under torch.autocast, weights in float32.
        requested = chosen["dtype"]
        self.dtype = (
            torch.float32 if str(requested).strip().lower() == "auto"
            else resolve_dtype(requested, self.device, False)
        )
        self.config = self._load_config(model)
        self._image_keys = tuple(self.config.image_features)
        self.inputs_required = self._inputs_of(self.config)
        self.layout = self._layout(chosen["action_layout"], self.inputs_required.action_length)
        self.gripper_closed = chosen["gripper_closed"]
        self.gripper_open = chosen["gripper_open"]
        if self.gripper_closed == self.gripper_open:
            raise BackendStartupError(
                f"gripper_closed and gripper_open are both {self.gripper_closed:g}: "
                "they must differ (closed maps to 0.0, open to 1.0)"
            )
        self.fps, self.fps_source = self._fps(model, chosen["fps"])
        self.action_period_sec = 1.0 / self.fps
        self.n_action_steps = min(
            int(getattr(self.config, "n_action_steps", 1) or 1), MAX_CHUNK_LENGTH
        )
        self.seed = None if chosen["seed"] is None else int(chosen["seed"])
        self._lock = threading.Lock()
        self._resizes_logged: set[tuple[str, int, int]] = set()
        self._histories: collections.OrderedDict[str, _History] = collections.OrderedDict()
        self._load_policy(model)
        self.has_history = getattr(self.config, "n_obs_steps", 1) > 1 and isinstance(
            getattr(self._policy, "_queues", None), dict
        )
        self._takes_noise = "noise" in inspect.signature(
            self._policy.predict_action_chunk).parameters
        # Diffusion's initial noise is (batch, horizon, action length).
        self._noise_shape = (
            (int(self.config.horizon), self.inputs_required.action_length)
            if self._takes_noise and isinstance(getattr(self.config, "horizon", None), int)
            else None
        )
        self._one_at_a_time = self.has_history or (self.seed is not None and self._takes_noise)

    # ------------------------------------------------------------------ start-up

    def _load_config(self, model: str) -> PreTrainedConfig:
        try:
            config = PreTrainedConfig.from_pretrained(model)
        except Exception as exc:  # LeRobot's and the Hub's errors are many kinds
            raise BackendStartupError(
                f"model {model!r} is not a LeRobot pretrained policy (config.json): "
                f"{_one_line(exc)}"
            ) from None
        config.device = self.device
        return config

    @staticmethod
    def _inputs_of(config: PreTrainedConfig) -> PolicyInputs:
        names = []
        for key in config.image_features:
            if not key.startswith(IMAGE_PREFIX):
                raise BackendStartupError(
                    f"the checkpoint's image feature {key!r} is not observation.images.<name>"
                )
            names.append(key[len(IMAGE_PREFIX):])
        if config.env_state_feature is not None:
            raise BackendStartupError(
                "the checkpoint reads observation.environment_state, which a robot does not "
                "send; serve a policy trained on cameras and the robot's state"
            )
        state = config.robot_state_feature
        action = config.action_feature
        if action is None or len(action.shape) != 1:
            raise BackendStartupError("the checkpoint declares no 1-D action feature")
        return PolicyInputs(
            tuple(names),
            int(state.shape[0]) if state is not None else None,
            int(action.shape[0]),
        )

    @staticmethod
    def _layout(text: Optional[str], action_length: int) -> ActionLayout:
        if text is None:
            raise BackendStartupError(
                f"action_layout is required: the checkpoint's action has {action_length} "
                "values; say what each is, e.g. joint_position:NAME,...,gripper"
            )
        try:
            layout = parse_action_layout(text)
        except ValueError as exc:
            raise BackendStartupError(f"action_layout {exc}") from None
        if len(layout) != action_length:
            raise BackendStartupError(
                f"action_layout has {len(layout)} entries, but the checkpoint's action has "
                f"{action_length} values"
            )
        return layout

    @staticmethod
    def _fps(model: str, option: Optional[float]) -> tuple[float, str]:
        if option:
            return float(option), "option"
        found = checkpoint_fps(model)
        if found is None:
            raise BackendStartupError(
                f"fps: the checkpoint {model!r} does not say its fps (no environment in "
                f"{TRAIN_CONFIG_FILE}); give the dataset's fps with --fps"
            )
        return found, "checkpoint"

    def _load_policy(self, model: str) -> None:
        try:
            policy_class = get_policy_class(self.config.type)
            policy = policy_class.from_pretrained(model, config=self.config)
            policy.to(self.device)
            policy.eval()
            overrides = {"device_processor": {"device": self.device}}
            pre, post = make_pre_post_processors(
                self.config, pretrained_path=model, preprocessor_overrides=overrides
            )
        except BackendStartupError:
            raise
        except Exception as exc:
            raise BackendStartupError(
                f"model {model!r}: LeRobot could not load the {self.config.type} policy or "
                f"its processors: {_one_line(exc)}"
            ) from None
        self._policy, self._preprocessor, self._postprocessor = policy, pre, post

    # ------------------------------------------------------------------ serving

    def inputs(self) -> PolicyInputs:
        return self.inputs_required

    @property
    def batches_observations(self) -> bool:
        return not self._one_at_a_time

    def _image_tensor(self, name: str, image: Any) -> torch.Tensor:
        key = IMAGE_PREFIX + name
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise InputError(f"images.{name}", "must be an HxWx3 uint8 RGB image")
        _, height, width = tuple(self.config.image_features[key].shape)
        chw = torch.tensor(array).permute(2, 0, 1)
        if chw.shape[1:] != (height, width):
            self._log_resize(name, array.shape[1], array.shape[0], width, height)
            chw = resize_like_lerobot(chw, height, width)
        return chw.float() / 255.0

    def _log_resize(self, name: str, width: int, height: int, to_width: int,
                    to_height: int) -> None:
        seen = (name, width, height)
        if seen not in self._resizes_logged:
            self._resizes_logged.add(seen)
            logger.info(
                "camera %s: frames of %dx%d are resized to the checkpoint's %dx%d "
                "(send that size to avoid a second, lossy resize)",
                name, width, height, to_width, to_height,
            )

    def _frame(self, observation: Observation) -> dict[str, Any]:
        """One observation as LeRobot's batch of one (before the preprocessor)."""
        required = self.inputs_required
        check_observation(required, observation)
        frame: dict[str, Any] = {}
        for name, image in named_images(required, observation).items():
            frame[IMAGE_PREFIX + name] = self._image_tensor(name, image)[None]
        if required.state_length is not None:
            frame[STATE_KEY] = torch.tensor([observation.state], dtype=torch.float32)
        frame["task"] = [observation.instruction]
        return frame

    def _chunk(self, actions: np.ndarray, observation: Observation) -> ActionChunk:
        return ActionChunk(
            tuple(
                to_action(
                    self.layout, row, self.gripper_closed, self.gripper_open,
                    observation.reference_frame,
                )
                for row in actions
            ),
            self.action_period_sec,
        )

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """torch's global generators (CPU and this CUDA device) seeded for one call and
        restored after; nothing without a seed."""
        if self.seed is None:
            yield
            return
        device = torch.device(self.device)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(self.seed)
            if cuda:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(self.seed)
            yield

    def _noise(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``noise=`` for a seeded policy that takes it: each row drawn as if alone."""
        if self.seed is None or self._noise_shape is None:
            return {}
        generator = torch.Generator(self.device)
        rows = []
        for _ in range(batch_size):
            generator.manual_seed(self.seed)
            rows.append(torch.randn((1, *self._noise_shape), generator=generator,
                                    device=self.device, dtype=torch.float32))
        return {"noise": torch.cat(rows)}

    def _raw_actions(self, batch: dict[str, Any]) -> np.ndarray:
        """The (B, T, D) actions of a preprocessed batch, on the CPU as float64."""
        batch_size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        with self._seeded(), torch.autocast(torch.device(self.device).type, dtype=self.dtype,
                                            enabled=self.dtype != torch.float32):
            actions = self._policy.predict_action_chunk(batch, **self._noise(batch_size))
            actions = actions[:, : self.n_action_steps]
        actions = self._postprocessor(actions.float())
        return actions.to(torch.float64).cpu().numpy()

    def _history_for(self, observation: Observation) -> dict:
        """The robot's queues, restarted for a new robot, a new instruction or a gap."""
        now = time.monotonic()
        robot = observation.robot_id
        history = self._histories.get(robot)
        if (
            history is None
            or history.instruction != observation.instruction
            or now - history.seen > HISTORY_GAP_SEC
        ):
            self._policy.reset()
            history = _History(self._policy._queues, observation.instruction, now)
            self._histories[robot] = history
        history.seen = now
        self._histories.move_to_end(robot)
        while len(self._histories) > MAX_HISTORIES:
            self._histories.popitem(last=False)
        return history.queues

    def predict(self, observation: Observation) -> ActionChunk:
        frame = self._frame(observation)
        with self._lock, torch.inference_mode():
            if self.has_history:
                self._policy._queues = self._history_for(observation)
                actions = self._raw_actions(self._preprocess_into_history(frame))[0]
            else:
                actions = self._raw_actions(self._preprocessor(frame))[0]
        return self._chunk(actions, observation)

    def _preprocess_into_history(self, frame: dict[str, Any]) -> dict[str, Any]:
        """LeRobot's select_action up to the chunk: preprocess, stack the cameras into
        observation.images, append the frame to the history (populate_queues)."""
        batch = dict(self._preprocessor(frame))
        batch.pop(ACTION, None)
        if self._image_keys:
            batch[OBS_IMAGES] = torch.stack([batch[key] for key in self._image_keys], dim=-4)
        self._policy._queues = populate_queues(self._policy._queues, batch)
        return batch

    def predict_batch(self, observations: Sequence[Observation]) -> list[Any]:
        """One answer per observation, each what ``predict`` answers it alone; an
        observation that cannot be predicted has its InputError as its answer."""
        if self._one_at_a_time:
            return [self._answer_or_error(o) for o in observations]
        answers: list[Any] = [None] * len(observations)
        frames: list[tuple[int, dict[str, Any]]] = []
        for index, observation in enumerate(observations):
            try:
                frames.append((index, self._frame(observation)))
            except InputError as exc:
                answers[index] = exc
        if frames:
            stacked: dict[str, Any] = {
                key: torch.cat([f[key] for _, f in frames])
                for key in frames[0][1] if key != "task"
            }
            stacked["task"] = [f["task"][0] for _, f in frames]
            with self._lock, torch.inference_mode():
                actions = self._raw_actions(self._preprocessor(stacked))
            for row, (index, _) in enumerate(frames):
                answers[index] = self._chunk(actions[row], observations[index])
        return answers

    def _answer_or_error(self, observation: Observation) -> Any:
        try:
            return self.predict(observation)
        except InputError as exc:
            return exc

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_id,
            "policy_type": self.config.type,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "autocast": self.dtype != torch.float32,
            "action_layout": str(self.layout),
            "gripper_closed": self.gripper_closed,
            "gripper_open": self.gripper_open,
            "fps": self.fps,
            "fps_source": self.fps_source,
            "n_action_steps": self.n_action_steps,
            "n_obs_steps": int(getattr(self.config, "n_obs_steps", 1)),
            "history_per_robot": self.has_history,
            "history_gap_sec": HISTORY_GAP_SEC if self.has_history else None,
            "seed": self.seed,
            "image_names": list(self.inputs_required.image_names),
            "state_length": self.inputs_required.state_length,
            "action_length": self.inputs_required.action_length,
            "torch_version": torch.__version__,
        }

    def close(self) -> None:
        """Let the weights go (the in-process node's cleanup)."""
        self._policy = None
        self._preprocessor = None
        self._postprocessor = None
        self._histories.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
